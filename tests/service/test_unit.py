"""install-service: the unit, the starting configuration, never overwriting a configuration."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent.cli import main
from edgeagent.config import AgentConfig, load_config
from edgeagent.errors import ConfigError, EdgeAgentError
from edgeagent.service.unit import (
    DOCS_URL,
    check_reachable,
    existing_groups,
    install_service,
    render_config,
    render_unit,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Where the installer puts the agent (any path the hardened unit can reach).
EXECUTABLE = Path("/opt/edgeagent/bin/edgeagent")
#: An executable that exists on every test box, outside /tmp and /home: systemd-analyze verify
#: checks that ExecStart exists (a checkout's own venv may sit under /home, which the unit hides).
EXISTING = Path(shutil.which("true") or "/bin/true")


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
    assert d["SystemCallFilter"] == "@system-service"
    assert d["SystemCallErrorNumber"] == "EPERM"
    assert d["ProtectProc"] == "invisible"
    assert d["RemoveIPC"] == "yes"
    assert d["CacheDirectory"] == "edgeagent"
    assert d["Documentation"].startswith("https://")
    assert d["LimitNOFILE"] == "65536"  # the connection cap stays below it


def test_documentation_is_the_projects() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["urls"]["Documentation"] == DOCS_URL


@pytest.mark.parametrize(("exec_start", "hidden", "directive"), [
    ("/tmp/venv/bin/edgeagent", "/tmp", "PrivateTmp=yes"),
    ("/var/tmp/e/bin/edgeagent", "/var/tmp", "PrivateTmp=yes"),
    ("/home/pi/.venv/bin/edgeagent", "/home", "ProtectHome=yes"),
    ("/root/.local/bin/edgeagent", "/root", "ProtectHome=yes"),
    ("/run/user/1000/edgeagent", "/run/user", "ProtectHome=yes"),
])
def test_install_service_refuses_what_the_unit_cannot_reach(
        tmp_path: Path, exec_start: str, hidden: str, directive: str) -> None:
    for prefix in (tmp_path, Path("/")):  # "/" with dry_run: refused before anything is read
        with pytest.raises(EdgeAgentError) as info:
            install_service(prefix, "edgeagent", prefix == Path("/"), io.StringIO(), exec_start)
        text = str(info.value)
        assert f"the edgeagent executable is {exec_start}, under {hidden}" in text
        assert directive in text and "/opt/edgeagent" in text and "scripts/install.sh" in text
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_reachability_follows_links_and_the_interpreter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the live system a script outside the hidden directories can still need one: its
    symlink target, the python its #! names (a venv's python links to the Python it was made
    from), or the package of an editable install."""
    home = tmp_path / "home"
    monkeypatch.setattr("edgeagent.service.unit.HIDDEN_DIRS", {str(home): "ProtectHome=yes"})
    (home / "pi/bin").mkdir(parents=True)
    opt = tmp_path / "opt/bin"
    opt.mkdir(parents=True)
    fine = opt / "edgeagent"
    fine.write_text(f"#!{opt / 'python'}\n")
    check_reachable(str(fine), live=True)
    linked = opt / "linked"
    linked.symlink_to(home / "pi/bin/edgeagent")
    with pytest.raises(EdgeAgentError,
                       match=r"the edgeagent executable is .*/home/pi/bin/edgeagent"):
        check_reachable(str(linked), live=True)
    check_reachable(str(linked), live=False)  # under a prefix: the path as written
    python = home / "pi/python3.12"
    python.write_text("")
    (opt / "python").symlink_to(python)
    with pytest.raises(EdgeAgentError, match=r"its Python interpreter is .*/home/pi/python3\.12"):
        check_reachable(str(fine), live=True)
    (opt / "python").unlink()
    with pytest.raises(EdgeAgentError, match=r"the edgeagent package is .*/home/pi"):
        check_reachable(str(fine), live=True, package_dir=home / "pi")


def test_cli_names_the_fix(monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("edgeagent.service.unit.edgeagent_executable",
                        lambda: "/home/me/src/edgeagent/.venv/bin/edgeagent")
    assert main(["install-service", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "under /home, which the service cannot see (ProtectHome=yes" in err
    assert "sudo /opt/edgeagent/bin/edgeagent install-service" in err


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
    # --exec: the test environment's own edgeagent may live under /tmp (a fresh clone), which
    # the hardened unit could not reach: install-service would rightly refuse it.
    assert main(["install-service", "--dry-run", "--prefix", str(tmp_path), "--user", "ai",
                 "--exec", str(EXECUTABLE)]) == 0
    out = capsys.readouterr().out
    assert "# would write " + str(tmp_path / "etc/systemd/system/edgeagent.service") in out
    assert "User=ai" in out
    assert "[agent]" in out
    assert list(tmp_path.iterdir()) == []


def test_bad_user_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install-service", "--prefix", str(tmp_path), "--user=-x",
                 "--exec", str(EXECUTABLE)]) == 2
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
    install_service(tmp_path, "edgeagent", False, io.StringIO(), str(EXISTING))
    unit = tmp_path / "etc/systemd/system/edgeagent.service"
    result = subprocess.run(["systemd-analyze", "verify", str(unit)],  # on PATH
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # unknown keys are only warned about


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed here")
def test_unit_exposure_stays_below_what_it_was(tmp_path: Path) -> None:
    """`systemd-analyze security` scored the unit 3.7 before issue 15; it must stay lower."""
    install_service(tmp_path, "edgeagent", False, io.StringIO(), str(EXISTING))
    unit = tmp_path / "etc/systemd/system/edgeagent.service"
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                            capture_output=True, text=True, timeout=120, check=False)
    if "--offline" in result.stderr:
        pytest.skip("this systemd-analyze cannot score a unit file offline (systemd < 250)")
    match = re.search(r"Overall exposure level for edgeagent\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) < 3.7
