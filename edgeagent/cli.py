"""The ``edgeagent`` command line.

Exit status: 0 on success, 2 on bad usage or bad configuration, 1 on any other failure. Errors
print one line naming the cause and what to do, never a bare traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeagent import __version__
from edgeagent.config import AgentConfig, ModelSection, load_config
from edgeagent.errors import EdgeAgentError

log = logging.getLogger("edgeagent")

#: Completion hints for shtab (``edgeagent completion``): plain data, so building the parser
#: for ``edgeagent run`` does not import shtab.
FILE = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}
DIRECTORY = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/", "tcsh": "d"}


def _load(args: argparse.Namespace, warn: bool = True) -> AgentConfig:
    config = load_config(args.config, os.environ)
    if warn:
        for name in config.ignored_env:
            log.warning("%s is not a configuration override (EDGEAGENT_<SECTION>__<KEY>); "
                        "ignored", name)
    return config


def cmd_run(args: argparse.Namespace) -> int:
    from edgeagent.runtime.memory import limit_malloc_arenas

    limit_malloc_arenas(os.environ)  # before any thread of the agent exists
    from edgeagent.app import Agent
    from edgeagent.service.lifecycle import Service, run_loop
    from edgeagent.service.logs import setup_logging
    from edgeagent.service.notify import Notifier

    def apply_logging(config: AgentConfig) -> None:
        # Command-line options win over the file, on start and on every reload.
        setup_logging(args.log_level or config.agent.log_level,
                      args.log_format or config.agent.log_format, os.environ)

    config = _load(args)
    apply_logging(config)
    agent = Agent(config, os.environ)
    service = Service(agent, Notifier(os.environ), lambda: _load(args), apply_logging, os.environ)
    run_loop(service.run())
    return 0


def cmd_install_service(args: argparse.Namespace) -> int:
    from edgeagent.service.unit import install_service

    install_service(Path(args.prefix), args.user, args.dry_run, sys.stdout,
                    exec_start=args.exec_start)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from edgeagent.config import read_token
    from edgeagent.errors import ConfigError

    try:
        config = _load(args, warn=False)
        # What `run` refuses at start-up beyond the file itself: a listen address reachable
        # from other hosts without a token, a token file that is missing or too short.
        try:
            read_token(config)
        except ConfigError as exc:
            if exc.source:
                raise
            raise ConfigError(exc.message, exc.key_path, config.source) from None
    except ConfigError as exc:
        if not args.json:
            raise
        print(json.dumps({"ok": False, "error": str(exc), "key": exc.key_path,
                          "source": exc.source}, indent=2, sort_keys=True))
        return exc.exit_code
    if args.json:
        print(json.dumps({"ok": True, "source": config.source, "models": len(config.models),
                          "ignored_env": list(config.ignored_env),
                          "config": _config_document(config)}, indent=2, sort_keys=True))
        return 0
    for name in config.ignored_env:
        print(f"warning: {name} is not a configuration override "
              "(EDGEAGENT_<SECTION>__<KEY>); ignored", file=sys.stderr)
    print(f"{config.source}: OK ({len(config.models)} model(s))")
    return 0


def _config_document(config: AgentConfig) -> dict[str, Any]:
    """The validated settings, as ``check-config --json`` shows them (sections, models)."""
    import dataclasses

    doc: dict[str, Any] = {f.name: dataclasses.asdict(getattr(config, f.name))
           for f in dataclasses.fields(config)
           if dataclasses.is_dataclass(getattr(config, f.name))}
    doc["models"] = [dataclasses.asdict(m) for m in config.models]
    return doc


def cmd_completion(args: argparse.Namespace) -> int:
    """Print a shell completion script generated from this parser (shtab)."""
    import shtab

    print(shtab.complete(build_parser(full=True), args.shell))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from edgeagent.device.probe import format_probe_text, probe_report

    config = _load(args)
    forced = args.profile or (None if config.agent.profile == "auto" else config.agent.profile)
    profiles_dir = Path(config.agent.profiles_dir) if config.agent.profiles_dir else None
    from edgeagent.demo import demo_config

    state_dir = config.state_path(os.environ)
    config = demo_config(config, state_dir.resolve())
    hub_models = [m.name for m in config.models if m.version is not None] if config.hub.url else []
    hub_variants = None
    if hub_models:
        def hub_variants(profile: Any, facts: Any) -> list[dict[str, Any]]:
            # Only with hub models configured: the hub side stays unloaded otherwise.
            from edgeagent.hub.source import profile_chooser, stored_variant_choices
            from edgeagent.versions.history import History, StateError

            try:
                state = History(state_dir).read()
                active = {n: state.models[n].active for n in hub_models if n in state.models}
            except StateError:
                active = {}
            return stored_variant_choices(state_dir, hub_models,
                                          profile_chooser(profile, facts), active)

    report = probe_report(Path(args.root), forced, state_dir, profiles_dir=profiles_dir,
                          hub_variants=hub_variants, cache_dir=config.cache_path(os.environ),
                          models=model_overrides(config.models))
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(format_probe_text(report))
    return 0


def model_overrides(models: Sequence[ModelSection]) -> list[Any]:
    """What ``probe`` shows of the models that override the profile (or are tuned)."""
    from edgeagent.device.plan import PlanOverrides
    from edgeagent.device.probe import ModelOverrides

    return [ModelOverrides(m.name, "tflite" if m.path.endswith(".tflite") else "onnx",
                           PlanOverrides(m.providers, m.threads), m.precision, m.variant,
                           m.tune.enabled)
            for m in models
            if m.providers or m.precision or m.variant or m.threads is not None
            or m.tune.enabled]


def _api_get(config: AgentConfig, path: str) -> Any:
    import httpx

    from edgeagent.localapi import local_client

    try:
        with local_client(config, timeout=10) as client:
            response = client.get(path)
    except httpx.HTTPError as exc:
        raise EdgeAgentError(
            f"cannot reach the agent at {config.http.listen} ({exc}); is it running? "
            "(systemctl status edgeagent)") from exc
    if response.status_code != 200:
        raise EdgeAgentError(f"the agent answered {response.status_code}: {response.text.strip()}")
    return response.json()


def _ago(ts: float | None) -> str:
    return "never" if not ts else f"{max(0.0, time.time() - ts):.0f} s ago"


def _hub_lines(hub: dict[str, Any]) -> list[str]:
    """The hub part of ``edgeagent status``, for a person."""
    if not hub.get("configured"):
        return ["hub       not configured"]
    lines = [f"hub       {hub.get('state', '?')}  {hub.get('url', '')}  last sync "
             f"{_ago(hub.get('last_sync'))}, next in {hub.get('next_sync_s') or 0:.0f} s"]
    if hub.get("last_error"):
        lines.append(f"          error: {hub['last_error']}")
    releases = hub.get("releases") or {}
    if releases:
        lines.append("          releases: " + "; ".join(
            f"{n} {', '.join(map(str, v))}" for n, v in sorted(releases.items())))
    return lines


def _mqtt_lines(mqtt: dict[str, Any]) -> list[str]:
    """The broker part of ``edgeagent status``, for a person."""
    if not mqtt.get("configured"):
        return ["mqtt      not configured"]
    spool = mqtt.get("spool") or {}
    state = "connected" if mqtt.get("connected") else "not connected"
    lines = [f"mqtt      {state} to {mqtt.get('broker')}  spool {spool.get('depth', 0)} "
             f"message(s) waiting, {spool.get('dropped', 0)} dropped"]
    if mqtt.get("last_error"):
        lines.append(f"          last error: {mqtt['last_error']}")
    desired = mqtt.get("desired") or {}
    if desired.get("state") not in (None, "none"):
        line = f"          desired state: {desired['state']}"
        if desired.get("error"):
            line += f" ({desired['error']})"
        lines.append(line)
    return lines


def _model_line(m: dict[str, Any]) -> str:
    """One model in ``edgeagent status``, for a person."""
    line = f"  {m['name']:<20} {m['state']:<9}"
    if "version" in m:
        line += f" v{m['version']} {m['format']}/{m['precision']} on {m['provider']}"
    if m.get("fallback"):
        line += f" (fell back: {m['fallback']})"
    if m.get("source"):
        line += f"  [{m['source']}]"
    if m.get("target") is not None and m.get("target") != m.get("version"):
        line += f"; target v{m['target']}"
    if m.get("blocked"):
        line += f"; {m['blocked']}"
    tuning = m.get("tuning") or {}
    if tuning.get("state") == "running":
        run = tuning.get("running") or {}
        line += f"; tuning {run.get('done', 0)}/{run.get('total', '?')}"
    if tuning.get("chosen"):
        margin = tuning.get("margin")
        line += f"; tuned: {tuning['chosen']}" + (
            f" ({margin:.2f}x the default's {tuning.get('objective')})" if margin else "")
    if tuning.get("error"):
        line += f"; {tuning['error']}"
    if m.get("overrides"):
        o = m["overrides"]
        said = [f"providers {', '.join(o['providers'])}" if o.get("providers") else "",
                f"precision {o['precision']}" if o.get("precision") else "",
                f"variant {o['variant']}" if o.get("variant") else "",
                f"threads {o['threads']}" if o.get("threads") is not None else ""]
        line += f"; overrides: {', '.join(x for x in said if x)}"
    sched = m.get("scheduling") or {}
    if sched.get("batching", "off") != "off":
        line += f"; batching {sched['batching']} (max {sched['max_batch_size']})"
    if m.get("last_error"):
        line += f"  error: {m['last_error']}"
    return line


def cmd_status(args: argparse.Namespace) -> int:
    status = _api_get(_load(args), "/v1/agent/status")
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    prof = status.get("profile") or {}
    print(f"edgeagent {status['version']}  device {status['device_id']}  "
          f"up {status['uptime_s']:.0f} s")
    print(f"profile   {prof.get('name')}  ({prof.get('reason')})")
    print(f"http      {status['http']['listen']}"
          f"{'  (token required)' if status['http'].get('token') else ''}")
    grpc = (status.get("grpc") or {}).get("listen")
    print(f"grpc      {grpc or 'off'}")
    if status.get("admin_socket"):
        print(f"admin     {status['admin_socket']}  (the operator's commands; no token)")
    for line in _hub_lines(status.get("hub") or {}) + _mqtt_lines(status.get("mqtt") or {}):
        print(line)
    print("models:")
    for m in status["models"]:
        print(_model_line(m))
    return 0


#: Commands whose parsers are built here; the others' come from modules that import the hub
#: stack (tuf, httpx) or paho, which ``edgeagent run`` on a box without them never needs.
_CORE_COMMANDS = ("run", "install-service", "check-config", "probe", "status")


def build_parser(full: bool = True) -> argparse.ArgumentParser:
    """The ``edgeagent`` parser; ``full=False`` leaves out the hub and fleet commands."""
    parser = argparse.ArgumentParser(
        prog="edgeagent", description="Edge inference runtime and device agent.")
    parser.add_argument("--version", action="version", version=f"edgeagent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Any, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=fn)
        config = p.add_argument("--config", help="configuration file (default "
                                "/etc/edgeagent/agent.toml, or $EDGEAGENT_CONFIG)")
        config.complete = FILE  # type: ignore[attr-defined]
        return p

    p = add("run", cmd_run, "run the agent in the foreground (what systemd runs)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["auto", "text", "json"],
                   help="auto: journald-friendly under systemd, text on a terminal")
    p = sub.add_parser("install-service", help="write the systemd unit and a starting config",
                       description="Write /etc/systemd/system/edgeagent.service and (unless one "
                                   "exists) /etc/edgeagent/agent.toml; create the service user.")
    p.set_defaults(func=cmd_install_service)
    p.add_argument("--user", default="edgeagent", help="the user the service runs as")
    p.add_argument("--dry-run", action="store_true", help="print what would be written")
    p.add_argument("--prefix", default="/",
                   help="root of the paths written (for tests and images); skips user creation"
                   ).complete = DIRECTORY  # type: ignore[attr-defined]
    p.add_argument("--exec", dest="exec_start", metavar="PATH",
                   help="the edgeagent the unit runs (default: this one); with --prefix, the "
                        "path as the target system sees it").complete = FILE  # type: ignore[attr-defined]
    p = add("check-config", cmd_check_config, "validate a configuration file")
    p.add_argument("--json", action="store_true",
                   help="machine-readable output (the settings, or the error with its key)")
    p = add("probe", cmd_probe, "show device facts, the chosen profile and the provider plans")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--root", default="/", help="read device facts under this directory"
                   ).complete = DIRECTORY  # type: ignore[attr-defined]
    p.add_argument("--profile", help="force a device profile by name")
    p = add("status", cmd_status, "ask the running agent for its state")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("completion", help="print a bash or zsh completion script",
                       description="Print a completion script for bash or zsh, e.g. "
                                   "'edgeagent completion bash > /usr/share/bash-completion/"
                                   "completions/edgeagent' or 'edgeagent completion zsh > "
                                   "/usr/local/share/zsh/site-functions/_edgeagent'.")
    p.set_defaults(func=cmd_completion)
    p.add_argument("shell", choices=["bash", "zsh"])
    if not full:
        return parser
    from edgeagent.admin import add_admin_commands

    add_admin_commands(add)
    from edgeagent.fleet.cli import add_fleet_parser

    add_fleet_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgeagent`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(full=not argv or argv[0] not in _CORE_COMMANDS)
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # here, so a closed pipe is caught below, not at exit
    except EdgeAgentError as exc:
        print(f"edgeagent: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`edgeagent status | head`): not an error of ours. Point stdout
        # at /dev/null so the interpreter's last flush does not fail again (Python's own
        # recipe, docs of the signal module), and exit as a tool killed by SIGPIPE does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
