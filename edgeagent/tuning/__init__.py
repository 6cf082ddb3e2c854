"""On-box tuning: which variant, provider, thread count and batch size run a model fastest on
this box while still passing its checks (``[[models]] tune``, ``edgeagent tune NAME``).

The candidate set (:mod:`.candidates`) is pure; the search (:mod:`.search`) loads, checks and
measures each candidate within a time budget on an injected clock; results are stored keyed on
the model, the box and the candidate set (:mod:`.memory`); :mod:`.service` runs it for the
version owner, which switches a better configuration in through its one activation path.
"""

from edgeagent.tuning.candidates import Candidate, VariantFile
from edgeagent.tuning.measure import Figures, Measurer, Pruned, TimedMeasurer
from edgeagent.tuning.memory import TuningMemory, box_facts
from edgeagent.tuning.search import Row, Tuner, TuneResult
from edgeagent.tuning.service import Plan, TuningService

__all__ = ["Candidate", "Figures", "Measurer", "Plan", "Pruned", "Row", "TimedMeasurer",
           "TuneResult", "Tuner", "TuningMemory", "TuningService", "VariantFile", "box_facts"]
