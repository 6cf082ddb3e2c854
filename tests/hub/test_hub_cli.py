"""``edgeagent pull|rollback|models`` and ``edgeconvert hub|publish`` from the outside."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgeconvert.cli import main as edgeconvert_main
from edgeconvert.hub import Hub

from edgeagent.cli import main as edgeagent_main
from tests import onnx_models
from tests.hub.helpers import release
from tests.hub.hubserver import HubServer


def _config(tmp_path: Path, url: str, hub: Hub) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[http]\nlisten = "127.0.0.1:9"\n'  # nothing listens: the agent is "not running"
        f'[hub]\nurl = "{url}"\nroot = "{hub.meta_dir / "1.root.json"}"\n'
        '[[models]]\nname = "m"\nversion = "latest"\n')
    return path


def test_pull_models_rollback_offline(tmp_path: Path, hub: Hub, server: HubServer,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = str(_config(tmp_path, server.url, hub))
    release(hub, tmp_path, 1)
    release(hub, tmp_path, 2)
    assert edgeagent_main(["pull", "m@1", "--config", config]) == 0
    assert edgeagent_main(["pull", "m", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "m version 2 verified and stored" in out
    assert "not running" in out
    assert edgeagent_main(["models", "--config", config]) == 0
    assert "stored 1, 2" in capsys.readouterr().out
    # Nothing was ever active here: no rollback target.
    assert edgeagent_main(["rollback", "m", "--config", config]) == 1
    assert "no previous version" in capsys.readouterr().err


def test_pull_bad_spec_and_unknown_model(tmp_path: Path, hub: Hub, server: HubServer,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    config = str(_config(tmp_path, server.url, hub))
    assert edgeagent_main(["pull", "m@x", "--config", config]) == 2
    assert edgeagent_main(["pull", "nope", "--config", config]) == 1
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_edgeconvert_hub_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub_dir, keys = tmp_path / "hub", tmp_path / "keys"
    assert edgeconvert_main(["hub", "init", str(hub_dir), "--keys", str(keys)]) == 0
    assert "1.root.json" in capsys.readouterr().out
    assert not list(hub_dir.rglob("*.pem"))
    model = onnx_models.mlp(tmp_path / "m.onnx", n_in=4, n_hidden=8, n_out=3)
    args = ["publish", "--hub", str(hub_dir), "--keys", str(keys), "--name", "m"]
    assert edgeconvert_main([*args, "--version", "1", f"{model}:fp32:arch=x86_64"]) == 0
    assert edgeconvert_main([*args, "--version", "1", str(model)]) == 2
    assert "not newer" in capsys.readouterr().err
    assert edgeconvert_main([*args, "--version", "2", f"{model}:fp64"]) == 2
    assert edgeconvert_main([*args, "--version", "2", str(tmp_path / "missing.onnx")]) == 2
    assert edgeconvert_main(["hub", "refresh", str(hub_dir), "--keys", str(keys)]) == 0
    assert edgeconvert_main(["hub", "list", str(hub_dir)]) == 0
    assert "m v1: m.onnx (onnx/fp32" in capsys.readouterr().out


def test_hub_init_refuses_keys_under_the_hub(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    hub_dir = tmp_path / "hub"
    assert edgeconvert_main(["hub", "init", str(hub_dir), "--keys", str(hub_dir / "k")]) == 2
    assert "must not live under" in capsys.readouterr().err
