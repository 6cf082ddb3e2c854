"""Pinned desired versions, concurrent activations, the free-space check, relative hub.root."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import NamedTuple

import pytest
from edgeconvert.hub import Hub

from edgeagent.cli import main as edgeagent_main
from edgeagent.config import HubSection
from edgeagent.errors import EdgeAgentError
from edgeagent.hub.sync import HubSync, trusted_root_path
from tests.hub.helpers import make_sync, release
from tests.hub.hubserver import HubServer


async def _close(sync: HubSync) -> None:
    await sync.stop()
    assert sync.manager is not None
    await sync.manager.close(1)


def _served(sync: HubSync) -> int:
    assert sync.manager is not None
    return sync.manager.get("m").version


def test_set_desired_pins_the_poll_loop_and_start_up(tmp_path: Path, hub: Hub,
                                                    server: HubServer) -> None:
    async def go() -> None:
        sync = make_sync(tmp_path / "state", server.url, hub, keep_versions=3)
        release(hub, tmp_path, 1)
        release(hub, tmp_path, 2)
        await sync.sync_once()
        assert _served(sync) == 2
        sync.set_desired("m", 1)  # what the fleet's desired state does
        await sync.sync_once()
        assert _served(sync) == 1
        release(hub, tmp_path, 3)
        await sync.sync_once()
        assert _served(sync) == 1, "a pinned model does not follow 'latest'"
        await _close(sync)
        # Persisted: a restarted agent keeps the pin.
        again = make_sync(tmp_path / "state", server.url, hub, keep_versions=3)
        assert again.store.model_state("m").desired == 1
        await again.start()
        assert again.manager is not None
        await again.manager.load("m", await again.resolve(again.sections["m"]))
        await again.sync_once()
        assert _served(again) == 1
        again.set_desired("m", None)  # back to the configuration ("latest")
        await again.sync_once()
        assert _served(again) == 3
        assert again.store.model_state("m").desired is None
        await _close(again)

    asyncio.run(go())


def test_concurrent_activations_of_one_model_end_consistent(tmp_path: Path, hub: Hub,
                                                           server: HubServer) -> None:
    async def go() -> None:
        sync = make_sync(tmp_path / "state", server.url, hub, keep_versions=3)
        release(hub, tmp_path, 1)
        release(hub, tmp_path, 2)
        release(hub, tmp_path, 3, wrong_checks=True)
        assert sync.manager is not None
        results = await asyncio.gather(
            sync.activate("m", 1, explicit=True), sync.activate("m", 3, explicit=True),
            sync.activate("m", 2, explicit=True), sync.sync_once(),
            sync.activate("m", 2, explicit=True), return_exceptions=True)
        assert [type(r).__name__ for r in results if isinstance(r, BaseException)] == \
            ["ModelError"]
        state = sync.store.model_state("m")
        assert state.active == _served(sync) == 2
        assert set(state.failed) == {3}
        assert "check 0" in state.failed[3]
        assert state.active not in state.previous
        assert state.requested is None
        await _close(sync)

    asyncio.run(go())


def test_load_endpoint_and_poll_at_once_end_consistent(tmp_path: Path, hub: Hub,
                                                      server: HubServer) -> None:
    """The repository load endpoint (resolve + manager.load) racing the poll loop."""
    async def go() -> None:
        sync = make_sync(tmp_path / "state", server.url, hub, keep_versions=3)
        manager = sync.manager
        assert manager is not None
        release(hub, tmp_path, 1)
        release(hub, tmp_path, 2)
        await sync.sync_once()
        await sync.activate("m", 1, explicit=True)
        sync.request("m", 2, pin=True)

        async def endpoint() -> None:
            await manager.load("m", await sync.resolve(sync.sections["m"]))

        await asyncio.gather(endpoint(), sync.sync_once(), sync.sync_once())
        await sync.sync_once()  # records what the endpoint loaded
        state = sync.store.model_state("m")
        assert (state.active, _served(sync), state.requested, state.failed) == (2, 2, None, {})
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
        assert "not enough disk" in sync.store.model_state("m").failed[2]
        assert sync.store.installed_versions("m") == [1]
        assert not list((sync.store.root / "downloads").iterdir())
        await _close(sync)

    asyncio.run(go())


def test_free_space_reader_is_injected(tmp_path: Path, hub: Hub) -> None:
    section = HubSection(url="http://127.0.0.1:9", root=str(hub.meta_dir / "1.root.json"))
    sync = HubSync(section, (), tmp_path / "state", None, lambda v: (v[0], ""),
                   disk_usage=lambda path: _Usage(0, 0, 123))
    assert sync.store.free_bytes() == 123
    sync.close()


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


def test_activation_failure_is_an_edgeagent_error(tmp_path: Path, hub: Hub,
                                                 server: HubServer) -> None:
    async def go() -> None:
        sync = make_sync(tmp_path / "state", server.url, hub)
        with pytest.raises(EdgeAgentError, match=r"no release|not"):
            await sync.activate("m", 7, explicit=True)
        assert 7 in sync.store.model_state("m").failed
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
