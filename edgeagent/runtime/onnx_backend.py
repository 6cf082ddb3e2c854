"""onnxruntime backend: sessions built from a provider plan, with fallback along the plan."""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeagent.errors import BackendUnavailable, InferenceError, InferenceInputError, ModelError
from edgeagent.runtime.base import Backend, LoadedModel, ProviderAttempt, TensorSpec
from edgeagent.runtime.datatypes import ORT_TO_DATATYPE

if TYPE_CHECKING:
    import onnxruntime as ort

    from edgeagent.device.plan import ProviderPlan

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"


def _specs(args: Sequence[Any]) -> tuple[TensorSpec, ...]:
    specs = []
    for arg in args:
        datatype = ORT_TO_DATATYPE.get(arg.type)
        if datatype is None:
            raise ModelError(
                f"tensor {arg.name!r} has type {arg.type}, which edgeagent cannot serve")
        # Symbolic ("batch") and unknown (None) dimensions are both dynamic.
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
        specs.append(TensorSpec(arg.name, datatype, shape))
    return tuple(specs)


def _as_text(name: str, arr: np.ndarray) -> np.ndarray:
    """BYTES elements as str: onnxruntime would turn a bytes object into its repr ("b'..'")."""
    try:
        return np.array([b.decode() if isinstance(b, bytes) else b for b in arr.reshape(-1)],
                        dtype=object).reshape(arr.shape)
    except UnicodeDecodeError as exc:
        raise InferenceInputError(
            f"input {name!r}: ONNX string tensors hold UTF-8 text, and an element is not UTF-8"
        ) from exc


class OnnxModel(LoadedModel):
    """A model running in an onnxruntime ``InferenceSession`` (thread-safe for ``run``)."""

    platform = "onnxruntime_onnx"

    def __init__(self, session: ort.InferenceSession, attempts: list[ProviderAttempt]) -> None:
        self._session = session
        self.inputs = _specs(session.get_inputs())
        self.outputs = _specs(session.get_outputs())
        self.attempts = attempts
        self.provider = session.get_providers()[0]
        self._output_names = [o.name for o in self.outputs]
        self._shrinks = True

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        names = list(output_names) if output_names else self._output_names
        feeds = {k: _as_text(k, v) if v.dtype == object else v for k, v in inputs.items()}
        try:
            results = self._session.run(names, feeds)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument/RuntimeError
            raise InferenceError(f"onnxruntime failed: {exc}") from exc
        return dict(zip(names, results, strict=True))

    def release_memory(self, inputs: Mapping[str, np.ndarray]) -> None:
        """One run that ends by shrinking the CPU arena: onnxruntime keeps every chunk its
        arena ever grew to (measured on the benchmark CNN: 20 MB held after load and warm-up,
        35 MB more after four concurrent callers), and gives them back only at the end of a
        run that asks for it (``memory.enable_memory_arena_shrinkage``)."""
        if not self._shrinks:
            return
        import onnxruntime  # loaded already: this session came from it

        options = onnxruntime.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        feeds = {k: _as_text(k, v) if v.dtype == object else v for k, v in inputs.items()}
        try:
            self._session.run(self._output_names[:1], feeds, options)
        except Exception as exc:  # never fatal: the memory stays cached, the model serves
            self._shrinks = False
            log.warning("cannot release onnxruntime's arena (not tried again for this "
                        "version): %s", exc)

    def close(self) -> None:
        # Dropping the only reference frees the session (and its GPU memory) promptly.
        del self._session


#: Why ONNX models cannot run on a bare install, and what to add (the core names no build).
ONNXRUNTIME_MISSING = "install edgeagent[cpu] or edgeagent[gpu]"
INSTALL_HINT = ("pip install 'edgeagent[cpu]', or 'edgeagent[gpu]' on an NVIDIA box "
                "(onnxruntime-gpu); never both")


class OnnxBackend(Backend):
    """Loads ``.onnx`` models with onnxruntime, falling back along the plan's providers."""

    name = "onnxruntime"
    formats = ("onnx",)

    def __init__(self) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise BackendUnavailable("onnxruntime", ONNXRUNTIME_MISSING, INSTALL_HINT) from exc
        self._ort = onnxruntime

    def available_providers(self) -> list[str]:
        return list(self._ort.get_available_providers())

    def versions(self) -> dict[str, str]:
        out = {"onnxruntime": self._ort.__version__}
        for dist in ("onnxruntime", "onnxruntime-gpu"):
            try:
                out["distribution"] = f"{dist} {importlib.metadata.version(dist)}"
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        return out

    def _session(
        self, path: Path, providers: list[tuple[str, dict[str, Any]]], threads: int
    ) -> ort.InferenceSession:
        opts = self._ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # No spin-waiting after a run: on a small box the callers (same host, loopback) and the
        # event loop need those cores; spinning cost 15-25% more CPU per request when measured.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return self._ort.InferenceSession(
            str(path),
            sess_options=opts,
            providers=[p for p, _ in providers],
            provider_options=[o for _, o in providers],
        )

    def load(self, path: Path, plan: ProviderPlan) -> LoadedModel:
        """Load with the first provider of the plan that initialises, down to CPU.

        Each provider is tried in a session of its own (with CPU behind it for the nodes it
        does not take), so that a provider that fails at start-up (TensorRT without its
        libraries, CUDA out of memory) is recorded and the next one is tried.
        """
        if not path.is_file():
            raise ModelError(f"{path}: no such model file")
        planned = [(p.name, {k: str(v) for k, v in p.options.items()}) for p in plan.providers]
        if not planned or planned[-1][0] != CPU:
            planned.append((CPU, {}))
        available = set(self.available_providers())
        attempts: list[ProviderAttempt] = []
        last_exc: Exception | None = None
        for i, (name, options) in enumerate(planned):
            if name not in available:
                attempts.append(
                    ProviderAttempt(name, False, "not offered by this onnxruntime build"))
                continue
            chain = [(name, options)] if name == CPU else [(name, options), (CPU, {})]
            try:
                session = self._session(path, chain, plan.threads)
            except Exception as exc:  # every onnxruntime failure is a fallback
                last_exc = exc
                reason = (str(exc).strip().splitlines()[0] if str(exc).strip()
                          else type(exc).__name__)
                attempts.append(ProviderAttempt(name, False, reason))
                if name == CPU or self._is_model_fault(exc):
                    break
                log.warning("provider %s failed for %s, trying %s: %s",
                            name, path.name, planned[i + 1][0], reason)
                continue
            if session.get_providers()[0] != name:
                # onnxruntime may drop a provider silently (e.g. missing CUDA libraries).
                attempts.append(ProviderAttempt(name, False, "onnxruntime did not register it"))
                continue
            attempts.append(ProviderAttempt(name, True))
            return OnnxModel(session, attempts)
        raise ModelError(
            f"{path.name}: no execution provider could load the model: {last_exc}"
        ) from last_exc

    def _is_model_fault(self, exc: Exception) -> bool:
        """Whether a load failure is the file's fault, so no other provider will do better."""
        errors = getattr(self._ort.capi, "onnxruntime_pybind11_state", None)
        bad = tuple(
            getattr(errors, n) for n in ("InvalidProtobuf", "InvalidGraph", "NoSuchFile")
            if errors is not None and hasattr(errors, n)
        )
        return bool(bad) and isinstance(exc, bad)
