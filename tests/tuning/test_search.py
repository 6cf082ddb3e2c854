"""The search on real onnxruntime sessions with a measurer and clock driven by tables: the
checks gate, the budget, pruning, limits and the noise rule."""

from __future__ import annotations

from pathlib import Path

from edgeagent.runtime.registry import BackendRegistry
from edgeagent.tuning import Figures, Tuner
from edgeagent.tuning.candidates import candidates, default_candidate
from tests.tuning.helpers import (
    FakeClock,
    TableMeasurer,
    models,
    planner,
    section,
    variant,
    variant_planner,
)


def _search(tmp_path: Path, table: dict, *, cost_s: float = 1.0, memory: object = None,
            **tune: object):  # type: ignore[no-untyped-def]
    good, bad, checks = models(tmp_path)
    files = [variant(good, checks=checks), variant(bad, "int8", checks=checks)]
    s = section(**tune)
    default = default_candidate(files[0], variant_planner("onnx", "fp32", s_overrides(s)), s)
    cands = candidates(files, variant_planner, s, 2, default)
    clock = FakeClock()
    measurer = TableMeasurer(clock, table, cost_s=cost_s)
    tuner = Tuner(BackendRegistry(), planner, measurer, clock=clock,
                  memory=memory or (lambda: 0.0))  # type: ignore[arg-type]
    return tuner.search(s, 1, files, cands), measurer, clock


def s_overrides(s):  # type: ignore[no-untyped-def]
    from edgeagent.device.plan import PlanOverrides

    return PlanOverrides(s.providers, s.threads)


def test_candidates_are_variants_times_threads_default_first(tmp_path: Path) -> None:
    result, _, _ = _search(tmp_path, {})
    ids = [r.candidate.id for r in result.rows]
    assert ids[0] == "m.onnx|CPUExecutionProvider|t0|b1"
    assert sorted(ids) == sorted(f"{f}|CPUExecutionProvider|t{t}|b1"
                                 for f in ("m.onnx", "m-fast.onnx") for t in (0, 1, 2))
    assert result.rows[0].default


def test_a_faster_variant_that_fails_the_checks_is_never_chosen(tmp_path: Path) -> None:
    fast = Figures(1.0, 1.2, 1000.0, 0.01)
    table = {("m-fast.onnx", t): fast for t in (0, 1, 2)}
    table[("m.onnx", 1)] = Figures(8.0, 9.0, 150.0, 0.01)
    result, measurer, _ = _search(tmp_path, table)
    assert all(c.variant == "m.onnx" for c in measurer.measured)  # never measured, even
    rows = {r.candidate.id: r for r in result.rows}
    for t in (0, 1, 2):
        row = rows[f"m-fast.onnx|CPUExecutionProvider|t{t}|b1"]
        assert row.outcome == "failed checks"
        assert "logits" in row.why
    assert result.chosen is not None
    assert (result.chosen.variant, result.chosen.threads) == ("m.onnx", 1)
    assert result.margin == 1.5
    assert result.confirm == [1.5, 1.5, 1.5]  # the paired runs agree


def test_the_budget_ends_the_search_and_says_so(tmp_path: Path) -> None:
    # 40 s: 30 for the search (candidates at 0, 10 and 20 s), 10 kept to confirm a winner.
    result, measurer, clock = _search(tmp_path, {}, cost_s=10.0, budget_s=40.0)
    assert len(measurer.measured) == 3
    untried = [r for r in result.rows if r.outcome == "not tried"]
    assert len(untried) == 3
    assert all("time budget (40 s) was spent" in r.why for r in untried)
    assert result.elapsed_s == clock.now == 30.0  # all alike: nothing to confirm
    assert result.chosen == result.default


def test_a_winner_that_does_not_hold_up_in_paired_runs_is_not_chosen(tmp_path: Path) -> None:
    good, _, checks = models(tmp_path)
    files = [variant(good, checks=checks)]
    s = section()
    default = default_candidate(files[0], variant_planner("onnx", "fp32", s_overrides(s)), s)
    cands = candidates(files, variant_planner, s, 2, default)
    clock = FakeClock()
    lucky = Figures(5.0, 6.0, 200.0, 0.01)  # once, in the search; then like the default
    measurer = TableMeasurer(clock, {("m.onnx", 1): lucky})
    first = measurer.measure

    def measure(candidate, model, batch, deadline, beat):  # type: ignore[no-untyped-def]
        figures = first(candidate, model, batch, deadline, beat)
        if candidate.threads == 1:
            measurer.table = {}  # type: ignore[misc]
        return figures

    measurer.measure = measure  # type: ignore[method-assign]
    result = Tuner(BackendRegistry(), planner, measurer, clock=clock).search(s, 1, files, cands)
    assert result.chosen == result.default and result.margin == 1.0
    assert result.confirm == [1.0, 1.0, 1.0]
    row = next(r for r in result.rows if r.candidate.threads == 1)
    assert row.outcome == "lost" and "not beyond the noise" in row.why
    other = next(r for r in result.rows if r.candidate.threads == 2)
    assert other.why == "throughput 1.00x of the chosen one's"  # of the default, now
    assert clock.now <= s.tune.budget_s


def test_within_the_noise_the_default_stays(tmp_path: Path) -> None:
    table = {("m.onnx", 0): Figures(10.0, 12.0, 100.0, 0.08),
             ("m.onnx", 2): Figures(9.5, 11.0, 106.0, 0.02)}
    result, _, _ = _search(tmp_path, table)
    assert result.chosen == result.default
    assert result.margin == 1.0 and result.noise == 0.08
    row = next(r for r in result.rows if r.candidate.threads == 2 and
               r.candidate.variant == "m.onnx")
    assert row.outcome == "lost" and "within the noise (8.0 %)" in row.why


def test_pruned_and_over_the_limits_lose_with_their_reason(tmp_path: Path) -> None:
    table = {("m.onnx", 1): "p50 30 ms after 5 runs, over 2x the best so far",
             ("m.onnx", 2): Figures(2.0, 50.0, 900.0, 0.01)}
    result, _, _ = _search(tmp_path, table, max_p99_ms=20.0)
    rows = {(r.candidate.variant, r.candidate.threads): r for r in result.rows}
    assert rows[("m.onnx", 1)].outcome == "pruned"
    assert rows[("m.onnx", 2)].outcome == "over limit"
    assert "p99 50.000 ms, over the bound of 20 ms" in rows[("m.onnx", 2)].why
    assert result.chosen == result.default


def test_memory_budget_prunes_after_loading(tmp_path: Path) -> None:
    readings = iter([100.0, 100.0] + [100.0, 500.0] * 10)
    result, measurer, _ = _search(tmp_path, {}, max_memory_mb=100.0,
                                  memory=lambda: next(readings))
    over = [r for r in result.rows if r.outcome == "over limit"]
    assert over and all("over the memory budget of 100 MB" in r.why for r in over)
    assert len(measurer.measured) == 1  # only the default, whose load added nothing


def test_latency_objective(tmp_path: Path) -> None:
    table = {("m.onnx", 0): Figures(10.0, 12.0, 500.0, 0.01),
             ("m.onnx", 1): Figures(5.0, 6.0, 100.0, 0.01)}
    result, _, _ = _search(tmp_path, table, objective="latency")
    assert result.chosen is not None and result.chosen.threads == 1
    assert result.margin == 2.0


def test_gpu_memory_added_is_reported_when_read(tmp_path: Path) -> None:
    good, _, checks = models(tmp_path)
    files = [variant(good, checks=checks)]
    s = section(threads=(1,))
    default = default_candidate(files[0], variant_planner("onnx", "fp32", s_overrides(s)), s)
    cands = candidates(files, variant_planner, s, 2, default)
    clock = FakeClock()
    used = iter([1000.0, 1250.0] * len(cands))
    tuner = Tuner(BackendRegistry(), planner, TableMeasurer(clock, {}), clock=clock,
                  device_memory=lambda: next(used))
    result = tuner.search(s, 1, files, cands)
    assert {r.figures.device_mb for r in result.rows if r.figures} == {250.0}
    again = type(result).from_dict(result.to_dict())
    assert again.rows[0].figures is not None and again.rows[0].figures.device_mb == 250.0
