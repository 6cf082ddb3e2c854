"""The timed measurer on a fake clock (pruning, figures), and the stored result's key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgeagent.config import TuneSection
from edgeagent.runtime.base import TensorSpec
from edgeagent.tuning import Candidate, Figures, Pruned, Row, TimedMeasurer, TuneResult
from edgeagent.tuning.memory import TuningMemory, key_doc
from tests.tuning.helpers import BOX, FakeClock, variant

CAND = Candidate("m.onnx", "onnx", "fp32", "CPUExecutionProvider", 1)


class ClockModel:
    """A model whose every run takes ``cost_s`` on the fake clock."""

    inputs = (TensorSpec("x", "FP32", (-1, 4)),)

    def __init__(self, clock: FakeClock, cost_s: float) -> None:
        self.clock, self.cost_s, self.runs = clock, cost_s, 0

    def run(self, feeds: Any, names: Any = None) -> dict[str, Any]:
        assert feeds["x"].shape[1] == 4
        self.runs += 1
        self.clock.advance(self.cost_s * feeds["x"].shape[0])
        return {}


def test_measurer_prunes_a_candidate_far_slower_than_the_best() -> None:
    clock = FakeClock()
    model = ClockModel(clock, 0.010)
    with pytest.raises(Pruned, match=r"p50 10.000 ms after 5 runs, over 2x .* \(2.000 ms\)"):
        TimedMeasurer(clock, probe_s=0).measure(CAND, model, 1, 1.0, 2.0)  # type: ignore[arg-type]
    assert model.runs == 6  # one warm-up, five probe runs: no more
    # By default the probe also lasts 0.25 s (25 runs of 10 ms), whatever the run count.
    model.runs = 0
    with pytest.raises(Pruned, match=r"after 25 runs"):
        TimedMeasurer(clock).measure(CAND, model, 1, clock() + 10.0, 2.0)  # type: ignore[arg-type]
    assert model.runs == 26


def test_measurer_figures_on_a_fake_clock() -> None:
    clock = FakeClock()
    model = ClockModel(clock, 0.010)
    f = TimedMeasurer(clock, latency_runs=20).measure(CAND, model, 4, 2.0, 20.0)  # type: ignore[arg-type]
    assert f.p50_ms == pytest.approx(10.0) and f.p99_ms == pytest.approx(10.0)
    assert f.throughput == pytest.approx(100.0)  # 4 items per 40 ms
    assert f.noise == pytest.approx(0.0, abs=1e-9)
    assert clock.now <= 2.1  # stayed within its slice (a run or two of slack)


def _result() -> TuneResult:
    row = Row(CAND, "chosen", "best", Figures(1.0, 2.0, 3.0), default=True)
    return TuneResult("m", 1, "throughput", CAND, CAND, [row], 1.0)


def test_a_stored_result_is_reused_for_the_same_key_only(tmp_path: Path) -> None:
    files = [variant(tmp_path / "m.onnx")]
    doc = key_doc(files, BOX, [CAND], TuneSection())
    memory = TuningMemory(tmp_path)
    assert memory.recall("m", doc) is None
    memory.remember("m", doc, _result())
    again = TuningMemory(tmp_path).recall("m", doc)  # a restart reads it back
    assert again is not None and again.chosen == CAND and again.rows[0].figures == Figures(
        1.0, 2.0, 3.0)
    changed = [
        key_doc(files, {**BOX, "cpu_flags": ["avx512f"]}, [CAND], TuneSection()),
        key_doc(files, {**BOX, "packages": {"onnxruntime": "2"}}, [CAND], TuneSection()),
        key_doc([variant(tmp_path / "m2.onnx")], BOX, [CAND], TuneSection()),
        key_doc(files, BOX, [CAND, Candidate("m.onnx", "onnx", "fp32", "X", 1)],
                TuneSection()),
        key_doc(files, BOX, [CAND], TuneSection(objective="latency")),
    ]
    for other in changed:
        assert memory.recall("m", other) is None
    assert memory.recall("m", key_doc(files, BOX, [CAND], TuneSection(enabled=False))) \
        is not None  # on or off does not change what the result is


def test_an_unreadable_result_is_tuned_again(tmp_path: Path) -> None:
    files = [variant(tmp_path / "m.onnx")]
    doc = key_doc(files, BOX, [CAND], TuneSection())
    (tmp_path / "tuning").mkdir()
    (tmp_path / "tuning" / "m.json").write_text("{not json")
    assert TuningMemory(tmp_path).recall("m", doc) is None
