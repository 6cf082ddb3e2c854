"""Operator commands on the local store: ``edgeagent pull``, ``rollback`` and ``models``.

They work on the store directly. A version pulled or rolled back to is recorded as requested;
a running agent is then asked to reload the model through its repository load endpoint (the
old version serves until the new one passed its checks); an agent that is not running tries
it at its next start, after serving the known-good active version.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from edgeagent.config import AgentConfig, config_dir, load_config
from edgeagent.demo import demo_config
from edgeagent.device.facts import collect_facts
from edgeagent.device.profiles import load_profiles, select_profile
from edgeagent.errors import ConfigError, EdgeAgentError, HubError
from edgeagent.hub.store import ModelStore
from edgeagent.hub.sync import HubSync, profile_chooser
from edgeagent.localapi import local_client

AddCommand = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def add_hub_commands(add: AddCommand) -> None:
    """Register ``pull``, ``rollback`` and ``models`` with the ``edgeagent`` parser."""
    p = add("pull", cmd_pull, "download and verify a model version from the hub, then use it")
    p.add_argument("model", metavar="NAME[@VERSION]", help="VERSION defaults to the hub's latest")
    p = add("rollback", cmd_rollback, "go back to the previous version of a hub model")
    p.add_argument("name", metavar="NAME")
    add("models", cmd_models, "list the hub models in the local store")


def _config(args: argparse.Namespace) -> AgentConfig:
    loaded = load_config(args.config, os.environ)
    # Embedded defaults serve the demo hub: the operator commands work on it too.
    config = demo_config(loaded, loaded.state_path(os.environ).resolve())
    if not config.hub.url:
        raise ConfigError("no hub is configured; set [hub] url and root", "hub.url")
    return config


def _sync(config: AgentConfig) -> HubSync:
    facts = collect_facts(Path("/"))
    extra = Path(config.agent.profiles_dir) if config.agent.profiles_dir else None
    forced = None if config.agent.profile == "auto" else config.agent.profile
    profile = select_profile(load_profiles(extra), facts, forced)
    return HubSync(config.hub, config.models, config.state_path(os.environ), None,
                   profile_chooser(profile.profile, facts), base_dir=config_dir(config))


def _ask_agent(config: AgentConfig, name: str) -> str:
    """Ask a running agent to reload ``name``; say what happened."""
    try:
        with local_client(config, timeout=600) as client:
            response = client.post(f"/v2/repository/models/{name}/load")
    except httpx.HTTPError:
        return "the agent is not running; it will try this version when it starts"
    if response.status_code != 200:
        raise EdgeAgentError(f"the agent did not switch: {response.status_code} "
                             f"{response.text.strip()}")
    return "the running agent loaded, checked and switched to it"


def cmd_pull(args: argparse.Namespace) -> int:
    """``pull NAME@V`` pins V (the poll loop keeps it); ``pull NAME`` takes the hub's latest
    and removes any pin (the configuration rules again)."""
    config = _config(args)
    name, _, wanted = args.model.partition("@")
    if wanted and not wanted.isdigit():
        raise ConfigError(f"expected NAME or NAME@VERSION (an integer), got {args.model!r}")
    sync = _sync(config)
    try:
        index = sync.refresh()
        version = int(wanted) if wanted else index.latest(name)
        if version is None:
            raise HubError(f"the hub has no release of {name!r}")
        with tqdm(unit="B", unit_scale=True, desc=f"{name} v{version}") as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            inst = sync.fetch(name, version, progress)
    finally:
        sync.close()
    print(f"{name} version {version} verified and stored: {inst.variant.file} ({inst.reason})")
    sync.request(name, version, pin=bool(wanted))
    print(_ask_agent(config, name))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Go back to the newest kept previous version, and pin it (the poll loop keeps it until
    ``pull NAME`` or a new desired version)."""
    config = _config(args)
    sync = _sync(config)
    try:
        version = sync.rollback_target(args.name)
    finally:
        sync.close()
    sync.request(args.name, version, pin=True)
    print(f"{args.name}: rolling back to version {version}")
    print(_ask_agent(config, args.name))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    config = _config(args)
    store = ModelStore(config.state_path(os.environ) / "hub")
    states = store.read_state()
    names = sorted(set(states) | {m.name for m in config.models if m.version is not None})
    if not names:
        print("no hub models")
    for name in names:
        state = states.get(name)
        versions = store.installed_versions(name)
        line: list[Any] = [f"{name}: stored {versions or 'nothing'}"]
        if state is not None:
            line.append(f"active {state.active}")
            if state.active in versions:
                inst = store.installed(name, state.active)
                line.append(f"variant {inst.variant.file} ({inst.reason})")
            if state.previous:
                line.append(f"previous {state.previous}")
            if state.requested is not None:
                line.append(f"requested {state.requested}")
            for version, why in sorted(state.failed.items()):
                line.append(f"v{version} failed: {why}")
        print("; ".join(str(x) for x in line))
    return 0
