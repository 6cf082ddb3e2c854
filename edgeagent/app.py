"""The composition root: builds every component, owns start-up and shutdown order.

Start-up: state dir -> device facts and profile -> runtimes and model manager -> the version
owner (what the box has serves at once; a failure is recorded, never fatal; the hub poll brings
the rest) -> HTTP and the local admin channel -> MQTT. Shutdown runs the same steps in reverse:
MQTT, stop accepting requests, let those in flight finish within the grace period, the owner's
poll, unload models.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from edgeagent import __version__
from edgeagent.api.services import Services
from edgeagent.config import (
    AgentConfig,
    ModelSection,
    config_dir,
    read_metrics_token,
    read_token,
)
from edgeagent.demo import demo_config, ensure_demo_hub, is_demo
from edgeagent.device.facts import DeviceFacts, collect_facts
from edgeagent.device.plan import (
    TRT_CACHE_DIRNAME,
    PlanOverrides,
    ProviderPlan,
    loadable_variants,
    plan_providers,
)
from edgeagent.device.profiles import ProfileSelection, load_profiles, select_profile
from edgeagent.errors import EdgeAgentError
from edgeagent.fsutil import unix_socket
from edgeagent.runtime.manager import ModelManager
from edgeagent.runtime.memory import HeapTrimmer
from edgeagent.runtime.registry import BackendRegistry
from edgeagent.runtime.scheduler import InferenceScheduler, ModelLimits
from edgeagent.service.reload import ReloadPlan, plan_reload
from edgeagent.tuning import TimedMeasurer, Tuner, TuningMemory, TuningService, box_facts
from edgeagent.versions.owner import VersionOwner, summary

if TYPE_CHECKING:
    from edgeagent.api.grpc_server import GrpcServer
    from edgeagent.api.metrics import MetricsListener
    from edgeagent.control.link import FleetLink

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


class Agent:
    """One running agent: start(), then stop() (in reverse order of start)."""

    def __init__(self, config: AgentConfig, env: Mapping[str, str] | None = None,
                 root: Path = Path("/")) -> None:
        self.env = dict(env or {})
        self.root = root
        self.state_dir = config.state_path(self.env).resolve()
        self.cache_dir = config.cache_path(self.env).resolve()
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
        self.scheduler.quiet = self._one_client
        self.token = read_token(config)
        self._servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []
        self._grpc: GrpcServer | None = None
        self._draining = False
        self.fleet: FleetLink | None = None
        self.device_id = device_id(config, root)
        self._run_lock: int | None = None
        # Built in start(), once the device profile (the hub's variant choice) is known.
        self.owner = VersionOwner(self.manager, self.state_dir, base, device_id=self.device_id,
                                  groups=config.agent.tags, keep_versions=config.hub.keep_versions,
                                  poll_interval_s=config.hub.poll_interval_s)
        self.services = Services(config, self.manager, self.scheduler, self.owner, self.token,
                                 self.status, lambda: self._draining, root=root,
                                 trimmer=HeapTrimmer(release=self.manager.release_memory))
        self.metrics_token = read_metrics_token(config, self.token)
        self._metrics: MetricsListener | None = None

    # ---- wiring -------------------------------------------------------------------------

    def _plan(self, fmt: str, precision: str, sha256: str,
              overrides: PlanOverrides) -> ProviderPlan:
        assert self.facts is not None, "planned before start()"
        assert self.profile is not None, "planned before start()"
        return plan_providers(self.profile.profile, self.facts, fmt, precision,
                              cache_dir=self.cache_dir / TRT_CACHE_DIRNAME, model_hash=sha256,
                              overrides=overrides)

    def _tuning(self) -> TuningService:
        """On-box tuning with the runtimes, planner, box and state directory of this agent."""
        assert self.facts is not None
        assert self.profile is not None
        profile, facts = self.profile.profile, self.facts

        def variant_plan(fmt: str, precision: str, overrides: PlanOverrides) -> ProviderPlan:
            return plan_providers(profile, facts, fmt, precision,
                                  cache_dir=self.cache_dir / TRT_CACHE_DIRNAME,
                                  model_hash="candidates", overrides=overrides)

        def loadable(variants: Any) -> tuple[list[Any], list[tuple[Any, str]]]:
            ranking = loadable_variants(profile, facts, variants)
            return list(ranking.ranked), [(r.variant, r.reason) for r in ranking.rejected]

        from edgeagent.tuning.search import nvml_used_mb

        tuner = Tuner(self.registry, self._plan, TimedMeasurer(),
                      device_memory=nvml_used_mb if facts.gpus else None)
        return TuningService(tuner,
                             TuningMemory(self.state_dir), box=box_facts(facts),
                             cpu_count=facts.cpu_count or os.cpu_count() or 1,
                             planner=variant_plan, loadable=loadable)

    def _limits(self) -> dict[str, ModelLimits]:
        """Each model's scheduling limits: its section's, with the batch size its tuning
        chose when a tuned configuration serves (batching on)."""
        out = {}
        for m in self._models():
            limits = ModelLimits.from_section(m)
            batch = self.owner.tuned_batch(m.name)
            if batch and limits.max_batch_size > 0:
                limits = dataclasses.replace(limits, max_batch_size=batch)
            out[m.name] = limits
        return out

    def _models(self) -> tuple[ModelSection, ...]:
        return self.config.models

    @property
    def admin_socket(self) -> Path:
        """The local admin channel (see :func:`edgeagent.localapi.admin_socket_path`)."""
        from edgeagent.localapi import admin_socket_path

        return admin_socket_path(self.config, self.env)

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start every part in order; models that fail to load are reported, not fatal."""
        from edgeagent.localapi import hold_run_lock

        loop = asyncio.get_running_loop()
        self._run_lock = hold_run_lock(self.state_dir)
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
            from edgeagent.hub.source import HubSource, profile_chooser

            self.owner.hub = HubSource(self.config.hub, self.state_dir,
                                       profile_chooser(self.profile.profile, self.facts),
                                       base_dir=self.base_dir)
        self.owner.tuning = self._tuning()
        # A tuned configuration switched in may come with its own batch size.
        self.owner.subscribe(lambda: self.scheduler.configure(self._limits()))
        self.scheduler.configure(self._limits())
        # What the box has serves at once; the hub poll brings the rest.
        await self.owner.start(models)
        if demo and not all(self.manager.ready(m.name) for m in models):
            # First run: the demo hub is a local folder, so pull before serving and the
            # first curl gets an answer.
            await self.owner.sync_once()
        await self._start_http()
        await self._start_grpc()
        await self._start_metrics()
        await self._start_mqtt()  # last: the fleet sees the agent once it serves
        ready = [m.name for m in models if self.manager.ready(m.name)]
        waiting = [m.name for m in models if m.name not in ready]
        log.info("ready: serving %d of %d model(s)%s, HTTP on %s, admin channel %s",
                 len(ready), len(models),
                 f" (not serving yet: {', '.join(waiting)})" if waiting else "",
                 self.config.http.listen, self.admin_socket)

    async def _start_http(self) -> None:
        """The local API on ``http.listen``, and the admin channel on its Unix socket (whose
        file permissions authorise: no token there)."""
        from edgeagent.api.app import build_app

        listen = self.config.http.listen
        await self._serve(build_app(self.services), listen)
        admin = self.admin_socket
        try:
            await self._serve(build_app(self.services, trusted=True), f"unix:{admin}")
        except EdgeAgentError as exc:
            log.warning("no local admin channel (%s): operator commands need http.token_file",
                        exc)

    async def _serve(self, app: Any, listen: str) -> None:
        from edgeagent.api.protocol import bounded_protocol

        kwargs: dict[str, Any] = {}
        path = Path(listen[5:]) if listen.startswith("unix:") else None
        if path is not None:
            kwargs["uds"] = str(path)
        else:
            host, _, port = listen.rpartition(":")
            kwargs.update(host=host.strip("[]"), port=int(port))
        # uvicorn annotates int, but hands the value to asyncio.wait_for (a float is fine).
        grace: Any = self.config.agent.shutdown_grace_s
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            # httptools (C) parses ~20 % faster than h11; it bounds no request head of its own,
            # so the protocol class does (431; complete heads are checked by RequestGuard).
            http=bounded_protocol(self.config.http),
            ws="none",  # no WebSocket routes: uvicorn's "auto" would import websockets (~2 MB)
            timeout_graceful_shutdown=grace,
            **kwargs,
        )
        server = uvicorn.Server(config)
        # What Server.serve() does before startup(), without taking over the signal handlers.
        config.load()
        server.lifespan = config.lifespan_class(config)
        try:
            with unix_socket(path):
                await server.startup()
        except SystemExit as exc:  # uvicorn exits when it cannot bind (port in use)
            raise EdgeAgentError(f"cannot listen on {listen} (in use, or not permitted)") from exc
        except OSError as exc:  # the socket's folder, or what is at its path
            raise EdgeAgentError(f"cannot listen on {listen}: {exc.strerror}") from exc
        task = asyncio.create_task(server.main_loop(), name=f"http-main-loop {listen}")
        self._servers.append((server, task))

    # ---- gRPC (issue 14): the same services as HTTP, on the agent's own HTTP/2 ------------

    def _one_client(self) -> bool:
        """Whether at most one client is connected (HTTP connections on every listener, gRPC
        connections, a gRPC connection with several calls open counting each): the
        scheduler's "alone" rule for running a short inference on the event loop."""
        parties = sum(len(server.server_state.connections) for server, _ in self._servers)
        if self._grpc is not None:
            parties += self._grpc.parties()
        return parties <= 1

    async def _start_grpc(self) -> None:
        """Serve ``inference.GRPCInferenceService`` on ``grpc.listen`` (empty: not at all;
        its messages and protobuf are then never imported)."""
        listen = self.config.grpc.listen
        if not listen:
            return
        from edgeagent.api.grpc_server import GrpcServer

        server = GrpcServer(self.services, listen)
        await server.start()
        self._grpc = server
        log.info("gRPC on %s", listen)

    async def _stop_grpc(self) -> None:
        """Stop accepting gRPC calls; those in flight get the shutdown grace to finish."""
        if self._grpc is not None:
            await self._grpc.stop(self.config.agent.shutdown_grace_s)
            self._grpc = None

    # ---- reload -------------------------------------------------------------------------

    async def _start_metrics(self) -> None:
        """The optional ``[metrics] listen`` server (``GET /metrics`` only)."""
        if not self.config.metrics.listen:
            return
        from edgeagent.api.metrics import MetricsListener, metrics_app

        listener = MetricsListener(self.config.metrics.listen,
                                   metrics_app(self.services, self.metrics_token))
        await listener.start()
        self._metrics = listener

    async def reload(self, config: AgentConfig) -> ReloadPlan:
        """Apply what can change live from a newly read configuration (SIGHUP).

        Models added are loaded, removed ones unloaded, changed ones brought to their new
        target (the old version serves until the new one is ready), limits applied; the rest
        waits for a restart and is listed in the returned plan (see
        :mod:`edgeagent.service.reload`). Every model goes through the version owner, so a
        ``path`` model whose file was replaced in place becomes a new local version, and a hub
        model whose ``version`` changed is pulled.
        """
        plan = plan_reload(self.config, demo_config(config, self.state_dir))
        self.config = self.services.config = plan.config
        for server, _task in self._servers:
            # uvicorn annotates int, but hands the value to asyncio.wait_for (a float is fine).
            grace: Any = config.agent.shutdown_grace_s
            server.config.timeout_graceful_shutdown = grace
        models = self._models()
        before = {m.name: self._version_of(m.name) for m in models}
        self.scheduler.configure(self._limits())
        await self.owner.configure(models)
        outcomes = [(m.name, await self.owner.converge(m.name)) for m in models]
        # Models whose version changed without a change in their section (a replaced file).
        changed = tuple(n for n, o in outcomes
                        if n not in plan.load and o.decision.target is not None
                        and o.serving == o.decision.target and o.error == ""
                        and o.serving != before.get(n))
        _ok, failed = summary((n, o) for n, o in outcomes if n in plan.load or o.error)
        return dataclasses.replace(plan, load=plan.load + changed, failed=tuple(failed))

    def _version_of(self, name: str) -> int | None:
        try:
            return self.manager.get(name).version
        except EdgeAgentError:
            return None

    async def _start_mqtt(self) -> None:
        from edgeagent.control.link import FleetLink
        from edgeagent.telemetry.reporter import ModelFigures
        from edgeagent.telemetry.system import SystemSampler

        self.fleet = FleetLink(
            self.config, self.device_id, self.state_dir, version=__version__,
            system=SystemSampler(self.root, disk_path=self.state_dir),
            models=ModelFigures(self.scheduler.all_stats, self.manager.status),
            reported=self._reported, owner=self.owner, reload_config=self._reload_command)
        await self.fleet.start()

    def _reported(self) -> dict[str, Any]:
        status = self.status()
        return {"facts": self.facts.to_dict() if self.facts else None,
                "profile": status["profile"], "hub": status["hub"],
                "models": {m["name"]: {k: m.get(k) for k in (
                    "state", "version", "variant", "format", "precision", "provider",
                    "fallback", "last_error", "source", "source_kind", "target",
                    "operator_pin", "blocked", "overrides", "tuned", "tuning")}
                    for m in status["models"]},
                "rollouts": self.owner.rollouts(), "desired": self.owner.desired(),
                "refused": self.owner.refusals()}

    async def _reload_command(self) -> dict[str, Any]:
        """The MQTT ``reload-config`` command: re-read the file, apply what can change live."""
        from edgeagent.config import load_config

        source = self.config.source
        config = load_config(source if source != "embedded defaults" else None, self.env)
        plan = await self.reload(config)
        return {"summary": plan.summary(), "loaded": list(plan.load),
                "unloaded": list(plan.unload), "failed": list(plan.failed),
                "restart_keys": list(plan.restart_keys)}

    async def stop(self) -> None:
        """Stop in reverse order: MQTT (telemetry flushed to the spool, ``stopped`` published),
        HTTP (draining requests in flight), then models."""
        if self.fleet is not None:
            await self.fleet.stop()
            self.fleet = None
        self._draining = True
        grace = self.config.agent.shutdown_grace_s
        await self._stop_grpc()
        for server, _task in self._servers:
            server.should_exit = True
        for server, task in self._servers:
            await task
            await server.shutdown()
        self._servers = []
        if self._metrics is not None:
            await self._metrics.stop()
            self._metrics = None
        await self.owner.stop()
        await self.manager.close(grace)
        if self._run_lock is not None:
            os.close(self._run_lock)  # the commands see a stopped agent from now on
            self._run_lock = None
        self.services.shm.close()
        self.services.trimmer.close()
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
            "grpc": {"listen": self.config.grpc.listen},
            "backends": self.registry.status(),
            "admin_socket": str(self.admin_socket),
            "models": [{**m, **self.owner.describe(m["name"]),
                        "scheduling": self.scheduler.describe(m["name"])}
                       for m in self.manager.status() if m["name"] in self.owner.names()],
            "hub": (self.owner.hub.describe() if self.owner.hub
                    else {"configured": bool(self.config.hub.url)}),
            "desired": self.owner.desired(),
            "mqtt": (self.fleet.status() if self.fleet
                     else {"configured": bool(self.config.mqtt.url)}),
        }
