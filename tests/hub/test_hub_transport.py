"""The hub transport against a real misbehaving loopback hub: trickles and stalls are cut off by
the per-file deadline and the minimum rate, 5xx and mid-file cuts are retried with backoff and
jitter, and every transport failure is a transient error (``HubTransientError``, for the
client ``HubUnreachable``), never a ``VerificationError``: that is only for a complete file
whose hash is wrong, or one longer than signed."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from edgeconvert.hub import Hub
from tuf.api import exceptions as tuf_exc

from edgeagent.config import HubSection, parse_config
from edgeagent.errors import HubTransientError, VerificationError
from edgeagent.hub.client import HubClient, HubUnreachable
from edgeagent.hub.fetcher import HubFetcher, TransferLimits
from tests.hub.badhub import BadHub, Misbehaviour
from tests.hub.helpers import release

pytestmark = pytest.mark.timeout(120)

#: Fast limits for the tests: half-second windows, 2 KiB/s at least, 3 retries.
FAST = TransferLimits(timeout_s=0.5, file_timeout_s=2.0, min_rate_bytes_s=2048, retries=3,
                      backoff_s=0.01)


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, str]:
    folder = tmp_path / "files"
    folder.mkdir()
    data = os.urandom(200_000)
    (folder / "blob.bin").write_bytes(data)
    return folder, hashlib.sha256(data).hexdigest()


@pytest.fixture
def bad(blob: tuple[Path, str]) -> Iterator[BadHub]:
    srv = BadHub(blob[0])
    yield srv
    srv.close()


def _fetcher(sleeps: list[float] | None = None,
             limits: TransferLimits = FAST) -> HubFetcher:
    return HubFetcher(limits=limits, sleep=(sleeps.append if sleeps is not None else None)
                      or (lambda _s: None))


def _download(bad: BadHub, blob: tuple[Path, str], tmp_path: Path,
              fetcher: HubFetcher) -> Path:
    partial = tmp_path / "blob.part"
    try:
        fetcher.download(f"{bad.url}/blob.bin", partial, 200_000, blob[1])
    finally:
        fetcher.close()
    return partial


# ---- model files -------------------------------------------------------------------------


def test_500_then_ok_is_retried_with_growing_jittered_backoff(
        bad: BadHub, blob: tuple[Path, str], tmp_path: Path) -> None:
    bad.rules["blob.bin"] = Misbehaviour(errors=3)
    sleeps: list[float] = []
    limits = TransferLimits(retries=3, backoff_s=1.0)
    partial = _download(bad, blob, tmp_path, _fetcher(sleeps, limits))
    assert hashlib.sha256(partial.read_bytes()).hexdigest() == blob[1]
    assert bad.count("blob.bin") == 4
    assert len(sleeps) == 3
    for attempt, delay in enumerate(sleeps, start=1):  # 1, 2, 4 s, each jittered to 50-100 %
        assert 0.5 * 2 ** (attempt - 1) <= delay <= 2 ** (attempt - 1)


def test_500s_past_the_retries_are_transient(bad: BadHub, blob: tuple[Path, str],
                                             tmp_path: Path) -> None:
    bad.rules["blob.bin"] = Misbehaviour(errors=100, status=503)
    with pytest.raises(HubTransientError, match="HTTP 503") as info:
        _download(bad, blob, tmp_path, _fetcher())
    assert not isinstance(info.value, VerificationError)
    assert bad.count("blob.bin") == 1 + FAST.retries


def test_cuts_mid_file_resume_with_range_and_verify(bad: BadHub, blob: tuple[Path, str],
                                                    tmp_path: Path) -> None:
    bad.rules["blob.bin"] = Misbehaviour(cuts=3)
    partial = _download(bad, blob, tmp_path, _fetcher())
    assert hashlib.sha256(partial.read_bytes()).hexdigest() == blob[1]
    assert [r for _, r in bad.requests][1:] != ["", "", ""]  # the later ones resumed


def test_cuts_past_the_retries_are_transient_and_keep_what_arrived(
        bad: BadHub, blob: tuple[Path, str], tmp_path: Path) -> None:
    bad.rules["blob.bin"] = Misbehaviour(cuts=100)
    partial = tmp_path / "blob.part"
    with pytest.raises(HubTransientError) as info:
        _download(bad, blob, tmp_path, _fetcher())
    assert not isinstance(info.value, VerificationError)
    assert 0 < partial.stat().st_size < 200_000  # kept for the next pass to resume


def test_a_trickle_is_cut_off_by_the_minimum_rate(bad: BadHub, blob: tuple[Path, str],
                                                  tmp_path: Path) -> None:
    bad.rules["blob.bin"] = Misbehaviour(trickle=True, interval_s=0.01)  # ~100 bytes/s
    with pytest.raises(HubTransientError, match=r"min_rate_bytes_s|deadline") as info:
        _download(bad, blob, tmp_path, _fetcher(limits=TransferLimits(
            timeout_s=0.5, file_timeout_s=600, min_rate_bytes_s=2048, retries=1,
            backoff_s=0.01)))
    assert not isinstance(info.value, VerificationError)


def test_trickled_headers_are_cut_off_by_the_file_deadline(bad: BadHub, blob: tuple[Path, str],
                                                           tmp_path: Path) -> None:
    # Each header byte arrives well within the read timeout: only a deadline on the file as
    # a whole ends this.
    bad.rules["blob.bin"] = Misbehaviour(trickle_headers=True, interval_s=0.2)
    limits = TransferLimits(timeout_s=5.0, file_timeout_s=1.0, min_rate_bytes_s=1 << 20,
                            retries=0)
    with pytest.raises(HubTransientError, match="deadline"):
        _download(bad, blob, tmp_path, _fetcher(limits=limits))


def test_a_wrong_complete_file_is_a_verification_error(bad: BadHub, blob: tuple[Path, str],
                                                       tmp_path: Path) -> None:
    partial = tmp_path / "blob.part"
    fetcher = _fetcher()
    with pytest.raises(VerificationError, match="hash"):
        fetcher.download(f"{bad.url}/blob.bin", partial, 200_000, "0" * 64)
    fetcher.close()
    assert not partial.exists()


def test_more_than_signed_is_a_verification_error(bad: BadHub, blob: tuple[Path, str],
                                                  tmp_path: Path) -> None:
    fetcher = _fetcher()
    with pytest.raises(VerificationError, match="more than the signed"):
        fetcher.download(f"{bad.url}/blob.bin", tmp_path / "p", 1000, blob[1])
    fetcher.close()


# ---- metadata (ngclient's fetch) -----------------------------------------------------------


def test_metadata_500_then_ok_is_retried(bad: BadHub, blob: tuple[Path, str]) -> None:
    bad.rules["blob.bin"] = Misbehaviour(errors=2, status=502)
    fetcher = _fetcher()
    data = fetcher.download_bytes(f"{bad.url}/blob.bin", 1 << 20)
    fetcher.close()
    assert hashlib.sha256(data).hexdigest() == blob[1]


def test_metadata_cut_then_ok_is_fetched_again(bad: BadHub, blob: tuple[Path, str]) -> None:
    bad.rules["blob.bin"] = Misbehaviour(cuts=2)
    fetcher = _fetcher()
    data = fetcher.download_bytes(f"{bad.url}/blob.bin", 1 << 20)
    fetcher.close()
    assert hashlib.sha256(data).hexdigest() == blob[1]


def test_metadata_404_is_not_retried(bad: BadHub) -> None:
    # ngclient probes for the next root version and stops at 404 (or 403).
    fetcher = _fetcher()
    with pytest.raises(tuf_exc.DownloadHTTPError):
        fetcher.download_bytes(f"{bad.url}/nope.json", 1 << 20)
    fetcher.close()
    assert bad.count("nope.json") == 1


def test_trickled_metadata_is_cut_off(bad: BadHub) -> None:
    bad.rules["blob.bin"] = Misbehaviour(trickle=True, interval_s=0.01)
    fetcher = _fetcher(limits=TransferLimits(timeout_s=0.5, file_timeout_s=600,
                                             min_rate_bytes_s=2048, retries=0))
    with pytest.raises(tuf_exc.DownloadError, match="min_rate_bytes_s"):
        fetcher.download_bytes(f"{bad.url}/blob.bin", 1 << 20)
    fetcher.close()


# ---- through the client, on a real hub -----------------------------------------------------


@pytest.fixture
def bad_hub(tmp_path: Path, hub: Hub) -> Iterator[BadHub]:
    release(hub, tmp_path / "work", 1)
    srv = BadHub(hub.dir)
    yield srv
    srv.close()


def _client(tmp_path: Path, hub: Hub, srv: BadHub, limits: TransferLimits = FAST) -> HubClient:
    return HubClient(srv.url, hub.meta_dir / "1.root.json", tmp_path / "meta",
                     HubFetcher(limits=limits, sleep=lambda _s: None))


def test_a_trickled_timestamp_is_unreachable_not_ok(tmp_path: Path, hub: Hub,
                                                    bad_hub: BadHub) -> None:
    bad_hub.rules["timestamp.json"] = Misbehaviour(trickle=True, interval_s=0.05)
    client = _client(tmp_path, hub, bad_hub, TransferLimits(
        timeout_s=0.5, file_timeout_s=600, min_rate_bytes_s=2048, retries=0))
    with pytest.raises(HubUnreachable, match="min_rate_bytes_s"):
        client.refresh()


def test_a_hub_500_then_ok_refreshes(tmp_path: Path, hub: Hub, bad_hub: BadHub) -> None:
    bad_hub.rules["timestamp.json"] = Misbehaviour(errors=2)
    index = _client(tmp_path, hub, bad_hub).refresh()
    assert index.latest("m") == 1


def test_a_cut_bundle_is_unreachable_not_a_verification_error(tmp_path: Path, hub: Hub,
                                                             bad_hub: BadHub) -> None:
    client = _client(tmp_path, hub, bad_hub)
    client.refresh()
    bad_hub.rules["bundle.json"] = Misbehaviour(cuts=100)
    with pytest.raises(HubUnreachable) as info:
        client.bundle("m", 1)
    assert not isinstance(info.value, VerificationError)
    bad_hub.rules["bundle.json"] = Misbehaviour(cuts=2)  # within the retries: fetched again
    assert client.bundle("m", 1).version == 1


def test_a_model_file_cut_every_time_is_unreachable(tmp_path: Path, hub: Hub,
                                                    bad_hub: BadHub) -> None:
    client = _client(tmp_path, hub, bad_hub)
    client.refresh()
    bundle = client.bundle("m", 1)
    ref = bundle.files()[0]
    bad_hub.rules[ref.file] = Misbehaviour(cuts=100)
    with pytest.raises(HubUnreachable) as info:
        client.download("m", 1, ref.file, tmp_path / "part")
    assert not isinstance(info.value, VerificationError)
    bad_hub.rules[ref.file] = Misbehaviour()
    client.download("m", 1, ref.file, tmp_path / "part")  # resumes, then verifies
    assert hashlib.sha256((tmp_path / "part").read_bytes()).hexdigest() == ref.sha256


# ---- configuration -------------------------------------------------------------------------


def test_the_limits_come_from_the_hub_section() -> None:
    cfg = parse_config({"hub": {"url": "http://127.0.0.1:1", "root": "r.json",
                                "file_timeout_s": 7.0, "min_rate_bytes_s": 100,
                                "timeout_s": 3.0, "retries": 0}})
    limits = TransferLimits.from_section(cfg.hub)
    assert (limits.file_timeout_s, limits.min_rate_bytes_s, limits.timeout_s,
            limits.retries) == (7.0, 100, 3.0, 0)
    assert limits.deadline_s(1000) == 17.0
    fetcher = HubFetcher.from_section(cfg.hub)
    assert fetcher.limits == limits
    fetcher.close()
    defaults = TransferLimits.from_section(HubSection())
    assert defaults.deadline_s(1 << 30) > 12 * 3600  # a 1 GiB model at 16 KiB/s fits


# ---- shutdown --------------------------------------------------------------------------------


def test_cancel_ends_a_trickle_and_a_backoff_at_once(bad: BadHub, blob: tuple[Path, str],
                                                     tmp_path: Path) -> None:
    import threading
    import time

    # Limits under which each of these would take minutes: cancel() ends them promptly.
    slow = TransferLimits(timeout_s=30, file_timeout_s=600, min_rate_bytes_s=1, retries=5,
                          backoff_s=60)
    for rule in (Misbehaviour(trickle=True, interval_s=0.05), Misbehaviour(errors=100)):
        bad.rules["blob.bin"] = rule
        fetcher = HubFetcher(limits=slow)
        errors: list[BaseException] = []

        def run(f: HubFetcher = fetcher, errors: list[BaseException] = errors) -> None:
            try:
                f.download(f"{bad.url}/blob.bin", tmp_path / "p", 200_000, blob[1])
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.5)  # under way: trickling, or waiting 30-60 s before its next attempt
        fetcher.cancel()
        worker.join(20)
        assert not worker.is_alive(), "cancel() did not end the transfer"
        fetcher.close()
        assert len(errors) == 1 and isinstance(errors[0], HubTransientError), errors
        assert not isinstance(errors[0], VerificationError)
