"""Per-version figures in ModelStats: what the ``version`` label on /metrics reads."""

from __future__ import annotations

from edgeagent.runtime.stats import MAX_VERSIONS, ModelStats


def test_each_version_is_counted_apart_and_the_totals_cover_all() -> None:
    s = ModelStats("m")
    s.request_done(True, 2_000_000, 100_000, version=1)
    s.request_done(False, 1_000_000, 0, version=1)
    s.execution_done(1, 1_500_000, version=1)
    s.request_done(True, 3_000_000, 0, version=2)
    s.execution_done(4, 2_000_000, requests=4, version=2)
    s.reject(version=2)
    s.request_done(True, 1_000_000, 0)  # a caller that does not say: totals only
    v1, v2 = s.versions[1], s.versions[2]
    assert (v1.success, v1.failure, v1.executions, v1.rejected) == (1, 1, 1, 0)
    assert (v2.success, v2.failure, v2.executions, v2.rejected) == (1, 0, 1, 1)
    assert v1.latency.cumulative()[-1] == ("+Inf", 1) and v1.latency.total == 0.002
    assert dict(v2.batch_sizes) == {4: 1}
    assert (s.inference_count, s.fail.count, s.rejected, s.execution_count) == (3, 1, 1, 2)


def test_only_the_latest_versions_are_kept() -> None:
    s = ModelStats("m")
    for version in range(1, MAX_VERSIONS + 3):
        s.request_done(True, 1000, 0, version=version)
    assert list(s.versions) == list(range(3, MAX_VERSIONS + 3))
    s.request_done(True, 1000, 0, version=4)  # a version still kept is not reset
    assert s.versions[4].success == 2
