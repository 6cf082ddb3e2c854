"""``edgeagent install-service``: the systemd unit, a starting configuration, the service user.

The unit is ``Type=notify`` with ``ExecReload=/bin/kill -HUP $MAINPID``: it works on every
systemd a box may run (Type=notify-reload needs systemd 253; JetPack 6 ships 249), and the agent
sends RELOADING=1 / READY=1 around a reload either way. See docs/decisions.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from edgeagent.config import DEFAULT_CONFIG_PATH, AgentConfig, AgentSection, load_config
from edgeagent.errors import ConfigError, EdgeAgentError

log = logging.getLogger(__name__)

UNIT_PATH = Path("/etc/systemd/system/edgeagent.service")
DEFAULT_USER = "edgeagent"
#: Jetson and other GPUs are reached through device nodes owned by these groups.
GPU_GROUPS = ("video", "render")
#: Seconds systemd waits beyond the drain grace period before it kills the agent.
STOP_MARGIN_S = 15
WATCHDOG_SEC = 30
#: The unit's Documentation= (the project's README, as pyproject's Documentation URL says).
DOCS_URL = "https://github.com/edgeagent/edgeagent#readme"
#: Where the hardened unit cannot see: PrivateTmp= gives it its own /tmp and /var/tmp,
#: ProtectHome= hides /home, /root and /run/user.
HIDDEN_DIRS: dict[str, str] = {
    "/tmp": "PrivateTmp=yes", "/var/tmp": "PrivateTmp=yes",  # noqa: S108 - names, not files
    "/home": "ProtectHome=yes", "/root": "ProtectHome=yes", "/run/user": "ProtectHome=yes",
}
#: What to do instead, in every refusal.
INSTALL_FIX = ("install edgeagent into its own environment under /opt (sudo scripts/install.sh, "
               "or: sudo python3 -m venv /opt/edgeagent && sudo /opt/edgeagent/bin/pip install "
               "'edgeagent[cpu]') and run that one: sudo /opt/edgeagent/bin/edgeagent "
               "install-service")


def render_unit(exec_start: str, user: str = DEFAULT_USER,
                groups: tuple[str, ...] = GPU_GROUPS,
                shutdown_grace_s: float = AgentSection.shutdown_grace_s) -> str:
    """The text of ``edgeagent.service``.

    Args:
        exec_start: Absolute path of the ``edgeagent`` executable.
        user: The dedicated user the agent runs as.
        groups: Supplementary groups (GPU device access); only groups that exist on the box,
            because systemd refuses to start a unit naming a missing group.
        shutdown_grace_s: ``agent.shutdown_grace_s``; the stop timeout leaves a margin above it.
    """
    supplementary = f"SupplementaryGroups={' '.join(groups)}\n" if groups else ""
    stop_timeout = int(shutdown_grace_s + 0.999) + STOP_MARGIN_S
    return f"""\
# Written by 'edgeagent install-service'. Local changes belong in a drop-in
# (systemctl edit edgeagent), which survives re-running install-service.
[Unit]
Description=edgeagent edge inference runtime and device agent
Documentation={DOCS_URL}
Wants=network-online.target
After=network-online.target

[Service]
# The agent says READY=1 once HTTP serves and the configured models are loaded (or failed and
# reported); SIGHUP (systemctl reload) reloads the configuration.
Type=notify
NotifyAccess=main
ExecStart={exec_start} run
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5
# Exit status 2 is a bad configuration: restarting will not fix it.
RestartPreventExitStatus=2
# Open files: http.max_connections (4096) stays below this, with room for models and sockets.
LimitNOFILE=65536
# Pings stop when the event loop or an inference worker is stuck; systemd then restarts us.
WatchdogSec={WATCHDOG_SEC}
# Loading a model may build a TensorRT engine first, which takes minutes on small boards.
TimeoutStartSec=15min
# Requests in flight get agent.shutdown_grace_s ({shutdown_grace_s:g} s) to finish.
TimeoutStopSec={stop_timeout}

User={user}
Group={user}
{supplementary}# /var/lib/edgeagent (state_dir), /etc/edgeagent (read-only), /run/edgeagent, and
# /var/cache/edgeagent for what can be rebuilt (TensorRT engines; systemctl clean --what=cache).
StateDirectory=edgeagent
ConfigurationDirectory=edgeagent
RuntimeDirectory=edgeagent
CacheDirectory=edgeagent
UMask=0027

# Hardening: the whole file system is read-only except the directories above.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
# GPUs need /dev/nvidia*, /dev/nvhost-* (Jetson) and /dev/dri: no private /dev, no device list.
PrivateDevices=no
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# Other users' processes are invisible in /proc (the agent reads only its own and /proc/stat).
ProtectProc=invisible
# SysV IPC objects the service leaves are removed when it stops.
RemoveIPC=yes
SystemCallArchitectures=native
# The system calls of an ordinary service (no mount, reboot, swap, module, clock, raw I/O,
# ptrace); anything else fails with EPERM instead of killing the agent mid-inference.
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
CapabilityBoundingSet=
AmbientCapabilities=
# Not set on purpose: MemoryDenyWriteExecute (onnxruntime and TensorRT generate code at run
# time) and ProtectClock (it implies a device allow-list that hides the GPU).

[Install]
WantedBy=multi-user.target
"""


#: One comment per key of the starting configuration (keys without one get none).
_HELP: dict[str, str] = {
    "agent.device_id": "Device id on MQTT; empty = /etc/machine-id.",
    "agent.state_dir": "Models, hub metadata, telemetry spool; empty = $STATE_DIRECTORY "
                       "(/var/lib/edgeagent under systemd).",
    "agent.profile": "Device profile: auto, or a name from 'edgeagent probe'.",
    "agent.profiles_dir": "Extra directory of your own device profiles (*.toml).",
    "agent.tags": "Groups this device belongs to (group desired state on MQTT).",
    "agent.log_level": "debug, info, warning, error or critical (live on reload).",
    "agent.log_format": "auto (journald under systemd, text on a terminal), text or json.",
    "agent.shutdown_grace_s": "Seconds requests in flight get to finish on stop.",
    "http.listen": "HOST:PORT or unix:/run/edgeagent/api.sock; beyond loopback needs token_file.",
    "http.token_file": "File holding a bearer token (>= 16 characters), readable by edgeagent.",
    "http.max_request_bytes": "Largest request body; larger ones get 413.",
    "hub.url": "https://, http:// or file:// hub; empty = no hub (local path models only).",
    "hub.root": "The hub's trusted root.json ('edgeconvert hub init' printed it).",
    "hub.poll_interval_s": "Seconds between hub checks.",
    "hub.keep_versions": "Previous versions kept on disk per model, for rollback.",
    "hub.disk_budget_mb": "0 = no budget beyond the free space check.",
    "mqtt.url": "mqtt:// or mqtts:// broker; empty = telemetry is only spooled locally.",
    "mqtt.password_file": "File holding the broker password (keeps the secret out of this file).",
    "mqtt.telemetry_interval_s": "Seconds between telemetry messages.",
    "mqtt.reported_interval_s": "The reported state is re-published at least this often.",
    "metrics.listen": "A listener of its own for GET /metrics (HOST:PORT or unix:PATH), so a "
                      "remote Prometheus need not reach inference; empty = only on http.listen.",
    "metrics.token_file": "Bearer token for it (>= 16 characters); empty = http.token_file. "
                          "Beyond loopback one is required.",
}

_MODELS_EXAMPLE = """\
# Models to serve. A local file:
# [[models]]
# name = "detector"
# path = "/var/lib/edgeagent/local/detector.onnx"
# max_concurrency = 2
#
# or a model from the hub (needs [hub]):
# [[models]]
# name = "classifier"
# version = "latest"
"""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def render_config(config: AgentConfig | None = None) -> str:
    """A commented, valid configuration file spelling out every setting of ``config``.

    With no argument, the embedded defaults: loading the result gives the same settings as
    running with no file at all.
    """
    config = config or AgentConfig()
    out = [
        "# edgeagent configuration, written by 'edgeagent install-service' with the built-in",
        "# defaults spelled out. Check it with 'edgeagent check-config'; apply changes with",
        "# 'systemctl reload edgeagent' (log level and models change live; the rest is reported",
        "# and applied on 'systemctl restart edgeagent'). Any key can also be set from the",
        "# environment: EDGEAGENT_<SECTION>__<KEY>.",
    ]
    for f in dataclasses.fields(AgentConfig):
        section = getattr(config, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        out.append("")
        out.append(f"[{f.name}]")
        for key in dataclasses.fields(section):
            help_ = _HELP.get(f"{f.name}.{key.name}")
            if help_:
                out.append(f"# {help_}")
            out.append(f"{key.name} = {_toml_value(getattr(section, key.name))}")
    out.append("")
    out.append(_MODELS_EXAMPLE)
    return "\n".join(out)


def existing_groups(group_file: Path, wanted: tuple[str, ...] = GPU_GROUPS) -> tuple[str, ...]:
    """Those of ``wanted`` that ``group_file`` (an /etc/group) defines, in order."""
    try:
        names = {line.split(":", 1)[0] for line in group_file.read_text().splitlines()}
    except OSError:
        return ()
    return tuple(g for g in wanted if g in names)


def _hidden_by(path: str) -> str | None:
    """The hidden directory ``path`` lies under, or None."""
    for top in HIDDEN_DIRS:
        if path == top or path.startswith(top + "/"):
            return top
    return None


def _interpreter(script: Path) -> str | None:
    """The interpreter a ``#!`` script names (console scripts name their venv's python)."""
    try:
        with script.open("rb") as f:
            first = f.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    parts = first[2:].decode("utf-8", "replace").split()
    return parts[0] if parts else None


def check_reachable(exec_start: str, *, live: bool, package_dir: Path | None = None) -> None:
    """Refuse an ``ExecStart=`` the hardened unit could not run.

    Args:
        exec_start: The absolute ``edgeagent`` path the unit will name.
        live: The unit is for this system (prefix ``/``): follow symlinks, and check the
            interpreter the script names and where the package is installed too (a venv's
            python is a link to the Python it was made from, which may live under /root).
        package_dir: Where the ``edgeagent`` package of that executable is (live checks of
            this environment; an editable install points into its source tree).

    Raises:
        EdgeAgentError: naming the path, the directive that hides it and the fix.
    """
    if not exec_start.startswith("/"):
        raise EdgeAgentError(f"ExecStart= needs an absolute path, got {exec_start!r}")
    checks = [("the edgeagent executable", exec_start)]
    if live:
        script = Path(exec_start)
        checks.append(("the edgeagent executable", str(script.resolve())))
        interpreter = _interpreter(script)
        if interpreter:
            checks += [("its Python interpreter", interpreter),
                       ("its Python interpreter", str(Path(interpreter).resolve()))]
        if package_dir is not None:
            checks.append(("the edgeagent package", str(package_dir.resolve())))
    for what, path in checks:
        top = _hidden_by(path)
        if top is not None:
            raise EdgeAgentError(
                f"{what} is {path}, under {top}, which the service cannot see "
                f"({HIDDEN_DIRS[top]} in its hardened unit): the service would fail to start; "
                + INSTALL_FIX)


def edgeagent_executable() -> str:
    """Absolute path of the ``edgeagent`` script of the Python environment running now."""
    beside = Path(sys.executable).parent / "edgeagent"
    if beside.is_file():
        return str(beside.absolute())
    found = shutil.which("edgeagent")
    if found:
        return str(Path(found).absolute())
    raise EdgeAgentError(
        f"no edgeagent executable next to {sys.executable} or on PATH; "
        "install the package (pip install edgeagent) into the environment systemd will run"
    )


@dataclass(frozen=True)
class InstallPlan:
    """What ``install-service`` writes and does."""

    unit_path: Path
    unit: str
    config_path: Path
    config: str | None
    """None: a configuration exists already and is kept."""
    user: str
    create_user: bool


def plan_install(prefix: Path, user: str, exec_start: str) -> InstallPlan:
    """Decide what to write under ``prefix`` (``/`` for real); reads, writes nothing.

    Raises:
        ConfigError: an existing configuration file is not valid (its shutdown grace period
            sets the unit's stop timeout, so it must be readable).
    """
    if not user or not all(c.isalnum() or c in "-_." for c in user) or user[0] == "-":
        raise ConfigError(f"{user!r} is not a valid user name", "--user")
    unit_path = prefix / UNIT_PATH.relative_to("/")
    config_path = prefix / DEFAULT_CONFIG_PATH.relative_to("/")
    grace = AgentSection.shutdown_grace_s
    config_text: str | None = render_config()
    if config_path.exists():
        config_text = None
        grace = load_config(str(config_path), {}).agent.shutdown_grace_s
    unit = render_unit(exec_start, user, existing_groups(prefix / "etc/group"), grace)
    create_user = prefix == Path("/") and not _user_exists(user)
    return InstallPlan(unit_path, unit, config_path, config_text, user, create_user)


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _write_atomic(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def install_service(prefix: Path, user: str, dry_run: bool, out: IO[str],
                    exec_start: str | None = None) -> InstallPlan:
    """Write the unit and (if absent) the starting configuration; create the user.

    Args:
        prefix: Root of the paths written (``/`` for real; a directory in tests). User creation
            is skipped under any other prefix.
        user: The dedicated service user.
        dry_run: Print what would be written and done, change nothing.
        out: Where to print.
        exec_start: The ``edgeagent`` executable; default the one of this environment.

    Raises:
        EdgeAgentError: a file cannot be written or the user cannot be created.
    """
    live = prefix == Path("/")
    if exec_start is None:
        exec_start = edgeagent_executable()
        check_reachable(exec_start, live=live,
                        package_dir=Path(__file__).resolve().parent.parent if live else None)
    else:
        check_reachable(exec_start, live=live)
    plan = plan_install(prefix, user, exec_start)
    if dry_run:
        print(f"# would write {plan.unit_path}", file=out)
        print(plan.unit, file=out)
        if plan.config is None:
            print(f"# would keep the existing {plan.config_path}", file=out)
        else:
            print(f"# would write {plan.config_path}", file=out)
            print(plan.config, file=out)
        if plan.create_user:
            print(f"# would run: useradd --system ... {plan.user}", file=out)
        return plan
    if plan.create_user:
        _create_user(plan.user)
    try:
        _write_atomic(plan.unit_path, plan.unit, 0o644)
        print(f"wrote {plan.unit_path}", file=out)
        if plan.config is None:
            print(f"kept the existing {plan.config_path}", file=out)
        else:
            # World-readable so the service user reads it; secrets live in their own files.
            _write_atomic(plan.config_path, plan.config, 0o644)
            print(f"wrote {plan.config_path}", file=out)
    except OSError as exc:
        raise EdgeAgentError(
            f"cannot write {exc.filename}: {exc.strerror} (run as root, e.g. with sudo)"
        ) from exc
    if prefix == Path("/"):
        print("next: systemctl daemon-reload && systemctl enable --now edgeagent", file=out)
    return plan


def _create_user(user: str) -> None:
    cmd = ["useradd", "--system", "--user-group", "--no-create-home",
           "--home-dir", "/var/lib/edgeagent", "--shell", "/usr/sbin/nologin", user]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise EdgeAgentError("useradd not found; create the service user by hand") from exc
    except subprocess.CalledProcessError as exc:
        raise EdgeAgentError(
            f"useradd failed ({exc.stderr.strip() or exc.returncode}); run as root, or create "
            f"the user {user!r} by hand"
        ) from exc
    log.info("created system user %s", user)
