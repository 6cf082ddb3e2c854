"""The composition root of ``edgeagent fleet serve``: builds every part, owns start and stop.

Start: database (schema) -> MQTT (shared subscriptions) -> ingest worker -> paced catch-up of
the devices the database knows -> rollout leader loop -> maintenance (expiry, telemetry
window) -> the API. Stop runs the other way, and releases the rollouts this replica led so
another replica takes them over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import uvicorn

from edgeagent import __version__
from edgeagent.errors import ConfigError
from edgeagent.fleet.broker import FleetBroker
from edgeagent.fleet.config import FleetConfig, needs_token_refusal
from edgeagent.fleet.ingest import Ingest
from edgeagent.fleet.rollouts import RolloutEngine, RolloutRefused
from edgeagent.fleet.store import Store, open_store
from edgeagent.telemetry.topics import NAME_RE, Topics

log = logging.getLogger(__name__)

MAINTENANCE_S = 30.0


def load_token(cfg: FleetConfig) -> str:
    """The API token: read from ``api.token_file``, or created (0600) in the state directory.

    Raises:
        ConfigError: an unreadable or short token, or a non-loopback listen without a file.
    """
    path = cfg.token_path
    if not cfg.api.token_file and needs_token_refusal(cfg):
        raise ConfigError(f"{cfg.api.listen} is reachable from other hosts; set "
                          "api.token_file (a file holding a bearer token) or listen on "
                          "127.0.0.1", "api.listen", cfg.source)
    if not path.exists() and not cfg.api.token_file:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        log.info("API token written to %s", path)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc.strerror}",
                          "api.token_file", cfg.source) from exc
    if len(token) < 16:
        raise ConfigError(f"the token in {path} must be at least 16 characters",
                          "api.token_file", cfg.source)
    return token


class FleetController:
    """One replica of the fleet controller."""

    def __init__(self, config: FleetConfig, store: Store | None = None) -> None:
        self.config = config
        self.store = store or open_store(config.database_url)
        self.broker = FleetBroker(config.broker)
        self.engine = RolloutEngine(config, self.store, self.broker)
        self.ingest = Ingest(self.broker, self.store, config.inventory.max_message_bytes)
        self.started = time.time()
        self.catchup: dict[str, Any] = {"state": "waiting", "devices": 0, "batches_ok": 0}
        self._stop_threads = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._catchup_thread: threading.Thread | None = None
        self._seen_connects = 0

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.broker.start()
        self.ingest.start()
        self._tasks = [asyncio.create_task(self.engine.run(), name="fleet-rollouts"),
                       asyncio.create_task(self._maintenance(), name="fleet-maintenance"),
                       asyncio.create_task(self._watch_connects(), name="fleet-catchup")]

    async def stop(self) -> None:
        self._stop_threads.set()
        await self.engine.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._catchup_thread is not None:
            await asyncio.to_thread(self._catchup_thread.join, 20)
        await asyncio.to_thread(self.broker.stop)
        await asyncio.to_thread(self.ingest.stop)
        self.store.close()

    async def _watch_connects(self) -> None:
        """A paced catch-up after every (re)connect: what changed while we were away."""
        while True:
            await asyncio.sleep(0.2)
            if self.broker.connects != self._seen_connects and self.broker.connected.is_set():
                self._seen_connects = self.broker.connects
                if self._catchup_thread is None or not self._catchup_thread.is_alive():
                    self._catchup_thread = threading.Thread(target=self._catch_up,
                                                            name="fleet-catchup", daemon=True)
                    self._catchup_thread.start()

    def _catch_up(self) -> None:
        ids = self.store.known_devices()
        self.catchup = {"state": "running", "devices": len(ids), "batches_ok": 0,
                        "started": time.time()}
        ok = self.broker.catch_up(ids, self._stop_threads)
        self.catchup.update(state="done", batches_ok=ok, finished=time.time())
        log.info("catch-up: retained state of %d known devices asked for in %d batches",
                 len(ids), ok)

    async def _maintenance(self) -> None:
        inv = self.config.inventory
        while True:
            gone = await asyncio.to_thread(self.store.prune, time.time(), inv.stale_after_s,
                                           inv.telemetry_window_s, inv.telemetry_max_points)
            if gone:
                log.info("inventory: %d devices silent for %g s left the view", gone,
                         inv.stale_after_s)
            await asyncio.sleep(min(MAINTENANCE_S, inv.stale_after_s / 4))

    # -- what the API asks -----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        inv = self.config.inventory
        now = time.time()
        counts = self.store.counts(now, inv.offline_after_s)
        active = self.store.rollouts(active_only=True)
        return {"controller": {"version": __version__, "replica": self.engine.owner,
                               "started": self.started, "leading": sorted(
                                   n.removeprefix("rollout:") for n in self.engine.leading)},
                "broker": {"url": self.broker.settings.address,
                           "connected": self.broker.connected.is_set(),
                           "last_error": self.broker.last_error,
                           "received": self.broker.received},
                "ingest": self.ingest.status(), "catchup": self.catchup,
                "inventory": counts,
                "rollouts": [{"rollout_id": r["rollout_id"], "model": r["model"],
                              "target": r["target"], "version": r["version"],
                              "phase": r["phase"], "wave": r["wave"] + 1,
                              "share": r["threshold"] / 100} for r in active]}

    def pin(self, device_id: str, model: str, version: int | None) -> dict[str, Any]:
        """Pin (``version``) or unpin (None) a model on one device: its device document gets
        the next revision and is published retained; an empty document clears it.

        Raises:
            RolloutRefused: a bad name or version (400), an unknown pin (404), no broker (503).
        """
        if not NAME_RE.match(device_id) or not NAME_RE.match(model):
            raise RolloutRefused("expected a device id and a model name of letters, digits, "
                                 "'_', '.', ':', '-'")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                    or version < 1):
            raise RolloutRefused(f"version: expected an integer >= 1, got {version!r}")
        current = self.store.device_doc(device_id)
        models: dict[str, Any] = dict(current[1]) if current else {}
        if version is None and model not in models:
            raise RolloutRefused(f"{device_id} has no pin of {model}", 404)
        if version is None:
            models.pop(model)
        else:
            models[model] = {"version": version}
        revision = max(current[0] if current else 0, self.store.reported_revision(device_id)) + 1
        topic = Topics(self.config.broker.topic_prefix, device_id).desired
        payload = orjson.dumps({"revision": revision, "models": models}) if models else b""
        try:
            self.broker.publish_blocking(topic, payload)
        except Exception as exc:
            raise RolloutRefused(f"could not publish {topic}: {exc}", 503) from exc
        self.store.put_device_doc(device_id, revision, models)
        return {"device_id": device_id, "revision": revision, "models": models}


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the controller owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(config: FleetConfig) -> None:
    """Run one replica until SIGTERM or SIGINT."""

    from edgeagent.fleet.api import build_app

    token = load_token(config)
    controller = FleetController(config)
    host, _, port = config.api.listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        controller.store.close()
        raise ConfigError(f"cannot listen on {config.api.listen}: {exc.strerror}",
                          "api.listen", config.source) from exc
    app = build_app(controller, token)
    server = _Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                    lifespan="off"))
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await controller.start()
    api = asyncio.create_task(server.serve(sockets=[sock]))
    log.info("fleet controller %s: API on http://%s, database %s, broker %s",
             controller.engine.owner, config.api.listen, _redact(config.database_url),
             controller.broker.settings.address)
    done, _ = await asyncio.wait({api, asyncio.create_task(stopping.wait())},
                                 return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    with contextlib.suppress(Exception):
        await api
    await controller.stop()
    if api in done and api.exception() is not None:
        raise api.exception()  # type: ignore[misc]


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return str(Path(url))
