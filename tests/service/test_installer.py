"""scripts/install.sh: a venv of its own, the unit written against it, a starting config, the
system Python left alone. Installed into a temporary root (the unit names the venv as the
target sees it); tests/service/test_installer_debian.py does it in a fresh Debian 12 root."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from edgeagent.config import load_config

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install.sh"


def _run(*args: str, env: dict[str, str] | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True,
                          timeout=timeout, check=False,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def _installed() -> set[str]:
    return {f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()}


def test_install_into_a_temporary_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    prefix = root / "opt" / "edgeagent"
    before = _installed()
    result = _run("--root", str(root), "--prefix", str(prefix), "--source", str(REPO),
                  "--extras", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"making a virtual environment in {prefix}" in result.stdout
    # The venv: its own Python, the agent, exactly one onnxruntime build, no onnx.
    edgeagent = prefix / "bin" / "edgeagent"
    assert (prefix / "pyvenv.cfg").is_file() and edgeagent.is_file()
    pip_list = subprocess.run([str(prefix / "bin" / "python"), "-m", "pip", "list",
                               "--format=freeze"], capture_output=True, text=True, check=True)
    names = {line.split("==")[0].lower() for line in pip_list.stdout.splitlines()}
    assert {"edgeagent", "onnxruntime"} <= names
    assert not names & {"onnxruntime-gpu", "onnx"}
    # The unit runs the venv's edgeagent, as the target system sees it.
    unit = (root / "etc/systemd/system/edgeagent.service").read_text()
    assert "ExecStart=/opt/edgeagent/bin/edgeagent run\n" in unit
    assert "User=edgeagent\n" in unit
    # A starting configuration the venv's own agent accepts.
    config = root / "etc/edgeagent/agent.toml"
    check = subprocess.run([str(edgeagent), "check-config", "--config", str(config)],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    assert load_config(str(config), {}).http.listen == "127.0.0.1:8080"
    # The Python that ran the installer got nothing new.
    assert _installed() == before

    # Again: the venv is upgraded in place, the operator's configuration kept.
    config.write_text('[agent]\nlog_level = "debug"\n')
    again = _run("--root", str(root), "--prefix", str(prefix), "--source", str(REPO),
                 "--extras", "cpu", "--pip-arg=--no-deps")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "upgrading the virtual environment" in again.stdout
    assert "kept the existing" in again.stdout
    assert config.read_text() == '[agent]\nlog_level = "debug"\n'


@pytest.mark.parametrize(("args", "message"), [
    (["--extras", "cpu,litert,gpu"], "names both cpu and gpu"),
    (["--prefix", "opt/edgeagent"], "--prefix must be an absolute path"),
    (["--root", "rel"], "--root must be an absolute path"),
    (["--frobnicate"], "unknown option --frobnicate"),
    (["--source", ".", "--version", "1.0"], "--version applies to the default source only"),
])
def test_bad_options_are_refused_before_anything_is_made(tmp_path: Path, args: list[str],
                                                         message: str) -> None:
    result = _run("--root", str(tmp_path), "--prefix", str(tmp_path / "venv"), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_python_too_old_is_named(tmp_path: Path) -> None:
    old = tmp_path / "python3.9"
    old.write_text("#!/bin/sh\nexit 1\n")
    old.chmod(0o755)
    result = _run("--root", str(tmp_path), "--prefix", str(tmp_path / "venv"),
                  env={"PYTHON": str(old)})
    assert result.returncode == 2
    assert "needs Python 3.10 or newer" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_prefix_outside_the_root_is_refused(tmp_path: Path) -> None:
    result = _run("--root", str(tmp_path / "root"), "--prefix", str(tmp_path / "venv"),
                  "--source", str(REPO), "--extras", "cpu", "--pip-arg=--no-deps")
    assert result.returncode == 2
    assert "is not under --root" in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="runs as root here")
def test_the_real_root_needs_root(tmp_path: Path) -> None:
    result = _run("--prefix", str(tmp_path / "venv"))
    assert result.returncode == 2
    assert "run as root" in result.stderr
