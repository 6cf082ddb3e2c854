"""``edgeagent tune`` against a running agent (real runtimes, a real measurement with a short
budget), what ``status`` and ``reported`` show, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from edgeagent.cli import main as edgeagent_main
from edgeagent.config import load_config
from tests import onnx_models
from tests.agentthread import AgentThread, free_port


def _config(tmp_path: Path) -> Path:
    model = onnx_models.mlp(tmp_path / "m.onnx", n_in=4, n_hidden=8, n_out=3)
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\ndevice_id = "tune-test"\n'
        f'shutdown_grace_s = 5.0\n[http]\nlisten = "127.0.0.1:{free_port()}"\n'
        f'[[models]]\nname = "m"\npath = "{model}"\n'
        'tune = { enabled = false, budget_s = 3, threads = [1, 2] }\n')
    return path


def test_tune_on_demand_table_json_status_and_refusals(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_path = _config(tmp_path)
    config = str(config_path)
    agent = AgentThread(load_config(config, {})).start()
    try:
        # The HTTP listener without a token refuses, like pull.
        r = httpx.post(f"{agent.url}/v1/agent/models/m/tune", json={})
        assert r.status_code == 403

        assert edgeagent_main(["tune", "m", "--config", config]) == 0
        captured = capsys.readouterr()
        assert "/3 " in captured.err  # the progress bar: three candidates
        out = captured.out
        assert out.splitlines()[0].startswith("candidate")
        assert "m.onnx fp32 CPU tdefault (default)" in out
        assert "m.onnx fp32 CPU t1" in out and "m.onnx fp32 CPU t2" in out
        assert "chosen: m.onnx on CPUExecutionProvider" in out
        assert "of a 3 s budget" in out

        assert edgeagent_main(["tune", "m", "--config", config, "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        result = doc["result"]
        assert len(result["rows"]) == 3
        assert result["elapsed_s"] < 3 + 2  # the budget, plus the last candidate's load
        measured = [r for r in result["rows"] if r["figures"]]
        assert measured and all(r["figures"]["throughput"] > 0 for r in measured)
        assert sum(r["outcome"] == "chosen" for r in result["rows"]) == 1
        assert doc["model"]["tuning"]["state"] == "done"

        assert edgeagent_main(["status", "--config", config, "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        (m,) = status["models"]
        assert m["tuning"]["candidates"] == 3 and m["tuning"]["margin"] is not None
        reported = agent.agent._reported()["models"]["m"]
        assert reported["tuning"]["chosen"] == m["tuning"]["chosen"]
        assert (tmp_path / "state" / "tuning" / "m.json").is_file()

        assert edgeagent_main(["tune", "nope", "--config", config]) == 1
        assert "unknown model 'nope'" in capsys.readouterr().err
    finally:
        agent.stop()


def test_tune_needs_the_agent_running(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = str(_config(tmp_path))
    assert edgeagent_main(["tune", "m", "--config", config]) == 1
    assert "not running" in capsys.readouterr().err
