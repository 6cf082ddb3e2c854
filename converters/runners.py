"""Run a model file on this box, on CPU, for validation and calibration checks.

ONNX models run with onnxruntime's CPU execution provider, TFLite models with LiteRT
(``ai_edge_litert``). Both runners take and return float data as the fp32 model would: inputs
are cast to fp16 for fp16 models, and quantised to the tensor's scale and zero point for
full-integer TFLite models; outputs come back dequantised, as float32.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgeagent.runtime.checks import plain_name

from .errors import ConvertError
from .modelio import InputSpec, load_onnx, model_format, onnx_input_specs


class Runner(Protocol):
    """A loaded model that runs one feed at a time."""

    path: Path
    inputs: list[InputSpec]
    output_names: list[str]

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one feed (input name -> array); return the outputs in order, as float32."""


def open_runner(path: Path) -> Runner:
    """Load an ONNX or TFLite model for running on this box's CPU.

    Raises:
        InputError: when the file is not a model this tool can run.
        ConvertError: when the runtime refuses the model or LiteRT is missing.
    """
    if model_format(path) == "onnx":
        return OnnxRunner(path)
    return TfliteRunner(path)


def timed_run(runner: Runner, feed: Mapping[str, np.ndarray]) -> tuple[list[np.ndarray], float]:
    """Run one feed and return its outputs and the seconds it took."""
    start = time.perf_counter()
    outputs = runner.run(feed)
    return outputs, time.perf_counter() - start


def _as_float32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if array.dtype == np.float16 else array


class OnnxRunner:
    """An ONNX model in an onnxruntime CPU session."""

    def __init__(self, path: Path) -> None:
        """Load ``path``; raises :class:`ConvertError` when onnxruntime refuses it."""
        import onnxruntime as ort

        self.path = path
        self.inputs = onnx_input_specs(load_onnx(path))
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings are not ours to show
        try:
            self._session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises bare RuntimeError subclasses
            raise ConvertError(f"{path}: onnxruntime cannot load this model ({exc})") from exc
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one feed; fp16 outputs come back as float32."""
        try:
            outputs = self._session.run(None, dict(feed))
        except Exception as exc:
            raise ConvertError(f"{self.path}: inference failed ({exc})") from exc
        return [_as_float32(np.asarray(o)) for o in outputs]


class TfliteRunner:
    """A TFLite model in a LiteRT interpreter; handles int8/uint8 quantised inputs and outputs."""

    def __init__(self, path: Path | None = None, content: bytes | None = None) -> None:
        """Load a model from ``path`` or from ``content`` (the flatbuffer bytes).

        Raises:
            ConvertError: when LiteRT is missing or refuses the model.
        """
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise ConvertError(
                "running TFLite models needs LiteRT: pip install 'edgeagent[litert]'"
            ) from exc
        self.path = path or Path("<memory>")
        try:
            if content is not None:
                self._interpreter = Interpreter(model_content=content)
            else:
                self._interpreter = Interpreter(model_path=str(path))
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ConvertError(f"{self.path}: LiteRT cannot load this model ({exc})") from exc
        self._in = self._interpreter.get_input_details()
        self._out = self._interpreter.get_output_details()
        # Specs carry the float type the caller feeds: a quantised input is fed float32 and
        # quantised here, as a model converted with int8 I/O expects.
        self.inputs = [
            InputSpec(
                d["name"],
                tuple(None if s < 0 else int(s) for s in d["shape_signature"]),
                np.dtype(np.float32) if _is_quantized(d) else np.dtype(d["dtype"]),
            )
            for d in self._in
        ]
        self.output_names = [plain_name(d["name"]) for d in self._out]

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one feed; quantised outputs come back dequantised as float32."""
        values = {
            d["name"]: _quantize(feed[d["name"]], d) if _is_quantized(d) else feed[d["name"]]
            for d in self._in
        }
        try:
            if any(list(values[d["name"]].shape) != list(d["shape"]) for d in self._in):
                for detail in self._in:
                    self._interpreter.resize_tensor_input(
                        detail["index"], list(values[detail["name"]].shape)
                    )
                self._interpreter.allocate_tensors()
                self._in = self._interpreter.get_input_details()
                self._out = self._interpreter.get_output_details()
            for detail in self._in:
                self._interpreter.set_tensor(detail["index"], values[detail["name"]])
            self._interpreter.invoke()
            outputs = [self._interpreter.get_tensor(d["index"]) for d in self._out]
        except (ValueError, RuntimeError) as exc:
            raise ConvertError(f"{self.path}: inference failed ({exc})") from exc
        return [
            _dequantize(o, d) if _is_quantized(d) else _as_float32(o)
            for o, d in zip(outputs, self._out, strict=True)
        ]


def _is_quantized(detail: Mapping[str, Any]) -> bool:
    scale, _ = detail["quantization"]
    return bool(np.dtype(detail["dtype"]).kind in "iu" and scale != 0.0)


def _quantize(value: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    dtype = np.dtype(detail["dtype"])
    info = np.iinfo(dtype)
    quantized = np.round(value.astype(np.float64) / scale) + zero_point
    clipped: np.ndarray = np.clip(quantized, info.min, info.max).astype(dtype)
    return clipped


def _dequantize(value: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    real: np.ndarray = ((value.astype(np.float32) - zero_point) * scale).astype(np.float32)
    return real

