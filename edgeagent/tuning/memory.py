"""The memory of tuning results: one file per model under ``state_dir/tuning``, keyed.

The key is a hash of what the result depends on: the model (the hash of every candidate
variant's file), the box facts that matter (CPU model and flags, GPUs and compute capability,
CUDA/cuDNN/TensorRT versions, runtime package versions), the candidate set and the objective.
A result whose key differs from the one computed now is not used (and is tuned again); written
atomically, so a crash leaves the old result or the new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgeagent.config import TuneSection
from edgeagent.device.facts import DeviceFacts
from edgeagent.fsutil import write_json_atomic
from edgeagent.tuning.candidates import Candidate, VariantFile
from edgeagent.tuning.search import TuneResult

log = logging.getLogger(__name__)

DIRNAME = "tuning"


def box_facts(facts: DeviceFacts) -> dict[str, Any]:
    """The facts of the box a tuning result depends on (another of any: tune again)."""
    return {
        "arch": facts.arch, "cpu_model": facts.cpu_model, "cpu_count": facts.cpu_count,
        "cpu_flags": list(facts.cpu_flags),
        "gpus": [{"name": g.name, "compute_capability": g.compute_capability,
                  "memory_mb": g.memory_mb} for g in facts.gpus],
        "cuda": facts.cuda_version, "cudnn": facts.cudnn_version,
        "tensorrt": facts.tensorrt_version, "edgetpu": list(facts.edgetpu_devices),
        "packages": dict(sorted(facts.runtimes.packages.items())),
        "ort_providers": list(facts.runtimes.ort_providers or ()),
    }


def key_doc(files: Sequence[VariantFile], box: Mapping[str, Any], cands: Sequence[Candidate],
            tune: TuneSection) -> dict[str, Any]:
    """Everything the result depends on, as a document (stored beside the result, so a
    changed key can say what changed)."""
    return {
        "model": sorted(f"{v.file}:{v.sha256}" for v in files),
        "box": dict(box),
        "candidates": [c.id for c in cands],
        "objective": {k: v for k, v in asdict(tune).items() if k != "enabled"},
    }


def key_of(doc: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class TuningMemory:
    """``state_dir/tuning/NAME.json``: the last result per model with its key."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / DIRNAME

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def recall(self, name: str, doc: Mapping[str, Any]) -> TuneResult | None:
        """The stored result for this key, or None (none stored, another key, unreadable)."""
        path = self._path(name)
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("tuning result %s unreadable (%s): tuning again", path, exc)
            return None
        if not isinstance(raw, dict) or raw.get("key") != key_of(doc):
            old = raw.get("key_doc", {}) if isinstance(raw, dict) else {}
            changed = sorted(k for k in doc if old.get(k) != doc[k]) or ["format"]
            log.info("model %s: the stored tuning result is for another %s: tuning again",
                     name, ", ".join(changed))
            return None
        try:
            return TuneResult.from_dict(raw["result"])
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("tuning result %s malformed (%s): tuning again", path, exc)
            return None

    def remember(self, name: str, doc: Mapping[str, Any], result: TuneResult) -> None:
        write_json_atomic(self._path(name), {"key": key_of(doc), "key_doc": dict(doc),
                                             "result": result.to_dict()})

    def last(self, name: str) -> TuneResult | None:
        """The stored result whatever its key (for reporting)."""
        try:
            return TuneResult.from_dict(json.loads(self._path(name).read_bytes())["result"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
