"""The tuning package's public names (what the composition root and tests import)."""

import edgeagent.tuning


def test_exported_members() -> None:
    assert sorted(edgeagent.tuning.__all__) == [
        "Candidate", "Figures", "Measurer", "Plan", "Pruned", "Row", "TimedMeasurer",
        "TuneResult", "Tuner", "TuningMemory", "TuningService", "VariantFile", "box_facts"]
    for name in edgeagent.tuning.__all__:
        assert getattr(edgeagent.tuning, name) is not None
