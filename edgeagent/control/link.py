"""The agent's MQTT side in one lifecycle: telemetry and reported state out, desired state and
commands in (DESIGN 3.5). Built and started by the composition root, after everything else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from edgeagent.config import AgentConfig
from edgeagent.control.commands import Action, CommandError, CommandHandler
from edgeagent.errors import BrokerError
from edgeagent.telemetry.mqtt import BrokerSettings, Message, MqttClient
from edgeagent.telemetry.reporter import ModelFigures, Reporter, dumps, presence_will
from edgeagent.telemetry.spool import Spool
from edgeagent.telemetry.system import SystemSampler
from edgeagent.telemetry.topics import Topics

log = logging.getLogger(__name__)


class VersionAuthority(Protocol):
    """What the MQTT side hands fleet documents to: the version owner
    (:class:`edgeagent.versions.owner.VersionOwner`); it decides, this module only carries."""

    async def receive_desired(self, source: str, payload: bytes) -> Any: ...

    async def receive_rollout(self, target: str, model: str, payload: bytes) -> None: ...

    async def sync_once(self) -> float: ...

    async def prune_documents(self, received: set[str]) -> None: ...

    def desired(self) -> dict[str, Any]: ...

    def subscribe(self, listener: Callable[[], None]) -> None: ...


class FleetLink:
    """Telemetry, presence, reported state, desired state and commands for one device.

    Args:
        config: The agent configuration (``[mqtt]``, ``[agent] tags``).
        device_id: This device's id (a topic level).
        state_dir: Where the spool and the control state live.
        version: The agent's version.
        system: System figures sampler.
        models: Per-model figures.
        reported: The agent's part of the reported state (facts, profile, models, hub,
            rollouts, desired outcome).
        owner: Decides model versions from the fleet's documents (with the other sources).
        reload_config: Re-reads the configuration (the ``reload-config`` command).
        backoff: Reconnection delays (smallest, largest) in seconds.
        settle_s: After each connect, how long the broker's retained fleet documents are
            waited for; a document kept on the box that the broker no longer holds (withdrawn
            while the box was offline) is dropped then.
    """

    def __init__(self, config: AgentConfig, device_id: str, state_dir: Path, *, version: str,
                 system: SystemSampler, models: ModelFigures,
                 reported: Callable[[], dict[str, Any]], owner: VersionAuthority,
                 reload_config: Callable[[], Awaitable[dict[str, Any]]],
                 backoff: tuple[float, float] = (0.5, 30.0), settle_s: float = 15.0) -> None:
        m = config.mqtt
        self.topics = Topics(m.topic_prefix, device_id)
        self.groups = config.agent.tags
        self.version = version
        self._reported = reported
        self._system = system
        self._models = models
        self.owner = owner
        self.spool = Spool(state_dir / "telemetry" / "spool.sqlite3", m.spool_max_messages,
                           m.spool_max_bytes)
        self.client: MqttClient | None = None
        if m.url:
            settings = BrokerSettings.from_section(m, client_id=f"edgeagent-{device_id}")
            self.client = MqttClient(settings, will=presence_will(self.topics, version),
                                     on_connect=self._on_connect, backoff=backoff)
        self.reporter = Reporter(self.client, self.spool, self.topics,
                                 interval_s=m.telemetry_interval_s, telemetry=self._telemetry,
                                 reported=self._reported_state, version=version,
                                 reannounce_s=m.reported_interval_s)
        owner.subscribe(self._changed)
        actions: dict[str, Action] = {
            "ping": self._ping, "sync": self._sync, "rollback": self._rollback,
            "reload-config": lambda _doc: reload_config(),
        }
        self.commands = CommandHandler(actions, state_dir / "control" / "commands.json")
        self._work: set[asyncio.Task[None]] = set()
        self._report_pending = False
        self.settle_s = settle_s
        self._connection = 0
        self._received: set[str] = set()

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start telemetry and (when a broker is configured) the connection; returns at once."""
        await self.reporter.start()
        if self.client is not None:
            self.client.subscribe(self.topics.desired, self._on_desired)
            for group in self.groups:
                self.client.subscribe(self.topics.group_desired(group), self._on_desired)
                self.client.subscribe(self.topics.group_rollouts(group), self._on_rollout)
            self.client.subscribe(self.topics.fleet_rollouts, self._on_rollout)
            self.client.subscribe(self.topics.commands, self._on_command)
            await self.client.start()

    async def stop(self) -> None:
        """Spool the last telemetry, publish ``stopped``, disconnect cleanly."""
        for task in list(self._work):
            task.cancel()
        await asyncio.gather(*self._work, return_exceptions=True)
        await self.reporter.stop()
        if self.client is not None:
            await self.client.stop()
        self.spool.close()

    def status(self) -> dict[str, Any]:
        """The MQTT part of ``edgeagent status``."""
        out: dict[str, Any] = {"configured": self.client is not None,
                               "spool": self.spool.stats().to_dict(),
                               "desired": self.owner.desired()}
        if self.client is not None:
            out.update(self.client.status())
        return out

    # ---- out -----------------------------------------------------------------------------

    def _telemetry(self) -> dict[str, Any]:
        return {"system": self._system.sample(), "models": self._models.sample()}

    def _reported_state(self) -> dict[str, Any]:
        return {**self._reported(), "device_id": self.topics.device_id, "version": self.version,
                "tags": list(self.groups)}

    async def _on_connect(self) -> None:
        self._connection += 1
        self._received = set()
        connection = self._connection

        async def prune() -> None:
            # Retained messages follow the SUBACK at once; what has not come by now is gone
            # from the broker (withdrawn while this box was offline).
            await asyncio.sleep(self.settle_s)
            if connection == self._connection and self.client is not None \
                    and self.client.connected:
                await self.owner.prune_documents(set(self._received))

        self._spawn(prune())
        await self.reporter.on_connect()

    def _changed(self) -> None:
        """A model's version or reason changed: publish the reported state (once per burst)."""
        if self.client is None or self._report_pending:
            return
        self._report_pending = True

        async def report() -> None:
            await asyncio.sleep(0)  # let a burst of changes settle into one message
            self._report_pending = False
            await self._report()

        self._spawn(report())

    async def _report(self) -> None:
        try:
            await self.reporter.publish_reported()
        except BrokerError as exc:
            log.debug("reported state not sent: %s", exc)

    # ---- in ------------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> None:
        # Reconciling loads models (seconds): run it aside so commands keep being answered.
        task = asyncio.ensure_future(coro)
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    async def _on_desired(self, msg: Message) -> None:
        if msg.topic == self.topics.desired:
            source = "device"
        else:
            group = msg.topic[len(self.topics.prefix) + len("/groups/"):-len("/desired")]
            source = f"group:{group}"

        self._received.add(source)

        async def run() -> None:
            await self.owner.receive_desired(source, msg.payload)
            await self._report()

        self._spawn(run())

    async def _on_rollout(self, msg: Message) -> None:
        """``{prefix}/groups/{g}/rollouts/{model}`` or ``{prefix}/fleet/rollouts/{model}``."""
        rest = msg.topic[len(self.topics.prefix) + 1:]
        head, _, model = rest.rpartition("/rollouts/")
        target = "fleet" if head == "fleet" else f"group:{head[len('groups/'):]}"
        self._received.add(f"rollout:{target}/{model}")

        async def run() -> None:
            await self.owner.receive_rollout(target, model, msg.payload)
            await self._report()

        self._spawn(run())

    async def _on_command(self, msg: Message) -> None:
        request_id = msg.topic.rsplit("/", 1)[1]

        async def run() -> None:
            result = await self.commands.handle(request_id, msg.payload)
            if result is None or self.client is None:
                return
            try:
                await self.client.publish(self.topics.result(request_id), dumps(result))
            except BrokerError as exc:
                log.warning("result of command %s not sent: %s", request_id, exc)
            await self._report()

        self._spawn(run())

    async def _ping(self, _doc: Any) -> dict[str, Any]:
        return {"pong": True, "version": self.version}

    async def _sync(self, _doc: Any) -> dict[str, Any]:
        await self.owner.sync_once()
        return {"desired": self.owner.desired()}

    async def _rollback(self, _doc: Any) -> dict[str, Any]:
        # A fleet-issued rollback would be a fourth source of versions that nothing clears:
        # the fleet rolls back with a rollout (or pins with the device document).
        raise CommandError("rollback is done by the fleet controller as a rollout back to the "
                           "previous version ('edgeagent fleet rollback'), or by a device pin "
                           "in the device's desired document; the operator rolls back on the "
                           "box with 'edgeagent rollback NAME'")
