"""Configuration: defaults, TOML files, environment overrides, and every kind of bad value."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgeagent.cli import main
from edgeagent.config import is_loopback_listen, load_config, parse_config
from edgeagent.errors import ConfigError


def test_embedded_defaults_when_no_file(tmp_path: Path) -> None:
    cfg = load_config(None, {"EDGEAGENT_CONFIG": ""})
    # The default path may not exist on this machine; either way defaults are what DESIGN says.
    assert cfg.http.listen == "127.0.0.1:8080"
    assert cfg.agent.profile == "auto"
    assert cfg.hub.url == "" and cfg.mqtt.url == ""
    assert cfg.state_path({}) == Path("edgeagent-data")
    state_directory = {"STATE_DIRECTORY": "/var/lib/edgeagent:/x"}
    assert cfg.state_path(state_directory) == Path("/var/lib/edgeagent")


def test_file_and_env_overrides(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(
        '[agent]\ndevice_id = "box-1"\ntags = ["line-a", "cameras"]\n'
        '[http]\nlisten = "127.0.0.1:9000"\n'
        '[[models]]\nname = "m"\npath = "m.onnx"\nmax_batch_size = 8\n'
    )
    env = {"EDGEAGENT_HTTP__LISTEN": "unix:/run/edgeagent/api.sock",
           "EDGEAGENT_AGENT__SHUTDOWN_GRACE_S": "3", "EDGEAGENT_AGENT__TAGS": '["x"]'}
    cfg = load_config(str(f), env)
    assert cfg.agent.device_id == "box-1"
    assert cfg.agent.tags == ("x",)
    assert cfg.agent.shutdown_grace_s == 3.0
    assert cfg.http.listen == "unix:/run/edgeagent/api.sock"
    assert cfg.models[0].max_batch_size == 8
    assert cfg.source == str(f)


@pytest.mark.parametrize(
    ("doc", "key", "words"),
    [
        ({"http": {"listne": "x"}}, "http", "unknown key 'listne'"),
        ({"bogus": {}}, "", "unknown section 'bogus'"),
        ({"http": {"listen": 8080}}, "http.listen", "expected a string"),
        ({"http": {"listen": "8080"}}, "http.listen", "HOST:PORT"),
        ({"http": {"listen": "example.com:80"}}, "http.listen", "not an IP address"),
        ({"http": {"max_request_bytes": 0}}, "http.max_request_bytes", "> 0"),
        ({"agent": {"tags": "a"}}, "agent.tags", "expected a list"),
        ({"agent": {"tags": ["a", 1]}}, "agent.tags[1]", "expected a string"),
        ({"agent": {"log_level": "loud"}}, "agent.log_level", "one of"),
        ({"hub": {"url": "ftp://x"}}, "hub.url", "http://"),
        ({"hub": {"url": "http://h"}}, "hub.root", "root metadata"),
        ({"mqtt": {"url": "tcp://x"}}, "mqtt.url", "mqtt://"),
        ({"mqtt": {"protocol": "4"}}, "mqtt.protocol", "3.1.1"),
        ({"mqtt": {"cert_file": "c.pem"}}, "mqtt.cert_file", "key_file"),
        ({"mqtt": {"topic_prefix": "a/#"}}, "mqtt.topic_prefix", "wildcards"),
        ({"models": {"name": "x"}}, "models", "array of tables"),
        ({"models": [{"path": "a.onnx"}]}, "models[0].name", "missing required key"),
        ({"models": [{"name": "a"}]}, "models[0]", "give version"),
        ({"models": [{"name": "a", "path": "a.onnx", "version": 1}]}, "models[0]", "not both"),
        ({"models": [{"name": "a", "path": "a.pt"}]}, "models[0].path", ".onnx or .tflite"),
        ({"models": [{"name": "a", "version": "newest"}],
          "hub": {"url": "http://h", "root": "r.json"}}, "models[0].version", "latest"),
        ({"models": [{"name": "a", "version": 0}],
          "hub": {"url": "http://h", "root": "r.json"}}, "models[0].version", "start at 1"),
        ({"models": [{"name": "a", "version": 2}]}, "models[0].version", "[hub] url"),
        ({"models": [{"name": "a b", "path": "a.onnx"}]}, "models[0].name", "letters"),
        ({"models": [{"name": "a", "path": "a.onnx"}, {"name": "a", "path": "b.onnx"}]},
         "models[1].name", "twice"),
        ({"models": [{"name": "a", "path": "a.onnx", "max_batch_size": True}]},
         "models[0].max_batch_size", "integer"),
        ({"models": [{"name": "a", "path": "a.onnx", "extra": 1}]}, "models[0]", "unknown key"),
    ],
)
def test_bad_values_name_their_key(doc: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, {}, source="agent.toml")
    assert info.value.key_path == key
    assert words in str(info.value)
    assert str(info.value).startswith("agent.toml: ")


def test_bad_env_override_is_named() -> None:
    with pytest.raises(ConfigError, match=r"http\.max_request_bytes") as info:
        parse_config({}, {"EDGEAGENT_HTTP__MAX_REQUEST_BYTES": "lots"}, source="agent.toml")
    assert info.value.source == "EDGEAGENT_HTTP__MAX_REQUEST_BYTES"  # not the file
    assert str(info.value) == ("EDGEAGENT_HTTP__MAX_REQUEST_BYTES: http.max_request_bytes: "
                               "expected an integer, got 'lots'")
    with pytest.raises(ConfigError, match="EDGEAGENT_NOPE__X: not a configuration override"):
        parse_config({}, {"EDGEAGENT_NOPE__X": "1"})


def test_names_without_a_double_underscore_are_ignored_and_reported() -> None:
    """A wrapper script's EDGEAGENT_VENV is not an override: ignored (warned about by the
    commands), never fatal."""
    env = {"EDGEAGENT_VENV": "/opt/edgeagent", "EDGEAGENT_NOPE": "1", "EDGEAGENT_CONFIG": "",
           "EDGEAGENT_HTTP__LISTEN": "127.0.0.1:9000", "PATH": "/bin"}
    config = parse_config({}, env)
    assert config.ignored_env == ("EDGEAGENT_NOPE", "EDGEAGENT_VENV")
    assert config.http.listen == "127.0.0.1:9000"
    assert parse_config({}, {}).ignored_env == ()


def test_unknown_env_key_is_blamed_on_the_environment(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[http]\nlisten = "127.0.0.1:8080"\n')
    with pytest.raises(ConfigError) as info:
        parse_config({}, {"EDGEAGENT_HTTP__LISTN": "127.0.0.1:1"}, source=str(path))
    assert info.value.source == "EDGEAGENT_HTTP__LISTN"
    assert info.value.key_path == "http.listn"
    assert "unknown key 'listn'" in str(info.value) and str(path) not in str(info.value)
    monkeypatch.setenv("EDGEAGENT_HTTP__LISTN", "127.0.0.1:1")
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeagent: error: EDGEAGENT_HTTP__LISTN: http.listn: unknown key")
    assert str(path) not in err


def test_check_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[http]\nlisten = "127.0.0.1:9000"\n\n[[models]]\nname = "m"\n'
                    'path = "/opt/m.onnx"\n')
    monkeypatch.setenv("EDGEAGENT_VENV", "/opt/edgeagent")
    assert main(["check-config", "--json", "--config", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["source"] == str(path) and doc["models"] == 1
    assert doc["ignored_env"] == ["EDGEAGENT_VENV"]
    assert doc["config"]["http"]["listen"] == "127.0.0.1:9000"
    assert doc["config"]["models"][0]["path"] == "/opt/m.onnx"
    assert main(["check-config", "--config", str(path)]) == 0
    captured = capsys.readouterr()
    assert "OK (1 model(s))" in captured.out
    assert "warning: EDGEAGENT_VENV is not a configuration override" in captured.err

    path.write_text('[http]\nlisten = "nowhere"\n')
    assert main(["check-config", "--json", "--config", str(path)]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["key"] == "http.listen" and doc["source"] == str(path)
    assert "expected HOST:PORT" in doc["error"]


def test_missing_explicit_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "nope.toml"), {})
    bad = tmp_path / "bad.toml"
    bad.write_text("[http\nlisten=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad), {})


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [("127.0.0.1:8080", True), ("localhost:1", True), ("[::1]:80", True),
     ("unix:/run/x.sock", True), ("0.0.0.0:8080", False), ("192.0.2.5:80", False)],
)
def test_loopback_detection(listen: str, loopback: bool) -> None:
    parse_config({"http": {"listen": listen}})
    assert is_loopback_listen(listen) is loopback


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[[models]]\nname = "m"\npath = "/models/m.onnx"\n')
    assert main(["check-config", "--config", str(good)]) == 0
    assert "OK (1 model(s))" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text('[http]\nlisten = "nowhere"\n')
    assert main(["check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeagent: error: ") and "http.listen" in err
    assert "Traceback" not in err


def test_cache_path_is_systemds_cache_directory_else_the_state_dir() -> None:
    config = parse_config({})
    assert config.cache_path({"CACHE_DIRECTORY": "/var/cache/edgeagent"}) == Path(
        "/var/cache/edgeagent")
    assert config.cache_path({"STATE_DIRECTORY": "/var/lib/edgeagent"}) == Path(
        "/var/lib/edgeagent")
    assert config.cache_path({}) == Path("edgeagent-data")


def test_commands_warn_of_ignored_names_and_carry_on(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "EDGEAGENT_VENV": "/opt/edgeagent",
           "EDGEAGENT_AGENT__STATE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "edgeagent", "probe", "--json"], env=env,
                         capture_output=True, text=True, check=False, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "EDGEAGENT_VENV is not a configuration override" in out.stderr
    assert json.loads(out.stdout)["profile"]
