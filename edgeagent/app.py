"""The composition root: builds every component, owns start-up and shutdown order.

Start-up: state dir -> device facts and profile -> runtimes and model manager -> configured
models (each loaded, warmed up and checked; a failure is recorded, never fatal) -> HTTP.
Shutdown runs the same steps in reverse: stop accepting requests, let those in flight finish
within the grace period, unload models.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from edgeagent import __version__
from edgeagent.config import AgentConfig, ModelSection, config_dir, read_token
from edgeagent.demo import demo_config, ensure_demo_hub, is_demo
from edgeagent.device.facts import DeviceFacts, collect_facts
from edgeagent.device.plan import TRT_CACHE_DIRNAME, ProviderPlan, plan_providers
from edgeagent.device.profiles import ProfileSelection, load_profiles, select_profile
from edgeagent.errors import EdgeAgentError
from edgeagent.runtime.inspect import sha256_file
from edgeagent.runtime.manager import ModelManager, ModelSource
from edgeagent.runtime.registry import BackendRegistry
from edgeagent.runtime.repository import ModelRepository
from edgeagent.runtime.scheduler import InferenceScheduler, ModelLimits
from edgeagent.service.reload import ReloadPlan, plan_reload

if TYPE_CHECKING:
    from edgeagent.control.link import FleetLink
    from edgeagent.hub.sync import HubSync

log = logging.getLogger(__name__)


def device_id(config: AgentConfig, root: Path) -> str:
    """The configured device id, else the machine id, else the host name."""
    if config.agent.device_id:
        return config.agent.device_id
    try:
        machine_id = (root / "etc/machine-id").read_text().strip()
    except OSError:
        machine_id = ""
    return machine_id or socket.gethostname()


@dataclass
class Services:
    """What the HTTP API (and later the MQTT side) is given: no component builds its siblings."""

    config: AgentConfig
    manager: ModelManager
    scheduler: InferenceScheduler
    repository: ModelRepository
    token: str | None
    status: Callable[[], dict[str, Any]]
    draining: Callable[[], bool] = field(default=lambda: False)


class Agent:
    """One running agent: start(), then stop() (in reverse order of start)."""

    def __init__(self, config: AgentConfig, env: Mapping[str, str] | None = None,
                 root: Path = Path("/")) -> None:
        self.env = dict(env or {})
        self.root = root
        self.state_dir = config.state_path(self.env).resolve()
        config = self.config = demo_config(config, self.state_dir)
        self.started_at = time.time()
        self.facts: DeviceFacts | None = None
        self.profile: ProfileSelection | None = None
        self.registry = BackendRegistry()
        self.manager = ModelManager(
            self.registry, self._plan,
            infer_workers=max(4, sum(m.max_concurrency for m in config.models)))
        base = self.base_dir = config_dir(config)
        self.scheduler = InferenceScheduler(self.manager)
        self.repository = ModelRepository(self.manager, base)
        self.token = read_token(config)
        self._server: uvicorn.Server | None = None
        self._server_task: asyncio.Task[None] | None = None
        self._draining = False
        self.hub: HubSync | None = None
        self.fleet: FleetLink | None = None
        self.device_id = device_id(config, root)
        self.services = Services(config, self.manager, self.scheduler, self.repository, self.token,
                                 self.status, lambda: self._draining)

    # ---- wiring -------------------------------------------------------------------------

    def _plan(self, fmt: str, precision: str, sha256: str) -> ProviderPlan:
        assert self.facts is not None, "planned before start()"
        assert self.profile is not None, "planned before start()"
        return plan_providers(self.profile.profile, self.facts, fmt, precision,
                              cache_dir=self.state_dir / TRT_CACHE_DIRNAME, model_hash=sha256)

    def _models(self) -> tuple[ModelSection, ...]:
        return self.config.models

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start every part in order; models that fail to load are reported, not fatal."""
        loop = asyncio.get_running_loop()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log.info("edgeagent %s starting, state in %s, config from %s",
                 __version__, self.state_dir, self.config.source)
        self.facts = await loop.run_in_executor(None, collect_facts, self.root)
        extra = Path(self.config.agent.profiles_dir) if self.config.agent.profiles_dir else None
        profiles = load_profiles(extra)
        forced = None if self.config.agent.profile == "auto" else self.config.agent.profile
        self.profile = select_profile(profiles, self.facts, forced)
        log.info("device profile %s: %s", self.profile.profile.name, self.profile.reason)
        models = self._models()
        demo = is_demo(self.config, self.state_dir)
        if demo and await loop.run_in_executor(None, ensure_demo_hub, self.state_dir):
            log.info("embedded defaults: made the demo hub in %s", self.config.hub.url)
        if self.config.hub.url:
            # Imported here: a box without a hub never loads tuf and httpx (~17 MB, ~0.3 s).
            from edgeagent.hub.sync import HubSync, profile_chooser

            # Hub models are served from the store at once; the sync pulls what is missing.
            self.hub = HubSync(self.config.hub, models, self.state_dir, self.manager,
                               profile_chooser(self.profile.profile, self.facts),
                               base_dir=self.base_dir)
            self.repository.set_hub_resolver(self.hub.resolve, self.hub.loaded)
        self.repository.configure(models)
        self.scheduler.configure({m.name: ModelLimits.from_section(m) for m in models})
        await self.load_models()
        if self.hub is not None:
            await self.hub.start()
            if demo and not all(self.manager.ready(m.name) for m in models):
                # First run: the demo hub is a local folder, so pull before serving and the
                # first curl gets an answer.
                await self.hub.sync_once()
        await self._start_http()
        await self._start_mqtt()  # last: the fleet sees the agent once it serves
        log.info("ready: %d model(s), HTTP on %s", len(self.repository.names()),
                 self.config.http.listen)

    async def load_models(self, names: Iterable[str] | None = None) -> None:
        """Load the named known models (default all); a failure is logged, never raised."""
        for name in self.repository.names() if names is None else names:
            try:
                await self.repository.load(name)
            except EdgeAgentError as exc:
                log.error("model %s is not serving: %s", name, exc)

    async def _start_http(self) -> None:
        from edgeagent.api.app import build_app
        from edgeagent.api.protocol import bounded_protocol

        listen = self.config.http.listen
        kwargs: dict[str, Any] = {}
        if listen.startswith("unix:"):
            path = Path(listen[5:])
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                path.unlink()  # a socket left by a previous run that was killed
            kwargs["uds"] = str(path)
        else:
            host, _, port = listen.rpartition(":")
            kwargs.update(host=host.strip("[]"), port=int(port))
        # uvicorn annotates int, but hands the value to asyncio.wait_for (a float is fine).
        grace: Any = self.config.agent.shutdown_grace_s
        config = uvicorn.Config(
            build_app(self.services),
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            # httptools (C) parses ~20 % faster than h11; it bounds no request head of its own,
            # so the protocol class does (431; complete heads are checked by RequestGuard).
            http=bounded_protocol(self.config.http),
            timeout_graceful_shutdown=grace,
            **kwargs,
        )
        server = uvicorn.Server(config)
        # What Server.serve() does before startup(), without taking over the signal handlers.
        config.load()
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup()
        except SystemExit as exc:  # uvicorn exits when it cannot bind (port in use)
            raise EdgeAgentError(f"cannot listen on {listen} (in use, or not permitted)") from exc
        self._server = server
        if "uds" in kwargs:
            os.chmod(kwargs["uds"], 0o660)
        self._server_task = asyncio.create_task(self._server.main_loop(), name="http-main-loop")

    async def reload(self, config: AgentConfig) -> ReloadPlan:
        """Apply what can change live from a newly read configuration (SIGHUP).

        Models added are loaded, removed ones unloaded, changed ones reloaded (the old version
        serves until the new one is ready), limits applied; the rest waits for a restart and is
        listed in the returned plan (see :mod:`edgeagent.service.reload`). A model configured
        by ``path`` whose file was replaced since it was loaded, or that failed to load, is
        loaded again too.
        """
        plan = plan_reload(self.config, demo_config(config, self.state_dir))
        self.config = self.services.config = plan.config
        if self._server is not None:
            # uvicorn annotates int, but hands the value to asyncio.wait_for (a float is fine).
            grace: Any = config.agent.shutdown_grace_s
            self._server.config.timeout_graceful_shutdown = grace
        models = self._models()
        self.repository.configure(models)
        self.scheduler.configure({m.name: ModelLimits.from_section(m) for m in models})
        for name in plan.unload:
            await self.manager.unload(name)
            self.manager.forget(name)
        again = await self._model_files_to_reload(plan.load)
        if again:
            plan = dataclasses.replace(plan, load=plan.load + again)
        await self.load_models(plan.load)
        return plan

    async def _model_files_to_reload(self, planned: tuple[str, ...]) -> tuple[str, ...]:
        """Models configured by ``path`` whose file no longer holds what is served (replaced
        in place: the usual way to update a local model), or that are not serving because
        their last load failed."""
        loop = asyncio.get_running_loop()
        again = []
        for name in self.repository.names():
            # Hub models are skipped unresolved: their versions never change in place.
            if name in planned or not self.repository.known(name).section.path:
                continue
            source = await self.repository.source_for(name)  # a path: no I/O
            if not self.manager.ready(name):
                if self.manager.slot(name).state == "failed":
                    log.info("model %s: trying its file again", name)
                    again.append(name)
                continue
            try:
                sha = await loop.run_in_executor(None, sha256_file, source.path)
            except OSError as exc:
                log.warning("model %s: cannot read %s (%s); it keeps serving what it loaded",
                            name, source.path, exc.strerror)
                continue
            if sha != self.manager.get(name).sha256:
                log.info("model %s: %s was replaced; loading it", name, source.path)
                again.append(name)
        return tuple(again)

    async def _start_mqtt(self) -> None:
        from edgeagent.control.deploy import CatalogDeployer, HubDeployer
        from edgeagent.control.link import FleetLink
        from edgeagent.telemetry.reporter import ModelFigures
        from edgeagent.telemetry.system import SystemSampler

        async def catalog(name: str) -> dict[int, ModelSource]:
            source = await self.repository.source_for(name)
            return {source.version: source}

        deployer = (CatalogDeployer(self.manager, catalog) if self.hub is None
                    else HubDeployer(self.manager, catalog, self.hub))
        self.fleet = FleetLink(
            self.config, self.device_id, self.state_dir, version=__version__,
            system=SystemSampler(self.root, disk_path=self.state_dir),
            models=ModelFigures(self.scheduler.all_stats, self.manager.status),
            reported=self._reported, deployer=deployer, reload_config=self._reload_command)
        await self.fleet.start()

    def _reported(self) -> dict[str, Any]:
        status = self.status()
        return {"facts": self.facts.to_dict() if self.facts else None,
                "profile": status["profile"], "hub": status["hub"],
                "models": {m["name"]: {k: m.get(k) for k in (
                    "state", "version", "variant", "format", "precision", "provider",
                    "fallback", "last_error")} for m in status["models"]}}

    async def _reload_command(self) -> dict[str, Any]:
        """The MQTT ``reload-config`` command: re-read the file, apply what can change live."""
        from edgeagent.config import load_config

        source = self.config.source
        config = load_config(source if source != "embedded defaults" else None, self.env)
        plan = await self.reload(config)
        return {"summary": plan.summary(), "loaded": list(plan.load),
                "unloaded": list(plan.unload), "restart_keys": list(plan.restart_keys)}

    async def stop(self) -> None:
        """Stop in reverse order: MQTT (telemetry flushed to the spool, ``stopped`` published),
        HTTP (draining requests in flight), then models."""
        if self.fleet is not None:
            await self.fleet.stop()
            self.fleet = None
        self._draining = True
        grace = self.config.agent.shutdown_grace_s
        if self._server is not None:
            self._server.should_exit = True
            if self._server_task is not None:
                await self._server_task
            await self._server.shutdown()
            self._server = None
        if self.hub is not None:
            await self.hub.stop()
        await self.manager.close(grace)
        log.info("stopped")

    # ---- reporting ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``GET /v1/agent/status`` and ``edgeagent status`` show."""
        profile = None
        if self.profile is not None:
            profile = {"name": self.profile.profile.name, "reason": self.profile.reason}
        return {
            "version": __version__,
            "device_id": self.device_id,
            "state_dir": str(self.state_dir),
            "config": self.config.source,
            "uptime_s": round(time.time() - self.started_at, 1),
            "profile": profile,
            "http": {"listen": self.config.http.listen, "token": self.token is not None},
            "backends": self.registry.status(),
            "models": [{**m, "scheduling": self.scheduler.describe(m["name"])}
                       for m in self.manager.status()],
            "hub": self.hub.describe() if self.hub else {"configured": bool(self.config.hub.url)},
            "mqtt": (self.fleet.status() if self.fleet
                     else {"configured": bool(self.config.mqtt.url)}),
        }
