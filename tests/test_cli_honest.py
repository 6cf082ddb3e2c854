"""Honest command lines (issue 13): a closed pipe is no traceback, ``check-config`` refuses what
``run`` refuses, config errors name their key once, and ``edgeconvert publish`` of a file that
is not a model is a clear usage error (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent.cli import main
from edgeagent.config import parse_config
from edgeagent.errors import ConfigError


def test_a_closed_pipe_is_no_traceback(tmp_path: Path) -> None:
    # `edgeagent probe | head -c 1`, made deterministic: the reader is gone before the write.
    proc = subprocess.Popen([sys.executable, "-m", "edgeagent", "probe"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_check_config_refuses_what_run_refuses(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    exposed = tmp_path / "exposed.toml"
    exposed.write_text('[http]\nlisten = "0.0.0.0:8080"\n')
    assert main(["check-config", "--config", str(exposed)]) == 2
    err = capsys.readouterr().err
    assert f"{exposed}: http.listen:" in err and "token_file" in err
    missing = tmp_path / "missing-token.toml"
    missing.write_text(f'[http]\nlisten = "0.0.0.0:8080"\ntoken_file = "{tmp_path}/nope"\n')
    assert main(["check-config", "--config", str(missing)]) == 2
    assert "cannot read the token file" in capsys.readouterr().err
    token = tmp_path / "token"
    token.write_text("a-token-of-enough-length-0123\n")
    good = tmp_path / "good.toml"
    good.write_text(f'[http]\nlisten = "0.0.0.0:8080"\ntoken_file = "{token}"\n')
    assert main(["check-config", "--config", str(good)]) == 0


@pytest.mark.parametrize(("doc", "key"), [
    ({"http": {"bogus": 1}}, "http"),
    ({"http": {"max_connections": 0}}, "http.max_connections"),
    ({"models": [{"name": "a"}]}, "models[0]"),
])
def test_config_errors_name_their_key_once(doc: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, source="/etc/edgeagent/agent.toml")
    text = str(info.value)
    assert text.startswith(f"/etc/edgeagent/agent.toml: {key}: "), text
    assert text.count(f"{key}:") == 1, text


@pytest.mark.parametrize(("name", "content"), [
    ("junk.onnx", b"not a model at all"),
    ("junk.tflite", b"\x00\x01\x02 not a flatbuffer"),
])
def test_publishing_a_file_that_is_not_a_model_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes) -> None:
    if name.endswith(".tflite"):
        pytest.importorskip("ai_edge_litert")
    from edgeconvert.cli import main as edgeconvert

    assert edgeconvert(["hub", "init", str(tmp_path / "hub"), "--keys",
                        str(tmp_path / "keys")]) == 0
    capsys.readouterr()
    junk = tmp_path / name
    junk.write_bytes(content)
    code = edgeconvert(["publish", "--hub", str(tmp_path / "hub"), "--keys",
                        str(tmp_path / "keys"), "--name", "a", "--version", "1", str(junk)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "unexpected" not in err and f"{junk}: not a" in err, err
