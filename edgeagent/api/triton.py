"""The JSON shapes of the protocol's metadata and of Triton's extensions (model configuration,
statistics), built from the runtime's own objects.

Triton's tools (tritonclient, perf_analyzer, model_analyzer) read the model configuration to
learn the batch dimension and tensor types, so these shapes follow Triton's ``model_config.proto``
as its HTTP endpoint renders it (``extension_model_configuration.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgeagent import __version__
from edgeagent.runtime.base import TensorSpec
from edgeagent.runtime.manager import ModelVersion
from edgeagent.runtime.scheduler import ModelLimits

#: Protocol extensions this server implements (listed by ``GET /v2``).
EXTENSIONS = ("binary_tensor_data", "model_configuration", "model_repository", "statistics",
              "system_shared_memory")

#: Triton backend name of each platform string.
_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "tensorflow_lite": "tflite"}

#: Providers and delegates that run on a GPU (instance_group kind).
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "gpu")


def server_metadata() -> dict[str, Any]:
    """``GET /v2``: name, version and the extensions served."""
    return {"name": "edgeagent", "version": __version__, "extensions": list(EXTENSIONS)}


def _specs(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]


def model_metadata(mv: ModelVersion) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the served version, platform and tensor signatures."""
    m = mv.model
    return {
        "name": mv.name,
        "versions": [str(mv.version)],
        "platform": m.platform,
        "inputs": _specs(m.inputs),
        "outputs": _specs(m.outputs),
    }


def config_type(datatype: str) -> str:
    """Triton's ``data_type`` enum name of a protocol datatype (``FP32`` -> ``TYPE_FP32``)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def batch_size_limit(mv: ModelVersion, limits: ModelLimits) -> int:
    """The max_batch_size to report: the configured one, if every tensor has a batch dim."""
    tensors = (*mv.model.inputs, *mv.model.outputs)
    if limits.max_batch_size > 0 and all(t.shape and t.shape[0] == -1 for t in tensors):
        return limits.max_batch_size
    return 0


def model_config(mv: ModelVersion, limits: ModelLimits) -> dict[str, Any]:
    """``GET /v2/models/{name}/config``: enough of Triton's model configuration for its tools.

    With batching on, ``dims`` leave out the batch dimension (Triton's convention); with it
    off (``max_batch_size`` 0) they are the full shapes.
    """
    m = mv.model
    max_batch = batch_size_limit(mv, limits)
    skip = 1 if max_batch else 0

    def tensors(specs: Sequence[TensorSpec], inputs: bool) -> list[dict[str, Any]]:
        out = []
        for s in specs:
            entry: dict[str, Any] = {"name": s.name, "data_type": config_type(s.datatype),
                                     "dims": list(s.shape[skip:])}
            if inputs:
                entry["format"] = "FORMAT_NONE"
            out.append(entry)
        return out

    gpu = any(p in m.provider for p in _GPU_PROVIDERS)
    config: dict[str, Any] = {
        "name": mv.name,
        "platform": m.platform,
        "backend": _BACKENDS.get(m.platform, m.platform),
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": max_batch,
        "input": tensors(m.inputs, inputs=True),
        "output": tensors(m.outputs, inputs=False),
        "instance_group": [{
            "name": mv.name,
            "kind": "KIND_GPU" if gpu else "KIND_CPU",
            "count": limits.max_concurrency,
        }],
        "default_model_filename": mv.source.path.name,
        "parameters": {"provider": {"string_value": m.provider},
                       "precision": {"string_value": mv.precision}},
    }
    if max_batch:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": int(limits.max_queue_delay_ms * 1000),
            "default_queue_policy": {"max_queue_size": limits.max_queue_size},
        }
    return config
