"""Execution-provider planning: a pure function of profile, device facts and model.

No environment reads, no file writes, no imports of runtimes: everything the decision needs is
passed in, so the choice is tested table-driven on fake device trees.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PlannedProvider:
    """One execution provider (onnxruntime) or delegate (LiteRT) to try, with its options.

    Attributes:
        name: onnxruntime provider name (``TensorrtExecutionProvider``) or delegate name
            (``edgetpu``, ``xnnpack``, ``gpu``).
        options: Provider options passed to the runtime as they are (strings/ints/bools).
        library: For delegates loaded from a shared library: its file name or path.
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    library: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "options": dict(self.options)}
        if self.library:
            out["library"] = self.library
        return out


@dataclass(frozen=True)
class Exclusion:
    """A provider or delegate the profile lists but the plan leaves out, and why."""

    name: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason}


@dataclass(frozen=True)
class ProviderPlan:
    """What a backend should try, in order, for one model on this box.

    Attributes:
        format: ``onnx`` or ``tflite``.
        precision: ``fp32``, ``fp16`` or ``int8`` (of the model variant).
        providers: Ordered providers/delegates; the backend falls back along this list. For ONNX
            it always ends with ``CPUExecutionProvider``; for TFLite the built-in CPU kernels
            are the implicit last resort.
        excluded: What the profile wanted but this box cannot have, with reasons.
        threads: Intra-op threads (onnxruntime) / interpreter threads (LiteRT); 0 = runtime default.
    """

    format: str
    precision: str
    providers: tuple[PlannedProvider, ...]
    excluded: tuple[Exclusion, ...] = ()
    threads: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "precision": self.precision,
            "providers": [p.to_dict() for p in self.providers],
            "excluded": [e.to_dict() for e in self.excluded],
            "threads": self.threads,
        }
