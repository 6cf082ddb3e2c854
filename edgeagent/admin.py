"""The operator's commands on the box: ``edgeagent pull``, ``rollback``, ``models``, ``tune``.

While the agent runs, each command asks it over the local admin channel (a Unix socket whose
permissions authorise; :mod:`edgeagent.localapi`) and the agent's version owner does the work:
nothing is written by the command, and nothing is pinned before the agent accepted the version.
While the agent is stopped, the command changes the state the agent reads at start (the history
in ``state_dir/versions.json``; ``pull`` also downloads and verifies into the store, with a
progress bar) and says so.

``pull NAME@V`` pins V (the operator's pin wins over the fleet and the configuration, and is
reported to the fleet as such); ``pull NAME`` clears the pin: the model follows the fleet's
documents, else the configuration (``latest`` = the hub's newest) again; ``rollback NAME``
pins the newest kept previous version.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from edgeagent.config import AgentConfig, ModelSection, config_dir, load_config
from edgeagent.demo import demo_config
from edgeagent.errors import ConfigError, EdgeAgentError, HubError, ModelNotFound
from edgeagent.localapi import agent_running, local_client
from edgeagent.versions.history import History, VersionState

AddCommand = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def add_admin_commands(add: AddCommand) -> None:
    """Register ``pull``, ``rollback`` and ``models`` with the ``edgeagent`` parser."""
    p = add("pull", cmd_pull, "use a model version (NAME@V pins it; NAME follows the fleet or "
                              "the configuration again)")
    p.add_argument("model", metavar="NAME[@VERSION]")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("rollback", cmd_rollback, "go back to the previous version of a model, and pin it")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("models", cmd_models, "list the models, their versions and what decided each")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("tune", cmd_tune, "tune a model on this box now (variants, providers, threads, "
                              "batch sizes) and switch the best one in")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _config(args: argparse.Namespace) -> AgentConfig:
    loaded = load_config(args.config, os.environ)
    # Embedded defaults serve the demo hub: the operator commands work on it too.
    return demo_config(loaded, loaded.state_path(os.environ).resolve())


def _section(config: AgentConfig, name: str) -> ModelSection:
    section = config.model(name)
    if section is None:
        known = ", ".join(m.name for m in config.models) or "none"
        raise ModelNotFound(f"unknown model {name!r}: not in {config.source} (known: {known})")
    return section


def _ask(config: AgentConfig, method: str, path: str, body: Any = None) -> Any:
    """One request to the running agent; its error in words."""
    try:
        with local_client(config, timeout=900) as client:
            response = client.request(method, path, json=body)
    except httpx.HTTPError as exc:
        raise EdgeAgentError(f"cannot reach the agent ({exc})") from exc
    if response.status_code in (401, 403):
        raise EdgeAgentError(
            f"the agent refused ({response.status_code}): run this command as root or as a "
            "member of the agent's group (the admin socket's group), or set http.token_file")
    try:
        doc = response.json()
    except ValueError:
        doc = {"error": response.text.strip()}
    if response.status_code != 200:
        raise EdgeAgentError(str(doc.get("error", doc)))
    return doc


def _print(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else text)


def _stored(config: AgentConfig, section: ModelSection) -> list[int]:
    """Versions on disk (the agent stopped): the hub store's, or the kept local copies."""
    state_dir = config.state_path(os.environ)
    folder = state_dir / ("local" if section.path else "hub/models") / section.name
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _describe(m: dict[str, Any]) -> str:
    line = f"{m['name']}: serving {m.get('serving') or 'nothing'}"
    if "stored" in m:
        line += f"; stored {', '.join(map(str, m['stored'])) or 'nothing'}"
    line += f" ({m.get('source')})" if m.get("source") else ""
    if m.get("target") is not None and m.get("target") != m.get("serving"):
        line += f"; target {m['target']}"
    if m.get("previous"):
        line += f"; previous {', '.join(str(v) for v in m['previous'])}"
    for version, why in sorted((m.get("failed") or {}).items()):
        line += f"; v{version} failed here: {why}"
    if m.get("error"):
        line += f"; {m['error']}"
    return line


def cmd_pull(args: argparse.Namespace) -> int:
    config = _config(args)
    name, _, wanted = args.model.partition("@")
    if wanted and not (wanted.isascii() and wanted.isdigit() and len(wanted) < 19
                       and int(wanted) >= 1):
        raise ConfigError(f"expected NAME or NAME@VERSION (an integer >= 1), got {args.model!r}")
    section = _section(config, name)
    version = int(wanted) if wanted else None
    if agent_running(config):
        doc = _ask(config, "POST", f"/v1/agent/models/{name}/pull", {"version": version})
        verb = f"pinned to version {version}" if version else "following "
        if version is None:
            verb += "the fleet or the configuration again"
        _print(args, {**doc, "agent": "running"},
               f"{name}: {verb}; the running agent serves version {doc.get('serving')} "
               f"({doc.get('source')})")
        return 0
    doc = _pull_offline(config, section, version, show_progress=not args.json)
    when = (f"will switch to version {version}" if version
            else "will follow the fleet or the configuration again")
    _print(args, {**doc, "agent": "stopped"},
           f"{name}: the agent is not running; it {when} when it starts")
    return 0


def _pull_offline(config: AgentConfig, section: ModelSection, version: int | None, *,
                  show_progress: bool) -> dict[str, Any]:
    """The agent is stopped: download and verify (a hub model), then change the history."""
    history = History(config.state_path(os.environ))
    name = section.name
    if section.path:
        if version is not None and version not in history.read().model(name).local:
            raise ModelNotFound(f"model {name!r} has no local version {version}")
    else:  # fetched now, so the agent starts on it without waiting for the hub
        _download(config, name, version, show_progress)

    def change(state: VersionState) -> None:
        model = state.model(name)
        model.operator_pin = version
        if version is not None:
            model.failed.pop(version, None)

    state = history.modify(change)
    return {"name": name, "operator_pin": version, **state.model(name).to_dict()}


def _download(config: AgentConfig, name: str, version: int | None,
              show_progress: bool) -> None:
    """Download and verify ``version`` (None: the hub's latest) into the store."""
    from tqdm import tqdm

    from edgeagent.device.facts import collect_facts
    from edgeagent.device.profiles import load_profiles, select_profile
    from edgeagent.hub.source import HubSource, profile_chooser

    if not config.hub.url:
        raise ConfigError("no hub is configured; set [hub] url and root", "hub.url")
    facts = collect_facts(Path("/"))
    extra = Path(config.agent.profiles_dir) if config.agent.profiles_dir else None
    forced = None if config.agent.profile == "auto" else config.agent.profile
    profile = select_profile(load_profiles(extra), facts, forced)
    source = HubSource(config.hub, config.state_path(os.environ),
                       profile_chooser(profile.profile, facts), base_dir=config_dir(config))
    try:
        index = source.refresh_blocking()
        if version is None:
            version = index.latest(name)
            if version is None:
                raise HubError(f"the hub has no release of {name!r}")
        if version not in index.versions.get(name, ()) and \
                version not in source.installed_versions(name):
            have = ", ".join(map(str, index.versions.get(name, ()))) or "none"
            raise HubError(f"the hub has no version {version} of {name!r} (it has: {have})")
        with tqdm(unit="B", unit_scale=True, desc=f"{name} v{version}",
                  disable=not show_progress) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            inst = source.fetch_blocking(name, version, progress)
    finally:
        source.close()
    if show_progress:
        print(f"{name} version {version} verified and stored: {inst.variant.file} "
              f"({inst.reason})")


def cmd_rollback(args: argparse.Namespace) -> int:
    config = _config(args)
    name = args.name
    _section(config, name)
    if agent_running(config):
        doc = _ask(config, "POST", f"/v1/agent/models/{name}/rollback", {})
        _print(args, {**doc, "agent": "running"},
               f"{name}: rolled back and pinned to version {doc.get('serving')}")
        return 0
    history = History(config.state_path(os.environ))
    target: list[int] = []

    def change(state: VersionState) -> None:
        model = state.model(name)
        if not model.previous:
            raise ModelNotFound(f"model {name}: no previous version to roll back to")
        target.append(model.previous[0])
        model.operator_pin = model.previous[0]

    state = history.modify(change)
    _print(args, {"name": name, "agent": "stopped", **state.model(name).to_dict()},
           f"{name}: the agent is not running; it will go back to version {target[0]} (pinned) "
           "when it starts")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    config = _config(args)
    _section(config, args.name)
    if not agent_running(config):
        raise EdgeAgentError("edgeagent tune measures on the running agent, and it is not "
                             "running (systemctl start edgeagent)")
    doc = _stream_tune(config, args.name, show_progress=not args.json)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(format_tune(doc["result"]))
    return 0


def _stream_tune(config: AgentConfig, name: str, *, show_progress: bool) -> dict[str, Any]:
    """POST .../tune and follow its NDJSON lines, drawing a progress bar on stderr."""
    final: dict[str, Any] | None = None
    try:
        with local_client(config, timeout=3600) as client, \
                client.stream("POST", f"/v1/agent/models/{name}/tune", json={}) as response:
            if response.status_code != 200:
                response.read()
                try:
                    why = response.json().get("error", response.text)
                except ValueError:
                    why = response.text.strip()
                raise EdgeAgentError(str(why))
            for line in response.iter_lines():
                if not line.strip():
                    continue
                item = json.loads(line)
                if "progress" in item and show_progress:
                    p = item["progress"]
                    filled = int(30 * p["done"] / max(1, p["total"]))
                    sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] "
                                     f"{p['done']}/{p['total']} {p['outcome']:<14}")
                    sys.stderr.flush()
                elif "error" in item:
                    raise EdgeAgentError(f"tuning {name} failed: {item['error']}")
                elif "result" in item:
                    final = item
    except httpx.HTTPError as exc:
        raise EdgeAgentError(f"cannot reach the agent ({exc})") from exc
    finally:
        if show_progress:
            sys.stderr.write("\n")
    if final is None:
        raise EdgeAgentError("the agent ended the tuning without a result")
    return final


def format_tune(result: dict[str, Any]) -> str:
    """The table of candidates, their figures and why each lost, then the choice."""
    head = f"{'candidate':<52} {'p50 ms':>8} {'p99 ms':>8} {'items/s':>9} {'+MB':>6}  outcome"
    lines = [head, "-" * len(head)]
    for row in result["rows"]:
        c, f = row["candidate"], row["figures"]
        label = f"{c['variant']} {c['precision']} {c['provider'].removesuffix('ExecutionProvider')}"
        label += f" t{c['threads'] or 'default'}" + (f" b{c['batch']}" if c["batch"] > 1 else "")
        label += " (default)" if row["default"] else ""
        figures = (f"{f['p50_ms']:>8.3f} {f['p99_ms']:>8.3f} {f['throughput']:>9.1f} "
                   f"{f['memory_mb']:>6.1f}" if f else f"{'-':>8} {'-':>8} {'-':>9} {'-':>6}")
        lines.append(f"{label:<52} {figures}  {row['outcome']}"
                     + (f": {row['why']}" if row["why"] and row["outcome"] != "chosen" else ""))
    chosen = result.get("chosen")
    if chosen is None:
        lines.append("no candidate passed: the profile's default keeps serving")
    else:
        margin = result.get("margin")
        lines.append(f"chosen: {chosen['variant']} on {chosen['provider']}, "
                     f"{chosen['threads'] or 'default'} thread(s), batch {chosen['batch']}"
                     + (f"; {margin:.2f}x the default ({result['objective']}), noise "
                        f"{100 * result['noise']:.1f} %" if margin else ""))
    if result.get("confirm"):
        lines.append("paired re-measurement (winner over default): "
                     + ", ".join(f"{r:.2f}x" for r in result["confirm"]))
    lines.append(f"searched {len(result['rows'])} candidate(s) in {result['elapsed_s']:.0f} s "
                 f"of a {result['budget_s']:g} s budget")
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    config = _config(args)
    if agent_running(config):
        doc = _ask(config, "GET", "/v1/agent/models")
        models = doc["models"]
    else:
        state = History(config.state_path(os.environ)).read()
        models = [{"name": m.name, "serving": None, "stored": _stored(config, m),
                   **state.model(m.name).to_dict(),
                   "source": f"agent stopped; last active {state.model(m.name).active}"}
                  for m in config.models]
        doc = {"models": models, "agent": "stopped"}
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    if not models:
        print("no models configured")
    for m in models:
        print(_describe(m))
    return 0
