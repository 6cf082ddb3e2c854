"""The rollout document and the bucket function (DESIGN 3.5): values pinned so the agent, the
fleet controller and any simulator compute the same buckets."""

from __future__ import annotations

import hashlib

import pytest

from edgeagent.control.rollout import (
    RolloutDoc,
    RolloutError,
    bucket,
    in_share,
    parse_rollout,
    share_threshold,
)

# Computed once from the text of DESIGN 3.5 (hex digest, first 16 hex digits, mod 10,000).
KNOWN = [("r-1", "dev-0001", 2798), ("r-1", "dev-0002", 9701), ("r-12", "jetson-7", 3739),
         ("rollout-a", "pi-5", 9939)]


@pytest.mark.parametrize(("rollout_id", "device_id", "expected"), KNOWN)
def test_bucket_pinned_values(rollout_id: str, device_id: str, expected: int) -> None:
    assert bucket(rollout_id, device_id) == expected
    hexed = hashlib.sha256(f"{rollout_id}/{device_id}".encode()).hexdigest()
    assert int(hexed[:16], 16) % 10_000 == expected


def test_share_edges() -> None:
    assert not in_share("r-1", "dev-0001", 0)
    assert in_share("r-1", "dev-0001", 100)
    assert in_share("r-1", "dev-0001", 27.99)  # bucket 2798 < 2799
    assert not in_share("r-1", "dev-0001", 27.98)  # 2798 is not < 2798
    assert share_threshold(0.01) == 1 and share_threshold(100) == 10_000


def test_buckets_spread_evenly() -> None:
    counts = [0] * 10
    for i in range(20_000):
        counts[bucket("r-spread", f"device-{i:05d}") // 1000] += 1
    assert min(counts) > 1_700 and max(counts) < 2_300


def test_round_trip() -> None:
    doc = RolloutDoc("r-12", "classifier", 3, 25.0, "running", 1.5)
    assert parse_rollout(doc.payload(), "classifier") == doc
    assert doc.describe() == "rollout r-12 at 25 %"
    assert parse_rollout(b"") is None


@pytest.mark.parametrize("payload", [
    b"[1]", b"{", b"\xff", b'{"rollout_id": "r", "model": "m", "version": 1, "share": 5}',
    b'{"rollout_id": "r", "model": "m", "version": 0, "share": 5, "state": "running"}',
    b'{"rollout_id": "r", "model": "m", "version": 1, "share": 101, "state": "running"}',
    b'{"rollout_id": "r", "model": "m", "version": 1, "share": true, "state": "running"}',
    b'{"rollout_id": "r", "model": "m", "version": 1, "share": 5, "state": "halfway"}',
    b'{"rollout_id": "a/b", "model": "m", "version": 1, "share": 5, "state": "running"}',
    b'{"rollout_id": "r", "model": "other", "version": 1, "share": 5, "state": "running"}',
    b'{"rollout_id": "r", "model": "m", "version": 1, "share": 5, "state": "running", "x": 1}',
    b'{"rollout_id": "r", "model": "m", "version": ' + b"9" * 5000 + b', "share": 5, '
    b'"state": "running"}',
    b"[" * 5000 + b"]" * 5000,
    b'{"rollout_id": "r", "model": "m", "version": 1, "share": 5, "state": "running", '
    b'"ts": "' + b"x" * 5000 + b'"}',
])
def test_malformed_documents_are_refused(payload: bytes) -> None:
    with pytest.raises(RolloutError):
        parse_rollout(payload, "m")
