"""The backend interface: what every inference runtime (onnxruntime, LiteRT) provides.

A :class:`Backend` turns a model file plus a :class:`~edgeagent.device.plan.ProviderPlan` into a
:class:`LoadedModel`. Backends are imported lazily by name (see ``registry``), so a missing
optional package shows up as :class:`~edgeagent.errors.BackendUnavailable`, never as an
ImportError at start-up.

Loaded models are transport-free: they take and return numpy arrays keyed by tensor name, and
know nothing of HTTP or JSON. Input validation against the signature lives here, once, so that
every backend refuses bad input with the same words.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeagent.errors import InferenceInputError
from edgeagent.runtime.datatypes import DATATYPE_TO_NUMPY, datatype_of

if TYPE_CHECKING:
    from edgeagent.device.plan import ProviderPlan


@dataclass(frozen=True)
class QuantParams:
    """Affine quantisation of an integer tensor: ``real = scale * (q - zero_point)``."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"scale": list(self.scale), "zero_point": list(self.zero_point), "axis": self.axis}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model, in Open Inference Protocol terms.

    Attributes:
        name: Tensor name.
        datatype: Protocol datatype (``FP32``, ``INT8``, ``BYTES``...).
        shape: Dimensions; ``-1`` marks a dynamic dimension.
        quantization: Present on quantised integer tensors whose runtime reports it (LiteRT).
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    quantization: QuantParams | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "datatype": self.datatype,
                               "shape": list(self.shape)}
        if self.quantization is not None:
            out["quantization"] = self.quantization.to_dict()
        return out

    def accepts_shape(self, shape: Sequence[int]) -> bool:
        """Whether a concrete shape fits this spec (same rank, fixed dims equal)."""
        if len(shape) != len(self.shape):
            return False
        return all(want in (-1, got) for want, got in zip(self.shape, shape, strict=True))


@dataclass
class ProviderAttempt:
    """One execution provider or delegate the backend tried, and what happened."""

    name: str
    ok: bool
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "reason": self.reason}


class LoadedModel(abc.ABC):
    """A model session ready to run: signatures, provider in use, and ``run``.

    ``run`` may be called from several threads at once; implementations serialise internally
    where their runtime is not thread-safe (LiteRT interpreters are not; onnxruntime sessions are).
    """

    #: Triton-style platform string: ``onnxruntime_onnx`` or ``tensorflow_lite``.
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: The provider or delegate that actually runs the model (``CPUExecutionProvider``,
    #: ``xnnpack``).
    provider: str
    #: Every provider tried, in order, with why the ones before ``provider`` failed.
    attempts: list[ProviderAttempt]
    #: Precision read from the loaded graph when the runtime can tell (LiteRT); None otherwise.
    weight_precision: str | None = None

    @abc.abstractmethod
    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run one inference on already validated inputs.

        Args:
            inputs: One array per model input, keyed by name, matching the signature.
            output_names: Outputs wanted; ``None`` for all of them.

        Returns:
            The outputs keyed by name.

        Raises:
            InferenceError: when the runtime fails on a valid request.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, most runtimes free on GC
        """Release the runtime's resources."""

    def release_memory(self, inputs: Mapping[str, np.ndarray]) -> None:  # noqa: B027
        """Hand back the runtime's cached free memory (an optional hook; most keep none).

        Called after the load (warm-up and checks) and once a burst of large requests has
        passed, never on the request path; ``inputs`` are valid inputs, should the runtime
        need a run to do it.
        """

    @property
    def fallback_reason(self) -> str:
        """Why the first planned provider is not the one in use ('' when it is)."""
        failed = [f"{a.name}: {a.reason}" for a in self.attempts if not a.ok]
        return "; ".join(failed)

    def validate(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check inputs against the signature, returning arrays in the exact dtype wanted."""
        return validate_inputs(self.inputs, inputs)

    def output_spec(self, name: str) -> TensorSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        known = ", ".join(s.name for s in self.outputs)
        raise InferenceInputError(f"unknown output {name!r}; the model has: {known}")


class Backend(abc.ABC):
    """A runtime able to load models of some formats."""

    #: Registry name (``"onnxruntime"``, ``"litert"``).
    name: str
    #: Model formats it loads (``"onnx"``, ``"tflite"``).
    formats: tuple[str, ...]

    @abc.abstractmethod
    def load(self, path: Path, plan: ProviderPlan) -> LoadedModel:
        """Load a model file following the plan's ordered providers/delegates, with fallback.

        Raises:
            ModelError: the file is not a loadable model, or no provider could run it.
        """

    @abc.abstractmethod
    def versions(self) -> dict[str, str]:
        """Versions of the runtime packages in use, for ``probe`` and ``status``."""


def validate_inputs(
    specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Check names, datatypes and shapes of request inputs against a model signature.

    Args:
        specs: The model's input specs.
        inputs: Arrays keyed by input name.

    Returns:
        The same arrays (no copy when already of the right dtype), keyed by name.

    Raises:
        InferenceInputError: naming the input and what is wrong with it.
    """
    want = {s.name: s for s in specs}
    unknown = sorted(set(inputs) - set(want))
    if unknown:
        raise InferenceInputError(
            f"unknown input {unknown[0]!r}; the model takes: {', '.join(want)}"
        )
    missing = [n for n in want if n not in inputs]
    if missing:
        raise InferenceInputError(f"missing input {missing[0]!r}")
    out: dict[str, np.ndarray] = {}
    for name, spec in want.items():
        arr = inputs[name]
        got_type = datatype_of(arr.dtype)
        if got_type != spec.datatype:
            raise InferenceInputError(
                f"input {name!r}: datatype {got_type} does not match the model's {spec.datatype}"
            )
        if not spec.accepts_shape(arr.shape):
            raise InferenceInputError(
                f"input {name!r}: shape {list(arr.shape)} does not match the model's "
                f"{list(spec.shape)} (-1 = any size)"
            )
        if spec.datatype != "BYTES" and arr.dtype != DATATYPE_TO_NUMPY[spec.datatype]:
            arr = arr.astype(DATATYPE_TO_NUMPY[spec.datatype], copy=False)
        out[name] = arr
    return out
