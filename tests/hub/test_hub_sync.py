"""The agent against a real hub over loopback HTTP: switch, refuse, resume, roll back."""

from __future__ import annotations

import asyncio
import shutil
from datetime import timedelta
from pathlib import Path

from edgeconvert.hub import Hub

from tests.hub.helpers import SAMPLE, Rig, make_sync, release
from tests.hub.hubserver import HubServer


async def _close(sync: Rig) -> None:
    await sync.close()


def _served(sync: Rig) -> int:
    return sync.served()


def test_publish_v1_then_v2_switches_without_failed_requests(
        tmp_path: Path, hub: Hub, server: HubServer) -> None:
    async def go() -> None:
        sync = make_sync(tmp_path / "state", server.url, hub)
        manager = sync.manager
        assert manager is not None
        release(hub, tmp_path, 1)
        await sync.sync_once()
        assert _served(sync) == 1
        failures: list[BaseException] = []
        seen: set[int] = set()
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                try:
                    mv, _ = await manager.infer("m", {"input": SAMPLE[0]})
                    seen.add(mv.version)
                except Exception as exc:
                    failures.append(exc)
                await asyncio.sleep(0)

        task = asyncio.create_task(client())
        release(hub, tmp_path, 2)
        await sync.sync_once()
        while 2 not in seen:
            await asyncio.sleep(0.01)
        stop.set()
        await task
        assert failures == []
        assert seen == {1, 2}
        assert _served(sync) == 2
        state = sync.history()
        assert (state.active, state.previous) == (2, [1])
        await _close(sync)

    asyncio.run(go())


def test_tampered_file_refused_and_old_version_keeps_serving(
        tmp_path: Path, hub: Hub, server: HubServer) -> None:
    async def go() -> None:
        sync = make_sync(tmp_path / "state", server.url, hub)
        release(hub, tmp_path, 1)
        await sync.sync_once()
        release(hub, tmp_path, 2)
        for f in (hub.dir / "targets/models/m/2").glob("*.m.onnx"):
            f.write_bytes(f.read_bytes()[:-4] + b"XXXX")  # altered after signing
        await sync.sync_once()
        assert _served(sync) == 1
        assert "hash" in sync.history().failed[2]
        assert not list((sync.store.root / "downloads").iterdir())
        await _close(sync)

    asyncio.run(go())


def test_failing_checks_keep_the_old_version(tmp_path: Path, hub: Hub, server: HubServer) -> None:
    async def go() -> None:
        sync = make_sync(tmp_path / "state", server.url, hub)
        release(hub, tmp_path, 1)
        await sync.sync_once()
        release(hub, tmp_path, 2, wrong_checks=True)
        await sync.sync_once()
        assert _served(sync) == 1
        assert "check 0" in sync.history().failed[2]
        assert sync.owner.describe("m")["failed"]["2"]
        # Not retried on the next poll: a bad release is tried once.
        await sync.sync_once()
        assert sync.history().active == 1
        await _close(sync)

    asyncio.run(go())


def test_download_cut_halfway_resumes_with_range(tmp_path: Path, hub: Hub,
                                                 server: HubServer) -> None:
    async def go() -> None:
        sync = make_sync(tmp_path / "state", server.url, hub)
        release(hub, tmp_path, 1, hidden=20000)  # ~2 MB: arrives in many pieces
        server.cut_next.add(".m.onnx")
        await sync.sync_once()
        assert _served(sync) == 1
        assert any(p.endswith(".m.onnx") for p in server.range_requests)
        await _close(sync)

    asyncio.run(go())


def test_replayed_old_metadata_is_refused(tmp_path: Path, hub: Hub, server: HubServer) -> None:
    async def go() -> None:
        sync = make_sync(tmp_path / "state", server.url, hub)
        release(hub, tmp_path, 1)
        old = (hub.meta_dir / "timestamp.json").read_bytes()
        release(hub, tmp_path, 2)
        await sync.sync_once()
        assert _served(sync) == 2
        (hub.meta_dir / "timestamp.json").write_bytes(old)  # a replay of the v1 hub
        await sync.sync_once()
        assert sync.hub.status.state == "refused"
        assert "older" in sync.hub.status.last_error
        assert _served(sync) == 2
        await _close(sync)

    asyncio.run(go())


def test_expired_timestamp_keeps_serving_and_installs_nothing(
        tmp_path: Path, hub: Hub, server: HubServer) -> None:
    async def go() -> None:
        sync = make_sync(tmp_path / "state", server.url, hub)
        release(hub, tmp_path, 1)
        await sync.sync_once()
        release(hub, tmp_path, 2)
        Hub(hub.dir, hub.keys_dir, {"timestamp": timedelta(seconds=-60)}).refresh()
        await sync.sync_once()
        assert sync.hub.status.state == "expired"
        assert _served(sync) == 1
        assert sync.store.installed_versions("m") == [1]
        hub.refresh()  # re-signed: the box moves on
        await sync.sync_once()
        assert _served(sync) == 2
        await _close(sync)

    asyncio.run(go())


def test_file_from_another_release_is_refused(tmp_path: Path, hub: Hub,
                                              server: HubServer) -> None:
    async def go() -> None:
        sync = make_sync(tmp_path / "state", server.url, hub)
        release(hub, tmp_path, 1)
        release(hub, tmp_path, 2)
        (v1,) = (hub.dir / "targets/models/m/1").glob("*.m.onnx")
        (v2,) = (hub.dir / "targets/models/m/2").glob("*.m.onnx")
        shutil.copyfile(v1, v2)  # v2's bundle served with v1's model
        await sync.sync_once()
        assert sync.history().active is None
        assert 2 in sync.history().failed
        await _close(sync)

    asyncio.run(go())


def test_disk_budget_too_small_fails_cleanly(tmp_path: Path, hub: Hub,
                                             server: HubServer) -> None:
    async def go() -> None:
        sync = make_sync(tmp_path / "state", server.url, hub, disk_budget_mb=1)
        release(hub, tmp_path, 1)
        await sync.sync_once()
        release(hub, tmp_path, 2, checks=False, hidden=70000)  # ~6 MB, over the 1 MB budget
        await sync.sync_once()
        assert _served(sync) == 1
        assert "disk_budget_mb" in sync.history().failed[2]
        assert not list((sync.store.root / "downloads").iterdir())
        await _close(sync)

    asyncio.run(go())


def test_rollback_pins_the_previous_version_against_latest(tmp_path: Path, hub: Hub,
                                                          server: HubServer) -> None:
    async def go() -> None:
        sync = make_sync(tmp_path / "state", server.url, hub)
        release(hub, tmp_path, 1)
        await sync.sync_once()
        release(hub, tmp_path, 2)
        await sync.sync_once()
        assert sync.owner.rollback_target("m") == 1
        await sync.owner.rollback("m")
        assert _served(sync) == 1
        assert sync.history().previous == [2]
        # The rollback pins version 1: the next poll does not go forward to the latest again.
        await sync.sync_once()
        assert _served(sync) == 1
        assert sync.history().operator_pin == 1
        assert sync.owner.describe("m")["source"] == "operator pin"
        # Clearing the pin follows the configuration (latest) again.
        await sync.owner.unpin("m")
        assert _served(sync) == 2
        await _close(sync)

    asyncio.run(go())


def test_start_serves_the_stored_version_without_the_hub(tmp_path: Path, hub: Hub,
                                                        server: HubServer) -> None:
    async def go() -> None:
        sync = make_sync(tmp_path / "state", server.url, hub)
        release(hub, tmp_path, 1)
        await sync.sync_once()
        await _close(sync)
        # A new agent, the hub gone: the stored version serves at once.
        offline = make_sync(tmp_path / "state", "http://127.0.0.1:9", hub)
        await offline.start()
        assert _served(offline) == 1
        await offline.sync_once()
        assert offline.hub.status.state == "unreachable"
        assert _served(offline) == 1
        assert offline.history().failed == {}, "an unreachable hub fails no release"
        await _close(offline)

    asyncio.run(go())
