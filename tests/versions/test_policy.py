"""The pure policy of which version serves (DESIGN 3.5 precedence), table-driven."""

from __future__ import annotations

from dataclasses import replace

import pytest

from edgeagent.control.rollout import RolloutDoc, bucket
from edgeagent.versions.policy import (
    Decision,
    GroupDocs,
    Inputs,
    Pin,
    Rollout,
    decide,
    rollout_outcome,
)

DEVICE = "box-1"
# A rollout id whose bucket for DEVICE is known: inside at 50 %, outside at 10 %.
RID = next(f"r-{i}" for i in range(1000) if 1000 <= bucket(f"r-{i}", DEVICE) < 5000)


def roll(version: int, share: float, state: str = "running", base: int | None = 1,
         target: str = "group:lab") -> Rollout:
    return Rollout(RolloutDoc(RID, "m", version, share, state), target, base, DEVICE)


BASE = Inputs("m", "latest", hub_latest=5, available=frozenset({1, 2, 3}), active=2)

CASES: list[tuple[str, Inputs, int | None, str, str]] = [
    ("latest follows the hub", BASE, 5, "config", "config: latest"),
    ("an integer version", replace(BASE, configured=3), 3, "config", "config: version 3"),
    ("latest, hub not reached: the last active",
     replace(BASE, hub_latest=None), 2, "config",
     "config: latest (hub not reached yet; the last active version)"),
    ("latest, hub not reached, nothing active: newest in store",
     replace(BASE, hub_latest=None, active=None), 3, "config",
     "config: latest (hub not reached yet; newest in store)"),
    ("a path model: the version its file holds",
     replace(BASE, configured=None, local_version=4), 4, "config", "config: file"),
    ("the operator's pin wins over everything",
     replace(BASE, operator_pin=1, device=Pin(3, 7), fleet_rollout=roll(4, 100)), 1,
     "operator", "operator pin"),
    ("the device document wins over groups and the fleet",
     replace(BASE, device=Pin(3, 7), groups=[GroupDocs("lab", roll(4, 100), Pin(2, 1))],
             fleet_rollout=roll(5, 100, target="fleet")), 3, "device",
     "device pin, revision 7"),
    ("a group's rollout wins over its desired document",
     replace(BASE, groups=[GroupDocs("lab", roll(4, 50), Pin(2, 1))]), 4, "group-rollout",
     f"rollout {RID} at 50 %"),
    ("outside the share: the base, not latest",
     replace(BASE, groups=[GroupDocs("lab", roll(4, 10, base=2))]), 2, "group-rollout",
     f"rollout {RID} at 10 %: outside the share, on its base"),
    ("aborted: back to the base",
     replace(BASE, groups=[GroupDocs("lab", roll(4, 100, "aborted", base=1))]), 1,
     "group-rollout", f"rollout {RID} aborted: back to its base"),
    ("paused keeps the share",
     replace(BASE, groups=[GroupDocs("lab", roll(4, 50, "paused"))]), 4, "group-rollout",
     f"rollout {RID} at 50 %"),
    ("the first tag's group wins",
     replace(BASE, groups=[GroupDocs("a", desired=Pin(1, 3)), GroupDocs("b", desired=Pin(3, 9))]),
     1, "group", "group a, revision 3"),
    ("a group document wins over the fleet rollout",
     replace(BASE, groups=[GroupDocs("lab", desired=Pin(3, 2))],
             fleet_rollout=roll(4, 100, target="fleet")), 3, "group", "group lab, revision 2"),
    ("the fleet rollout, no group document",
     replace(BASE, groups=[GroupDocs("lab")], fleet_rollout=roll(4, 100, target="fleet")), 4,
     "fleet-rollout", f"rollout {RID} at 100 %"),
    ("named by a rollout with no base, outside: stays where it is, not latest",
     replace(BASE, fleet_rollout=roll(4, 10, base=None, target="fleet")), 2, "config",
     "fleet: outside the rollout's share; staying on the active version"),
]


@pytest.mark.parametrize(("inputs", "target", "kind", "source"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_precedence(inputs: Inputs, target: int | None, kind: str, source: str) -> None:
    decision = decide(inputs)
    assert (decision.target, decision.kind, decision.source) == (target, kind, source)


def test_a_failed_target_is_blocked_with_its_reason() -> None:
    decision = decide(replace(BASE, failed={5: "check 0: output off"}))
    assert (decision.target, decision.blocked) == (5, "check 0: output off")


def test_fleet_control_is_flagged() -> None:
    assert not decide(BASE).fleet
    assert decide(replace(BASE, device=Pin(1, 1))).fleet
    assert decide(replace(BASE, groups=[GroupDocs("lab", roll(4, 10))])).fleet


@pytest.mark.parametrize(
        ("rollout", "decision_kind", "serving", "failed", "switched", "expected"), [
    (roll(4, 50), "group-rollout", 4, {}, True, "applied"),
    (roll(4, 50), "group-rollout", 2, {}, False, "pending"),
    (roll(4, 50), "group-rollout", 2, {4: "bad"}, False, "failed"),
    (roll(4, 100, "aborted", base=2), "group-rollout", 2, {4: "bad"}, False, "failed"),
    (roll(4, 10, base=2), "group-rollout", 2, {}, False, "base"),
    (roll(4, 100, "aborted", base=1), "group-rollout", 1, {}, True, "reverted"),
    (roll(4, 100, "aborted", base=1), "group-rollout", 1, {}, False, "base"),
    (roll(4, 100, "aborted", base=1), "group-rollout", 4, {}, True, "pending"),
    (roll(4, 50), "device", 3, {}, False, "held"),
])
def test_rollout_outcomes(rollout: Rollout, decision_kind: str, serving: int,
                          failed: dict[int, str], switched: bool, expected: str) -> None:
    decision = (Decision(rollout.wanted(), decision_kind, "", True, rollout)
                if decision_kind == "group-rollout" else Decision(3, "device", "device pin"))
    assert rollout_outcome(rollout, decision, serving, failed, switched)[0] == expected
