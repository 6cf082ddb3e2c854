"""LiteRT (TFLite) backend: interpreters built from a delegate plan, with fallback to CPU.

The interpreter comes from ``ai_edge_litert`` (LiteRT, the successor of tflite-runtime) or, on
boxes still on NumPy 1, from ``tflite_runtime``. Which modules are tried is a constructor
argument, so a box (or a test) without them gets :class:`BackendUnavailable`, not a traceback.

Delegates are tried in the plan's order. ``xnnpack`` is the XNNPACK delegate that LiteRT applies
by itself to float models; any other delegate (``edgetpu``, ``gpu``) is an external delegate
loaded from a shared library. A delegate that cannot be loaded or applied is recorded as a
failed attempt and the next is tried; the built-in CPU kernels are the last resort.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeagent.device.facts import module_installed
from edgeagent.errors import (
    BackendUnavailable,
    InferenceError,
    InferenceInputError,
    ModelError,
)
from edgeagent.runtime.base import Backend, LoadedModel, ProviderAttempt, QuantParams, TensorSpec
from edgeagent.runtime.datatypes import datatype_of

if TYPE_CHECKING:
    from edgeagent.device.plan import PlannedProvider, ProviderPlan

log = logging.getLogger(__name__)

#: Interpreter modules tried in order, with the pip distribution that ships each.
INTERPRETER_MODULES: tuple[tuple[str, str], ...] = (
    ("ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite_runtime.interpreter", "tflite-runtime"),
)

#: Shared library of each external delegate, when the plan does not name one.
DELEGATE_LIBRARIES: dict[str, str] = {
    "edgetpu": "libedgetpu.so.1",
    "gpu": "libtensorflowlite_gpu_delegate.so",
}

#: The delegate LiteRT applies by itself to float models.
XNNPACK = "xnnpack"
#: What ``provider`` says when only the built-in kernels run the model.
CPU = "cpu"

INSTALL_HINT = "pip install 'edgeagent[litert]'"


def _import_interpreter(modules: Sequence[tuple[str, str]]) -> tuple[Any, str]:
    """The first interpreter module that imports, and its distribution's name.

    Raises:
        BackendUnavailable: none of them imports, with each one's reason.
    """
    reasons: list[str] = []
    for module_name, distribution in modules:
        try:
            module = importlib.import_module(module_name)
        except (ImportError, AttributeError) as exc:
            # Only these third-party imports are guarded. tflite-runtime wheels built for
            # NumPy 1 fail under NumPy 2 with "_ARRAY_API not found", raised as an
            # AttributeError or an ImportError depending on the wheel.
            reason = str(exc) or type(exc).__name__
            if "_ARRAY_API" in reason or "multiarray failed to import" in reason:
                reason += " (this build needs NumPy 1; ai-edge-litert works with NumPy 2)"
            reasons.append(f"{module_name}: {reason}")
            continue
        return module, distribution
    raise BackendUnavailable("litert", "; ".join(reasons) or "no interpreter module",
                             hint=INSTALL_HINT)


def _versions(distribution: str) -> dict[str, str]:
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"litert": version, "distribution": f"{distribution} {version}"}


def _spec(detail: Mapping[str, Any]) -> TensorSpec:
    name = str(detail["name"])
    try:
        datatype = datatype_of(np.dtype(detail["dtype"]))
    except InferenceInputError as exc:
        raise ModelError(f"tensor {name!r}: {exc}, which edgeagent cannot serve") from exc
    # shape_signature keeps -1 for dynamic dimensions; old tflite-runtime builds lack it.
    shape = tuple(int(d) for d in detail.get("shape_signature", detail["shape"]))
    params = detail.get("quantization_parameters") or {}
    scales = params.get("scales", ())
    quantization = None
    if len(scales):
        quantization = QuantParams(
            tuple(float(s) for s in scales),
            tuple(int(z) for z in params["zero_points"]),
            int(params.get("quantized_dimension", 0)),
        )
    return TensorSpec(name, datatype, shape, quantization)


def _weight_precision(details: Sequence[Mapping[str, Any]]) -> str:
    """fp16 when the graph stores float16 tensors (weights dequantised at load), int8 when it
    holds quantised integer tensors, fp32 otherwise."""
    dtypes = {np.dtype(d["dtype"]) for d in details}
    if np.dtype(np.float16) in dtypes:
        return "fp16"
    quantised = any(
        np.dtype(d["dtype"]) in (np.dtype(np.int8), np.dtype(np.uint8))
        and len(d.get("quantization_parameters", {}).get("scales", ())) > 0
        for d in details
    )
    return "int8" if quantised else "fp32"


class LiteRTModel(LoadedModel):
    """A model in a LiteRT interpreter; ``run`` is serialised (interpreters are not thread-safe)."""

    platform = "tensorflow_lite"

    def __init__(self, interpreter: Any, provider: str, attempts: list[ProviderAttempt]) -> None:
        self._interpreter: Any = interpreter
        self._lock = threading.Lock()
        in_details = interpreter.get_input_details()
        out_details = interpreter.get_output_details()
        self.inputs = tuple(_spec(d) for d in in_details)
        self.outputs = tuple(_spec(d) for d in out_details)
        self.provider = provider
        self.attempts = attempts
        self._input_index = {str(d["name"]): int(d["index"]) for d in in_details}
        self._output_index = {str(d["name"]): int(d["index"]) for d in out_details}
        # The shapes the interpreter is allocated for; a request with other (dynamic) sizes
        # resizes the inputs and reallocates.
        self._allocated = {str(d["name"]): tuple(int(s) for s in d["shape"]) for d in in_details}
        self.weight_precision = _weight_precision(interpreter.get_tensor_details())

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        names = list(output_names) if output_names else list(self._output_index)
        for name in names:
            self.output_spec(name)  # an unknown name is the caller's error, not the runtime's
        with self._lock:
            interpreter = self._interpreter
            if interpreter is None:
                raise InferenceError("the model has been closed")
            try:
                self._resize(interpreter, inputs)
                for name, index in self._input_index.items():
                    interpreter.set_tensor(index, inputs[name])
                interpreter.invoke()
                # get_tensor copies, which matters: the interpreter reuses its output buffers
                # on the next invoke.
                return {name: interpreter.get_tensor(self._output_index[name]) for name in names}
            except (ValueError, RuntimeError) as exc:
                raise InferenceError(f"LiteRT failed: {exc}") from exc

    def _resize(self, interpreter: Any, inputs: Mapping[str, np.ndarray]) -> None:
        wanted = {name: tuple(inputs[name].shape) for name in self._input_index}
        changed = [name for name, shape in wanted.items() if shape != self._allocated[name]]
        if not changed:
            return
        for name in changed:
            # strict: only dimensions the model declares dynamic (-1) may change.
            interpreter.resize_tensor_input(self._input_index[name], list(wanted[name]),
                                            strict=True)
        interpreter.allocate_tensors()
        self._allocated.update(wanted)

    def close(self) -> None:
        # Dropping the interpreter frees its arena and any delegate it holds.
        with self._lock:
            self._interpreter = None


class LiteRTBackend(Backend):
    """Loads ``.tflite`` models with a LiteRT interpreter, falling back along the plan's delegates.

    Args:
        modules: Interpreter modules to try, each with its pip distribution, best first.

    Raises:
        BackendUnavailable: none of the interpreter modules can be imported.
    """

    name = "litert"
    formats = ("tflite",)

    def __init__(self, modules: Sequence[tuple[str, str]] = INTERPRETER_MODULES) -> None:
        self._module, self._distribution = _import_interpreter(modules)

    @staticmethod
    def probe(modules: Sequence[tuple[str, str]] = INTERPRETER_MODULES) -> dict[str, object]:
        """The status of the backend before any TFLite model needed it: the first interpreter
        module that is installed, found without importing it (``loaded: false``). Whether it
        also imports (tflite-runtime wheels built for NumPy 1 do not under NumPy 2) shows when
        the first model loads."""
        for module_name, distribution in modules:
            if module_installed(module_name):
                return {"available": True, "backend": "litert", "loaded": False,
                        **_versions(distribution)}
        return {"available": False, "loaded": False, "hint": INSTALL_HINT,
                "reason": "no interpreter module is installed ("
                          + ", ".join(m for m, _ in modules) + ")"}

    def versions(self) -> dict[str, str]:
        return _versions(self._distribution)

    def load(self, path: Path, plan: ProviderPlan) -> LoadedModel:
        """Load with the first delegate of the plan that applies, down to the CPU kernels.

        ``plan.threads`` sets the interpreter's threads (0: LiteRT's default). Reaching
        ``xnnpack`` in the plan loads the model with LiteRT's default delegates on; without it
        in the plan they are off, so ``provider == "cpu"`` means the built-in kernels only.

        Raises:
            ModelError: the file is missing or is not a loadable TFLite model.
        """
        if not path.is_file():
            raise ModelError(f"{path}: no such model file")
        attempts: list[ProviderAttempt] = []
        for i, planned in enumerate(plan.providers):
            if planned.name == XNNPACK:
                interpreter = self._builtin(path, plan.threads, default_delegates=True)
                attempts.append(ProviderAttempt(XNNPACK, True))
                return LiteRTModel(interpreter, XNNPACK, attempts)
            try:
                interpreter = self._with_delegate(path, plan.threads, planned)
            except _DelegateFailed as exc:
                attempts.append(ProviderAttempt(planned.name, False, str(exc)))
                following = plan.providers[i + 1].name if i + 1 < len(plan.providers) else CPU
                log.warning("delegate %s failed for %s, trying %s: %s",
                            planned.name, path.name, following, exc)
                continue
            attempts.append(ProviderAttempt(planned.name, True))
            return LiteRTModel(interpreter, planned.name, attempts)
        interpreter = self._builtin(path, plan.threads, default_delegates=False)
        attempts.append(ProviderAttempt(CPU, True))
        return LiteRTModel(interpreter, CPU, attempts)

    def _interpreter(self, path: Path, threads: int, delegates: list[Any],
                     default_delegates: bool) -> Any:
        resolver = self._module.OpResolverType
        interpreter = self._module.Interpreter(
            model_path=str(path),
            num_threads=threads or None,
            experimental_delegates=delegates or None,
            experimental_op_resolver_type=(
                resolver.AUTO if default_delegates else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            ),
        )
        interpreter.allocate_tensors()
        return interpreter

    def _builtin(self, path: Path, threads: int, default_delegates: bool) -> Any:
        """An interpreter on LiteRT's own kernels; failing here is the file's fault."""
        try:
            return self._interpreter(path, threads, [], default_delegates)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{path.name}: not a loadable TFLite model: {exc}") from exc

    def _with_delegate(self, path: Path, threads: int, planned: PlannedProvider) -> Any:
        library = planned.library or DELEGATE_LIBRARIES.get(planned.name, "")
        if not library:
            raise _DelegateFailed("unknown delegate and no library given for it")
        # LiteRT's load_delegate leaves a half-built object whose finaliser raises when the
        # library cannot be opened or is no delegate, so check both here first.
        try:
            handle = ctypes.CDLL(library)
        except OSError as exc:
            raise _DelegateFailed(str(exc)) from exc
        if not hasattr(handle, "tflite_plugin_create_delegate"):
            raise _DelegateFailed(f"{library} is not a TFLite external delegate")
        options = {str(k): str(v) for k, v in planned.options.items()}
        try:
            delegate = self._module.load_delegate(library, options)
            return self._interpreter(path, threads, [delegate], default_delegates=False)
        except (ValueError, RuntimeError) as exc:
            lines = str(exc).strip().splitlines()
            raise _DelegateFailed(lines[0] if lines else type(exc).__name__) from exc


class _DelegateFailed(Exception):
    """A delegate could not be loaded or applied; the backend moves on to the next."""
