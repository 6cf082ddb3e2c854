"""Random sequences of everything that can change a model's version, against a real agent
(in-process), a real loopback hub and real onnxruntime sessions, with invariants checked after
every step (hypothesis.stateful):

- what serves is the policy's target, or, when that target failed here, the last good version,
  with the failure recorded;
- ``status`` and ``reported`` say the same version and the same reason;
- the history (active, previous, failed, the operator's pin) survives a restart and a kill;
- the state file is never half written (it always parses; no temporary file is left).

A kill is simulated by stopping the process's work at a named step of an activation
(``loaded``: swapped but not yet recorded; ``state-written``: recorded, not yet collected) and
starting a new agent on the same state directory; the real SIGKILL at every step is
``tests/hub/test_hub_kill.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path
from typing import Any

from edgeconvert.hub import Hub
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from edgeagent.app import Agent
from edgeagent.config import parse_config
from edgeagent.control.rollout import RolloutDoc
from edgeagent.errors import EdgeAgentError
from edgeagent.versions.history import History
from tests.agentthread import free_port
from tests.hub.helpers import release
from tests.hub.hubserver import HubServer


class Killed(BaseException):
    """The simulated end of the process at a named step (not an error the agent handles)."""


class VersionsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(prefix="edgeagent-stateful-")
        root = Path(self.tmp.name)
        self.hub = Hub(root / "hub", root / "keys")
        self.hub.init()
        self.server = HubServer(self.hub.dir)
        self.work = root / "work"
        self.state = root / "state"
        self.loop = asyncio.new_event_loop()
        self.published: list[int] = []
        self.bad: set[int] = set()
        self.configured: int | str = "latest"
        self.kill_at = ""
        self.agent: Agent | None = None
        self.rollout_seq = 0

    # ---- plumbing -----------------------------------------------------------------------

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def config(self) -> Any:
        return parse_config({
            "agent": {"state_dir": str(self.state), "device_id": "stateful",
                      "tags": ["lab"], "shutdown_grace_s": 1.0},
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "hub": {"url": self.server.url, "root": str(self.hub.meta_dir / "1.root.json"),
                    "poll_interval_s": 3600, "keep_versions": 2},
            "models": [{"name": "m", "version": self.configured}],
        })

    def _step(self, name: str) -> None:
        if name == self.kill_at:
            self.kill_at = ""
            raise Killed(name)

    async def _start(self) -> None:
        agent = Agent(self.config())
        agent.owner._on_step = self._step  # where a kill lands (tests only)
        await agent.start()
        self.agent = agent

    async def _stop(self) -> None:
        if self.agent is not None:
            agent, self.agent = self.agent, None
            await agent.stop()

    def act(self, coro: Any) -> None:
        """Run one operation; a refusal is an answer, a kill ends this agent's life."""
        try:
            self.run(coro)
        except EdgeAgentError:
            pass
        except Killed:
            self.run(self._stop())
            self.run(self._start())

    def settle(self) -> None:
        """A poll pass, as the agent's loop would run next."""
        assert self.agent is not None
        self.act(self.agent.owner.sync_once())

    # ---- rules --------------------------------------------------------------------------

    @initialize()
    def first_release(self) -> None:
        self.publish_release(bad=False)
        self.run(self._start())
        self.settle()

    @rule(bad=st.booleans())
    def publish_release(self, bad: bool = False) -> None:
        version = len(self.published) + 1
        release(self.hub, self.work, version, wrong_checks=bad)
        self.published.append(version)
        if bad:
            self.bad.add(version)
        if self.agent is not None:
            self.settle()

    @rule(pick=st.integers(min_value=0, max_value=20))
    def pull_pinned(self, pick: int) -> None:
        assert self.agent is not None
        self.act(self.agent.owner.pin("m", self.published[pick % len(self.published)]))
        self.settle()

    @rule()
    def pull_follow(self) -> None:
        assert self.agent is not None
        self.act(self.agent.owner.unpin("m"))
        self.settle()

    @rule()
    def rollback(self) -> None:
        assert self.agent is not None
        self.act(self.agent.owner.rollback("m"))
        self.settle()

    @rule(pick=st.one_of(st.just("latest"), st.integers(min_value=0, max_value=20)))
    def edit_config_and_sighup(self, pick: int | str) -> None:
        assert self.agent is not None
        self.configured = pick if isinstance(pick, str) else \
            self.published[pick % len(self.published)]
        self.act(self.agent.reload(self.config()))
        self.settle()

    @rule(pick=st.one_of(st.none(), st.integers(min_value=0, max_value=20)),
          group=st.booleans(), revision=st.integers(min_value=0, max_value=10**6))
    def desired_document(self, pick: int | None, group: bool, revision: int) -> None:
        assert self.agent is not None
        payload = b""
        if pick is not None:
            version = self.published[pick % len(self.published)]
            payload = (b'{"revision": %d, "models": {"m": {"version": %d}}}'
                       % (revision, version))
        source = "group:lab" if group else "device"
        self.act(self.agent.owner.receive_desired(source, payload))
        self.settle()

    @rule(pick=st.integers(min_value=0, max_value=20),
          share=st.sampled_from([0.0, 10.0, 50.0, 100.0]),
          state=st.sampled_from(["running", "paused", "aborted", "done"]),
          fleet=st.booleans(), new=st.booleans())
    def rollout_document(self, pick: int, share: float, state: str, fleet: bool,
                         new: bool) -> None:
        assert self.agent is not None
        if new:
            self.rollout_seq += 1
        version = self.published[pick % len(self.published)]
        doc = RolloutDoc(f"r-{self.rollout_seq}", "m", version, share, state)
        self.act(self.agent.owner.receive_rollout("fleet" if fleet else "group:lab", "m",
                                                  doc.payload()))
        self.settle()

    @rule()
    def withdraw_rollouts(self) -> None:
        assert self.agent is not None
        for target in ("fleet", "group:lab"):
            self.act(self.agent.owner.receive_rollout(target, "m", b""))
        self.settle()

    @rule()
    def restart(self) -> None:
        before = History(self.state).read().model("m")
        self.run(self._stop())
        self.run(self._start())
        after = History(self.state).read().model("m")
        assert (after.previous, after.failed, after.operator_pin) == \
            (before.previous, before.failed, before.operator_pin)
        self.settle()

    @rule(step=st.sampled_from(["loaded", "state-written", "collected"]),
          pick=st.integers(min_value=0, max_value=20))
    def kill_during_a_pin(self, step: str, pick: int) -> None:
        assert self.agent is not None
        self.kill_at = step
        self.act(self.agent.owner.pin("m", self.published[pick % len(self.published)]))
        self.kill_at = ""
        self.settle()

    # ---- invariants ---------------------------------------------------------------------

    @invariant()
    def serves_the_target_or_the_last_good_version(self) -> None:
        if self.agent is None:
            return
        owner = self.agent.owner
        hist = History(self.state).read().model("m")
        decision = owner.decision("m")
        try:
            serving: int | None = self.agent.manager.get("m").version
        except EdgeAgentError:
            serving = None
        if serving is not None:
            assert hist.active == serving, (hist, serving)
        for version in self.bad:
            assert serving != version, f"version {version} fails its checks, yet serves"
        if decision.target is None:
            return
        if decision.target in hist.failed:
            assert serving == hist.active, (decision, hist, serving)
            assert decision.target in self.bad or "hub" in hist.failed[decision.target]
        elif decision.target in self.published:
            assert serving == decision.target, (decision, hist, serving)

    @invariant()
    def status_and_reported_agree(self) -> None:
        if self.agent is None:
            return
        (model,) = self.agent.status()["models"]
        reported = self.agent._reported()["models"]["m"]
        for key in ("version", "source", "source_kind", "target", "operator_pin"):
            assert model.get(key) == reported.get(key), key

    @invariant()
    def the_state_file_is_whole(self) -> None:
        History(self.state).read()  # raises on a torn file
        assert not list(self.state.glob(".*.tmp"))

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self._stop())
        self.loop.close()
        self.server.close()
        self.tmp.cleanup()


VersionsMachine.TestCase.settings = settings(
    max_examples=8, stateful_step_count=10, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_versions_stateful = VersionsMachine.TestCase
