"""Fleet pins, concurrent activations, the free-space check, relative hub.root."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import NamedTuple

import pytest
from edgeconvert.hub import Hub

from edgeagent.cli import main as edgeagent_main
from edgeagent.config import HubSection
from edgeagent.errors import EdgeAgentError, ModelNotFound
from edgeagent.hub.source import HubSource, trusted_root_path
from tests.hub.helpers import Rig, first_variant, make_sync, release
from tests.hub.hubserver import HubServer


async def _close(sync: Rig) -> None:
    await sync.close()


def _served(sync: Rig) -> int:
    return sync.served()


def _doc(revision: int, version: int | None) -> bytes:
    if version is None:
        return b""
    return b'{"revision": %d, "models": {"m": {"version": %d}}}' % (revision, version)


def test_device_document_pins_the_poll_loop_and_start_up(tmp_path: Path, hub: Hub,
                                                        server: HubServer) -> None:
    async def go() -> None:
        sync = make_sync(tmp_path / "state", server.url, hub, keep_versions=3)
        release(hub, tmp_path, 1)
        release(hub, tmp_path, 2)
        await sync.sync_once()
        assert _served(sync) == 2
        outcome = await sync.owner.receive_desired("device", _doc(4, 1))
        assert outcome.state == "applied"
        assert _served(sync) == 1
        release(hub, tmp_path, 3)
        await sync.sync_once()
        assert _served(sync) == 1, "a model under fleet control does not follow 'latest'"
        assert sync.owner.describe("m")["source"] == "device pin, revision 4"
        await _close(sync)
        # Persisted: a restarted agent keeps the fleet's document until it hears otherwise.
        again = make_sync(tmp_path / "state", server.url, hub, keep_versions=3)
        await again.start()
        await again.sync_once()
        assert _served(again) == 1
        # An empty retained document clears the pin: back to the configuration ("latest").
        await again.owner.receive_desired("device", _doc(5, None))
        await again.sync_once()
        assert _served(again) == 3
        assert again.owner.describe("m")["source"] == "config: latest"
        await _close(again)

    asyncio.run(go())


def test_concurrent_activations_of_one_model_end_consistent(tmp_path: Path, hub: Hub,
                                                           server: HubServer) -> None:
    async def go() -> None:
        sync = make_sync(tmp_path / "state", server.url, hub, keep_versions=3)
        release(hub, tmp_path, 1)
        release(hub, tmp_path, 2)
        release(hub, tmp_path, 3, wrong_checks=True)
        await sync.start()
        results = await asyncio.gather(
            sync.owner.pin("m", 1), sync.owner.pin("m", 3), sync.owner.pin("m", 2),
            sync.sync_once(), sync.owner.pin("m", 2), return_exceptions=True)
        assert [type(r).__name__ for r in results if isinstance(r, BaseException)] == \
            ["EdgeAgentError"]
        state = sync.history()
        assert state.active == _served(sync) == 2 == state.operator_pin
        assert set(state.failed) == {3}
        assert "check 0" in state.failed[3]
        assert state.active not in state.previous
        await _close(sync)

    asyncio.run(go())


def test_load_endpoint_and_poll_at_once_end_consistent(tmp_path: Path, hub: Hub,
                                                      server: HubServer) -> None:
    """The repository load endpoint racing the poll loop and an operator's pin."""
    async def go() -> None:
        sync = make_sync(tmp_path / "state", server.url, hub, keep_versions=3)
        release(hub, tmp_path, 1)
        release(hub, tmp_path, 2)
        await sync.sync_once()
        await sync.owner.pin("m", 1)
        await asyncio.gather(sync.owner.load("m"), sync.sync_once(), sync.owner.unpin("m"),
                             sync.sync_once())
        state = sync.history()
        assert (state.active, _served(sync), state.operator_pin, state.failed) == \
            (2, 2, None, {})
        assert state.previous == [1]
        await _close(sync)

    asyncio.run(go())


class _Usage(NamedTuple):
    total: int
    used: int
    free: int


def test_download_larger_than_free_space_fails_cleanly(tmp_path: Path, hub: Hub,
                                                      server: HubServer) -> None:
    async def go() -> None:
        free = [1 << 40]
        sync = make_sync(tmp_path / "state", server.url, hub)
        sync.store._disk_usage = lambda path: _Usage(0, 0, free[0])  # a fake file system
        release(hub, tmp_path, 1)
        await sync.sync_once()
        release(hub, tmp_path, 2, checks=False, hidden=5000)  # ~400 kB
        free[0] = 64 * 1024 * 1024 + 1000  # the margin plus less than the download
        await sync.sync_once()
        assert _served(sync) == 1
        assert "not enough disk" in sync.history().failed[2]
        assert sync.store.installed_versions("m") == [1]
        assert not list((sync.store.root / "downloads").iterdir())
        await _close(sync)

    asyncio.run(go())


def test_free_space_reader_is_injected(tmp_path: Path, hub: Hub) -> None:
    section = HubSection(url="http://127.0.0.1:9", root=str(hub.meta_dir / "1.root.json"))
    source = HubSource(section, tmp_path / "state", first_variant,
                       disk_usage=lambda path: _Usage(0, 0, 123))
    assert source.store.free_bytes() == 123
    source.close()


def test_relative_hub_root_is_relative_to_the_config_file(
        tmp_path: Path, hub: Hub, server: HubServer, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    section = HubSection(url="file:///x", root="keys/root.json")
    assert trusted_root_path(section, tmp_path) == tmp_path / "keys/root.json"
    assert trusted_root_path(HubSection(root="/abs/root.json"), tmp_path) == \
        Path("/abs/root.json")
    release(hub, tmp_path, 1)
    config = tmp_path / "agent.toml"  # the hub is tmp_path/hub: root given relative to here
    config.write_text(
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\n[http]\nlisten = "127.0.0.1:9"\n'
        f'[hub]\nurl = "{server.url}"\nroot = "hub/metadata/1.root.json"\n'
        '[[models]]\nname = "m"\nversion = "latest"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert edgeagent_main(["pull", "m", "--config", str(config)]) == 0
    assert "m version 1 verified and stored" in capsys.readouterr().out


def test_a_version_the_hub_lacks_is_refused_and_nothing_recorded(
        tmp_path: Path, hub: Hub, server: HubServer) -> None:
    async def go() -> None:
        sync = make_sync(tmp_path / "state", server.url, hub)
        release(hub, tmp_path, 1)
        await sync.sync_once()
        with pytest.raises(ModelNotFound, match="no version 7"):
            await sync.owner.pin("m", 7)
        assert sync.history().failed == {}
        assert sync.history().operator_pin is None
        assert _served(sync) == 1
        await _close(sync)

    asyncio.run(go())


def test_a_failed_pin_pins_nothing(tmp_path: Path, hub: Hub, server: HubServer) -> None:
    async def go() -> None:
        sync = make_sync(tmp_path / "state", server.url, hub)
        release(hub, tmp_path, 1)
        await sync.sync_once()
        release(hub, tmp_path, 2, wrong_checks=True)
        await sync.sync_once()
        assert _served(sync) == 1
        assert "check 0" in sync.owner.describe("m")["blocked"]
        with pytest.raises(EdgeAgentError, match="nothing pinned"):
            await sync.owner.pin("m", 2)
        assert sync.history().operator_pin is None
        assert "check 0" in sync.history().failed[2]
        assert _served(sync) == 1
        await _close(sync)

    asyncio.run(go())


def test_probe_shows_the_variant_choice_of_hub_models(
        tmp_path: Path, hub: Hub, server: HubServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    release(hub, tmp_path, 1)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\n[http]\nlisten = "127.0.0.1:9"\n'
        f'[hub]\nurl = "{server.url}"\nroot = "{hub.meta_dir / "1.root.json"}"\n'
        '[[models]]\nname = "m"\nversion = "latest"\n')
    assert edgeagent_main(["probe", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "Hub models" in out
    assert "m: unknown" in out
    assert "not in the store yet" in out
    assert edgeagent_main(["pull", "m", "--config", str(config)]) == 0
    capsys.readouterr()
    assert edgeagent_main(["probe", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "m v1: m.onnx (onnx/fp32)" in out
    assert "ranked first" in out
