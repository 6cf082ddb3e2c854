"""Which version of a model serves, and why: one pure function (DESIGN 3.5, 3.6).

:func:`decide` takes everything that has a say (the operator's pin, the fleet's documents, the
configuration) and what the box knows (the versions it can get, what failed) and returns the
target version with the reason a person reads in ``status`` and ``reported``. No I/O, no
clock, no globals: the version owner gathers the inputs, calls it, and acts on the answer.

Precedence, most specific first: the operator's pin on the box; the device document; for each
of the device's groups in tag order, that group's rollout, else its desired document; the
fleet-wide rollout; the configuration. A model named by any fleet document is under fleet
control: a new hub release reaches it only through those documents. A rollout decides only
when the device is in its share or has a base to go back to; otherwise the next source down
decides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from edgeagent.control.rollout import ACTIVE_STATES, RolloutDoc, bucket, share_threshold

#: What decided a model's version (``reported.models[NAME].source_kind``).
KINDS = ("operator", "device", "group", "group-rollout", "fleet-rollout", "config")


@dataclass(frozen=True)
class Pin:
    """A version a desired document names, with the document's revision."""

    version: int
    revision: int


@dataclass(frozen=True)
class Rollout:
    """A rollout document as one device sees it: its base and its bucket."""

    doc: RolloutDoc
    target: str
    """``group:NAME`` or ``fleet``."""
    base: int | None
    """The version the device ran when it first saw the rollout id (None: nothing served)."""
    device_id: str

    @property
    def bucket(self) -> int:
        return bucket(self.doc.rollout_id, self.device_id)

    @property
    def in_share(self) -> bool:
        """The device's bucket is inside the document's share (whatever its state)."""
        return self.bucket < share_threshold(self.doc.share)

    @property
    def asks_version(self) -> bool:
        """The rollout asks this device to run its version now (inside the share, not
        aborted)."""
        return self.doc.state in ACTIVE_STATES and self.in_share

    def wanted(self) -> int | None:
        """The version this rollout asks of the device: its version inside the share, its base
        outside it (or after an abort), None when it has nothing to say (outside, no base)."""
        return self.doc.version if self.asks_version else self.base


@dataclass(frozen=True)
class GroupDocs:
    """What one of the device's groups says about a model."""

    group: str
    rollout: Rollout | None = None
    desired: Pin | None = None


@dataclass(frozen=True)
class Inputs:
    """Everything that has a say in one model's version on this box."""

    name: str
    configured: int | str | None
    """The config's ``version`` (an integer or ``latest``), or None for a ``path`` model."""
    local_version: int | None = None
    """A ``path`` model: the version its configured file holds now."""
    operator_pin: int | None = None
    device: Pin | None = None
    groups: Sequence[GroupDocs] = ()
    fleet_rollout: Rollout | None = None
    hub_latest: int | None = None
    """The newest release the hub lists (None: not known yet, e.g. hub unreachable)."""
    available: frozenset[int] = frozenset()
    """Versions the box has in its store (it can activate them without the hub)."""
    failed: Mapping[int, str] = field(default_factory=dict)
    active: int | None = None
    """The version the history says is active (what the box served last)."""


@dataclass(frozen=True)
class Decision:
    """The answer for one model."""

    target: int | None
    """The version that should serve; None when nothing can be decided yet."""
    kind: str
    """Which source decided (one of :data:`KINDS`)."""
    source: str
    """What decided it, for a person: ``rollout r-12 at 25 %``, ``device pin, revision 7``."""
    fleet: bool = False
    """The model is under fleet control (a fleet document names it)."""
    rollout: Rollout | None = None
    """The rollout that decided, if one did."""
    held_by: str = ""
    """Set on rollouts that a more specific source overrides (see :func:`rollout_outcomes`)."""
    blocked: str = ""
    """Why the target will not be tried: it failed on this box before (the reason)."""

    def with_failures(self, failed: Mapping[int, str]) -> Decision:
        if self.target is not None and self.target in failed:
            return Decision(self.target, self.kind, self.source, self.fleet, self.rollout,
                            blocked=failed[self.target])
        return self


def _config(inputs: Inputs) -> tuple[int | None, str]:
    configured = inputs.configured
    if configured is None:  # a path model: the version its file holds
        return inputs.local_version, "config: file"
    if isinstance(configured, int):
        return configured, f"config: version {configured}"
    # latest: the hub's newest; while the hub is not known, what served last (else the newest
    # in the store), so a box without its hub keeps serving.
    if inputs.hub_latest is not None:
        return inputs.hub_latest, "config: latest"
    if inputs.active is not None:
        return inputs.active, "config: latest (hub not reached yet; the last active version)"
    if inputs.available:
        return max(inputs.available), "config: latest (hub not reached yet; newest in store)"
    return None, "config: latest (hub not reached yet)"


def _fleet_named(inputs: Inputs) -> bool:
    return (inputs.device is not None or inputs.fleet_rollout is not None
            or any(g.rollout is not None or g.desired is not None for g in inputs.groups))


def decide(inputs: Inputs) -> Decision:
    """The version ``inputs.name`` should serve, and why (pure)."""
    fleet = _fleet_named(inputs)
    decision: Decision | None = None
    if inputs.operator_pin is not None:
        decision = Decision(inputs.operator_pin, "operator", "operator pin", fleet)
    elif inputs.device is not None:
        decision = Decision(inputs.device.version, "device",
                            f"device pin, revision {inputs.device.revision}", fleet)
    else:
        for g in inputs.groups:
            if g.rollout is not None and g.rollout.wanted() is not None:
                decision = _from_rollout(g.rollout, "group-rollout")
                break
            if g.desired is not None:
                decision = Decision(g.desired.version, "group",
                                    f"group {g.group}, revision {g.desired.revision}", True)
                break
        if decision is None and inputs.fleet_rollout is not None \
                and inputs.fleet_rollout.wanted() is not None:
            decision = _from_rollout(inputs.fleet_rollout, "fleet-rollout")
    if decision is None:
        target, source = _config(inputs)
        if fleet:
            # Named by a fleet document that has nothing to say for this device now (a rollout
            # it is outside of, with no base): it stays where it is, never on a new release.
            target = inputs.active if inputs.active is not None else target
            source = "fleet: outside the rollout's share; " + (
                "staying on the active version" if inputs.active is not None else source)
        decision = Decision(target, "config", source, fleet)
    return decision.with_failures(inputs.failed)


def _from_rollout(rollout: Rollout, kind: str) -> Decision:
    doc = rollout.doc
    if rollout.asks_version:
        source = doc.describe()
    elif doc.state == "aborted":
        source = f"rollout {doc.rollout_id} aborted: back to its base"
    else:
        source = f"rollout {doc.rollout_id} at {doc.share:g} %: outside the share, on its base"
    return Decision(rollout.wanted(), kind, source, True, rollout)


def rollout_outcome(rollout: Rollout, decision: Decision, serving: int | None,
                    failed: Mapping[int, str], switched: bool = False) -> tuple[str, str]:
    """How a device stands in a rollout, for ``reported.rollouts`` (pure).

    Args:
        rollout: The rollout as this device sees it.
        decision: What decides the rollout's model here now.
        serving: The version serving.
        failed: Versions that failed here, with why.
        switched: Whether this device ran the rollout's version at some point.

    Returns:
        (outcome, error): ``held`` (a more specific source decides the model here), ``failed``
        (the rollout's version failed here; the last good one serves; kept after an abort, so a
        controller's counts stay true), ``applied`` (runs the version), ``pending`` (switching),
        ``reverted`` (aborted after it had switched; back on the base), ``base`` (outside the
        share, or aborted before it switched, on its base).
    """
    doc = rollout.doc
    if decision.rollout is None or decision.rollout.doc.rollout_id != doc.rollout_id:
        return "held", f"decided by {decision.source}"
    if doc.version in failed:
        return "failed", failed[doc.version]
    if doc.state == "aborted":
        if serving != rollout.base:
            return "pending", ""
        return ("reverted", "") if switched else ("base", "")
    if rollout.asks_version:
        return ("applied", "") if serving == doc.version else ("pending", "")
    return ("base", "") if serving == rollout.base else ("pending", "")
