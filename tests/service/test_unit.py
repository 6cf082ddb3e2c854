"""install-service: the unit, the starting configuration, never overwriting a configuration."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent.cli import main
from edgeagent.config import AgentConfig, load_config
from edgeagent.errors import ConfigError
from edgeagent.service.unit import existing_groups, install_service, render_config, render_unit

#: The real console script of this environment: systemd-analyze checks that ExecStart exists.
EXECUTABLE = Path(sys.executable).parent / "edgeagent"


def _directives(unit: str) -> dict[str, str]:
    out = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def test_unit_directives() -> None:
    d = _directives(render_unit("/usr/bin/edgeagent", "edge", ("video", "render"), 10.0))
    assert d["Type"] == "notify"
    assert d["ExecStart"] == "/usr/bin/edgeagent run"
    assert d["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert d["Restart"] == "on-failure"
    assert d["WatchdogSec"] == "30"
    assert d["User"] == "edge"
    assert d["SupplementaryGroups"] == "video render"
    assert int(d["TimeoutStopSec"]) > 10
    for key in ("StateDirectory", "ConfigurationDirectory", "RuntimeDirectory"):
        assert d[key] == "edgeagent"
    assert d["ProtectSystem"] == "strict"
    assert d["CapabilityBoundingSet"] == ""
    assert d["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6 AF_NETLINK"
    assert d["PrivateDevices"] == "no"
    assert "MemoryDenyWriteExecute" not in d
    assert "ProtectClock" not in d


def test_no_groups_no_line() -> None:
    assert "SupplementaryGroups" not in render_unit("/usr/bin/edgeagent", groups=())


def test_starting_config_is_valid_and_spells_out_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(render_config())
    config = load_config(str(path), {})
    assert config == AgentConfig(source=str(path))
    assert "[[models]]" in path.read_text()  # the example, commented out


def test_existing_groups(tmp_path: Path) -> None:
    group = tmp_path / "group"
    group.write_text("root:x:0:\nrender:x:105:\nvideo:x:44:pi\n")
    assert existing_groups(group) == ("video", "render")
    assert existing_groups(tmp_path / "missing") == ()


def test_install_writes_unit_and_config_then_keeps_the_config(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/group").write_text("video:x:44:\n")
    out = io.StringIO()
    plan = install_service(tmp_path, "edgeagent", False, out, str(EXECUTABLE))
    assert not plan.create_user  # never under a prefix
    unit = (tmp_path / "etc/systemd/system/edgeagent.service").read_text()
    assert f"ExecStart={EXECUTABLE} run" in unit
    assert "SupplementaryGroups=video\n" in unit
    config = tmp_path / "etc/edgeagent/agent.toml"
    assert load_config(str(config), {}).http.listen == "127.0.0.1:8080"

    config.write_text('[agent]\nshutdown_grace_s = 40\n')
    out = io.StringIO()
    install_service(tmp_path, "edgeagent", False, out, str(EXECUTABLE))
    assert config.read_text() == '[agent]\nshutdown_grace_s = 40\n'
    assert "kept the existing" in out.getvalue()
    unit = (tmp_path / "etc/systemd/system/edgeagent.service").read_text()
    assert "TimeoutStopSec=55" in unit  # the operator's grace period plus the margin


def test_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install-service", "--dry-run", "--prefix", str(tmp_path), "--user", "ai"]) == 0
    out = capsys.readouterr().out
    assert "# would write " + str(tmp_path / "etc/systemd/system/edgeagent.service") in out
    assert "User=ai" in out
    assert "[agent]" in out
    assert list(tmp_path.iterdir()) == []


def test_bad_user_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install-service", "--prefix", str(tmp_path), "--user=-x"]) == 2
    assert "--user: '-x' is not a valid user name" in capsys.readouterr().err


def test_invalid_existing_config_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "etc/edgeagent/agent.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[agent]\nshutdown_grace_s = -1\n")
    with pytest.raises(ConfigError, match=r"agent\.shutdown_grace_s"):
        install_service(tmp_path, "edgeagent", False, io.StringIO(), str(EXECUTABLE))
    assert not (tmp_path / "etc/systemd").exists()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed here")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert EXECUTABLE.is_file(), "the package's console script is not installed in this venv"
    install_service(tmp_path, "edgeagent", False, io.StringIO(), str(EXECUTABLE))
    unit = tmp_path / "etc/systemd/system/edgeagent.service"
    result = subprocess.run(["systemd-analyze", "verify", str(unit)],  # on PATH
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # unknown keys are only warned about
