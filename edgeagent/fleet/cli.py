"""``edgeagent fleet ...``: ``serve`` runs the controller; every other command is a client of
its API (``--url`` / ``EDGEAGENT_FLEET_URL``, token from ``--token-file`` /
``EDGEAGENT_FLEET_TOKEN`` or the controller's own ``fleet.toml``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from edgeagent.errors import ConfigError, EdgeAgentError

POLL_S = 0.5


class FleetApiError(EdgeAgentError):
    """The controller's API refused a request or cannot be reached."""


def _config(args: argparse.Namespace) -> Any:
    from edgeagent.fleet.config import load_fleet_config

    return load_fleet_config(args.config, os.environ)


class Client:
    """A thin httpx client of the controller's API."""

    def __init__(self, args: argparse.Namespace) -> None:
        import httpx

        url = args.url or os.environ.get("EDGEAGENT_FLEET_URL", "")
        token = os.environ.get("EDGEAGENT_FLEET_TOKEN", "")
        token_file = args.token_file
        cfg = None
        if not url or not (token or token_file):
            cfg = _config(args)
            url = url or f"http://{cfg.api.listen}"
        if token_file:
            try:
                token = open(token_file, encoding="utf-8").read().strip()  # noqa: SIM115
            except OSError as exc:
                raise ConfigError(f"cannot read the token file: {exc.strerror}",
                                  "--token-file") from exc
        elif not token and cfg is not None:
            try:
                token = cfg.token_path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"cannot read the API token {cfg.token_path}: "
                                  f"{exc.strerror} (give --token-file or "
                                  "EDGEAGENT_FLEET_TOKEN)", "api.token_file") from exc
        if not token or any(ch.isspace() or not ch.isprintable() for ch in token):
            raise ConfigError("the API token must be one line of printable characters",
                              "--token-file")
        self.url = url.rstrip("/")
        self._httpx = httpx
        self._client = httpx.Client(base_url=self.url, timeout=30.0,
                                    headers={"Authorization": f"Bearer {token}"})

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             params: dict[str, Any] | None = None) -> Any:
        try:
            r = self._client.request(method, path, json=body,
                                     params={k: v for k, v in (params or {}).items()
                                             if v is not None})
        except self._httpx.HTTPError as exc:
            raise FleetApiError(f"cannot reach the fleet controller at {self.url}: {exc} "
                                "(is `edgeagent fleet serve` running? --url sets where)") from exc
        try:
            data = r.json()
        except ValueError:
            data = {"error": r.text[:200]}
        if r.status_code >= 400:
            raise FleetApiError(f"{data.get('error', r.reason_phrase)} (HTTP {r.status_code})")
        return data


def _print(args: argparse.Namespace, data: Any, text: Callable[[Any], str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(text(data))


def _ago(ts: float) -> str:
    if not ts:
        return "never"
    s = max(0.0, time.time() - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else \
        f"{s / 3600:.0f}h ago"


# -- commands ------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from edgeagent.fleet.controller import serve
    from edgeagent.service.logs import setup_logging

    cfg = _config(args)
    setup_logging(args.log_level or "info", "auto", os.environ)
    asyncio.run(serve(cfg))
    return 0


def _status_text(d: dict[str, Any]) -> str:
    inv = d["inventory"]
    st = inv["by_state"]
    lines = [f"devices: {inv['devices']} ({st.get('online', 0)} online, "
             f"{st.get('offline', 0)} offline, {st.get('stopped', 0)} stopped, "
             f"{st.get('silent', 0)} silent, {inv['with_errors']} with errors)",
             f"broker: {d['broker']['url']} "
             f"({'connected' if d['broker']['connected'] else 'NOT connected'})"]
    if inv["groups"]:
        lines.append("groups: " + ", ".join(f"{g} ({n})" for g, n in inv["groups"].items()))
    for name, m in inv["models"].items():
        versions = ", ".join(f"v{v}: {n}" for v, n in m["versions"].items())
        sources = ", ".join(f"{k} {n}" for k, n in m["sources"].items())
        lines.append(f"model {name}: {versions} (decided by {sources})")
    for r in d["rollouts"]:
        lines.append(f"rollout {r['rollout_id']}: {r['model']} v{r['version']} on {r['target']}"
                     f", {r['phase']}, wave {r['wave']} at {r['share']:g} %")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    _print(args, Client(args).call("GET", "/v1/fleet/status"), _status_text)
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    client = Client(args)
    params = {"group": args.group, "model": args.model, "version": args.version,
              "state": args.state, "limit": min(args.limit, 1000)}
    rows: list[dict[str, Any]] = []
    after = ""
    while len(rows) < args.limit:
        page = client.call("GET", "/v1/fleet/devices", params={**params, "after": after})
        rows.extend(page["devices"])
        if not page["next"]:
            break
        after = page["next"]
    rows = rows[:args.limit]

    def text(rows: list[dict[str, Any]]) -> str:
        out = []
        for r in rows:
            models = ", ".join(f"{n} v{m['version']} ({m['source'] or m['source_kind']})"
                               for n, m in sorted(r["models"].items()))
            state = "online" if r["online"] else ("silent" if r["state"] == "online"
                                                  else r["state"])
            err = f"  error: {r['last_error']}" if r["last_error"] else ""
            out.append(f"{r['device_id']}  {state}  seen {_ago(r['last_seen'])}  "
                       f"[{','.join(r['tags'])}]  {models}{err}")
        return "\n".join(out) if out else "no devices match"

    _print(args, rows, text)
    return 0


def _rollout_text(r: dict[str, Any]) -> str:
    c = r["counts"]
    lines = [f"rollout {r['rollout_id']} ({r['kind']}): {r['model']} v{r['version']} on "
             f"{r['target']}, from v{r['from_version']}" if r["from_version"] else
             f"rollout {r['rollout_id']} ({r['kind']}): {r['model']} v{r['version']} on "
             f"{r['target']}",
             f"  {r['summary']}",
             "  total: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in c.items()),
             f"  document: {r['document']['state']} at {r['document']['share']:g} %"
             f"{'' if r['document']['published'] else ' (publishing)'}; "
             f"{r['publishes']} publishes"]
    for w in r["waves"]:
        wc = w["counts"]
        lines.append(f"  wave {w['wave']} ({w['percent']:g} %, share {w['share']:g} %): "
                     f"{w['result']}; " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                                   for k, v in wc.items() if v))
    return "\n".join(lines)


def _watch(args: argparse.Namespace, client: Client, rollout_id: str) -> dict[str, Any]:
    """Follow a rollout until it is done or aborted (a progress bar unless --json)."""
    bar = None
    if not args.json:
        from tqdm import tqdm

        bar = tqdm(total=1, unit="dev", desc=rollout_id, file=sys.stderr, leave=True)
    try:
        while True:
            r: dict[str, Any] = client.call("GET", f"/v1/fleet/rollouts/{rollout_id}")
            if bar is not None:
                bar.total = max(1, r["members"])
                bar.n = r["running_version"] if r["phase"] != "reverting" else \
                    r["counts"]["reverted"]
                bar.set_postfix_str(f"{r['phase']} wave {r['wave']}, failed "
                                    f"{r['counts']['failed']}, not reached "
                                    f"{r['counts']['not_reached']}", refresh=False)
                bar.refresh()
            if r["phase"] in ("done", "aborted"):
                return r
            time.sleep(POLL_S)
    finally:
        if bar is not None:
            bar.close()


def _finish(args: argparse.Namespace, client: Client, r: dict[str, Any]) -> int:
    if args.wait:
        r = _watch(args, client, r["rollout_id"])
        _print(args, r, _rollout_text)
        return 0 if r["succeeded"] else 1
    _print(args, r, _rollout_text)
    return 0


def _spec(text: str) -> tuple[str, int]:
    name, sep, version = text.partition("@")
    if not sep or not version.isdigit():
        raise ConfigError(f"expected MODEL@VERSION (mlp@3), got {text!r}")
    return name, int(version)


def _target(args: argparse.Namespace) -> dict[str, Any]:
    return {"group": args.group} if args.group else {"fleet": True}


def cmd_rollout_start(args: argparse.Namespace) -> int:
    client = Client(args)
    model, version = _spec(args.spec)
    body = {"model": model, "version": version, **_target(args), "waves": args.waves,
            "min_devices": args.min_devices, "max_failures": args.max_failures,
            "wave_timeout_s": args.wave_timeout}
    return _finish(args, client, client.call("POST", "/v1/fleet/rollouts", body))


def cmd_rollout_act(args: argparse.Namespace) -> int:
    client = Client(args)
    r = client.call("POST", f"/v1/fleet/rollouts/{args.rollout_id}/{args.action}")
    if args.action == "pause":
        _print(args, r, _rollout_text)
        return 0
    return _finish(args, client, r)


def cmd_rollout_show(args: argparse.Namespace) -> int:
    client = Client(args)
    if args.rollout_id is None:
        rows = client.call("GET", "/v1/fleet/rollouts", params={"limit": 20})["rollouts"]
        _print(args, rows, lambda rs: "\n".join(_rollout_text(r) for r in rs) or "no rollouts")
        return 0
    r = client.call("GET", f"/v1/fleet/rollouts/{args.rollout_id}")
    return _finish(args, client, r)


def cmd_rollback(args: argparse.Namespace) -> int:
    client = Client(args)
    body = {"model": args.model, **_target(args), "waves": args.waves,
            "min_devices": args.min_devices, "max_failures": args.max_failures,
            "wave_timeout_s": args.wave_timeout}
    return _finish(args, client, client.call("POST", "/v1/fleet/rollbacks", body))


def cmd_pin(args: argparse.Namespace) -> int:
    model, version = _spec(args.spec)
    r = Client(args).call("PUT", f"/v1/fleet/devices/{args.device}/pins/{model}",
                          {"version": version})
    _print(args, r, lambda d: f"{d['device_id']}: {model} pinned to v{version} "
                              f"(device document revision {d['revision']})")
    return 0


def cmd_unpin(args: argparse.Namespace) -> int:
    r = Client(args).call("DELETE", f"/v1/fleet/devices/{args.device}/pins/{args.model}")
    _print(args, r, lambda d: f"{d['device_id']}: {args.model} unpinned "
                              f"(device document revision {d['revision']})")
    return 0


def add_fleet_parser(sub: Any) -> None:
    """Register ``edgeagent fleet`` and its subcommands."""
    fleet = sub.add_parser("fleet", help="the fleet controller and its commands",
                           description="Run the fleet controller (serve), or talk to it.")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="COMMAND")

    def add(parent: Any, name: str, fn: Callable[[argparse.Namespace], int],
            help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=fn)
        p.add_argument("--config", help="the controller's fleet.toml (default "
                                        "/etc/edgeagent/fleet.toml, or $EDGEAGENT_FLEET_CONFIG)")
        if fn is not cmd_serve:
            p.add_argument("--url", help="the controller's API (default from fleet.toml: "
                                         "http://127.0.0.1:8090; $EDGEAGENT_FLEET_URL)")
            p.add_argument("--token-file", help="file with the API token (default: the "
                                                "controller's; $EDGEAGENT_FLEET_TOKEN)")
            p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    def wave_options(p: argparse.ArgumentParser, rollback: bool = False) -> None:
        target = p.add_mutually_exclusive_group(required=True)
        target.add_argument("--group", help="the devices tagged with this group")
        target.add_argument("--all", action="store_true", help="the whole fleet")
        p.add_argument("--waves", help="percentages, increasing to 100%% (default "
                                       + ("100%%" if rollback else "from fleet.toml, "
                                          "1%%,10%%,50%%,100%%") + ")")
        p.add_argument("--min-devices", type=int, help="at least this many reachable devices "
                                                       "in each wave (default 10)")
        p.add_argument("--max-failures", help="abort once failures pass this share of a "
                                              "wave (default " + ("100%%" if rollback else "5%%")
                                              + ")")
        p.add_argument("--wave-timeout", type=float, help="seconds a wave may take (600)")
        p.add_argument("--wait", action="store_true",
                       help="follow it to the end (progress bar); exit 0 only if it succeeded")

    p = add(fsub, "serve", cmd_serve, "run the fleet controller (MQTT, database, API)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    add(fsub, "status", cmd_status, "the fleet at a glance")
    p = add(fsub, "devices", cmd_devices, "list devices (filters)")
    p.add_argument("--group")
    p.add_argument("--model")
    p.add_argument("--version", type=int)
    p.add_argument("--state", choices=["online", "offline", "stopped", "silent"])
    p.add_argument("--limit", type=int, default=1000)
    rollout = fsub.add_parser("rollout", help="staged rollouts",
                              description="Start, follow and steer staged rollouts.")
    rsub = rollout.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    p = add(rsub, "start", cmd_rollout_start, "start a staged rollout of MODEL@VERSION")
    p.add_argument("spec", metavar="MODEL@VERSION")
    wave_options(p)
    for action in ("pause", "resume", "abort"):
        p = add(rsub, action, cmd_rollout_act, f"{action} a rollout")
        p.add_argument("rollout_id")
        p.set_defaults(action=action)
        p.add_argument("--wait", action="store_true", help="follow it to the end")
    p = add(rsub, "show", cmd_rollout_show, "a rollout's counts per wave (all recent without ID)")
    p.add_argument("rollout_id", nargs="?")
    p.add_argument("--wait", action="store_true", help="follow it to the end (progress bar)")
    p = add(fsub, "rollback", cmd_rollback, "roll a model back to the version its latest "
                                            "rollout replaced")
    p.add_argument("model")
    wave_options(p, rollback=True)
    p = add(fsub, "pin", cmd_pin, "pin a model version on one device (its device document)")
    p.add_argument("device")
    p.add_argument("spec", metavar="MODEL@VERSION")
    p = add(fsub, "unpin", cmd_unpin, "remove a device's pin of a model")
    p.add_argument("device")
    p.add_argument("model")
