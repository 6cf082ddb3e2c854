"""Shared helpers: what kind of model a file is, its inputs, and sample data that fits them.

Sample data (calibration sets, validation sets) comes in two layouts:

* one ``.npz`` file whose arrays are named after the model inputs and carry a leading sample
  axis (``input: [N, 64]``);
* a directory of files, one sample each: ``.npz`` files with one array per input, or ``.npy``
  files for single-input models. The files are read in name order and stacked.

A sample may or may not include the model's batch axis: for an input of shape ``[batch, 64]``
both ``[N, 64]`` and ``[N, 1, 64]`` are accepted, and every sample is fed as a batch of one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from google.protobuf.message import DecodeError

# One rule for tensor names on both sides: LiteRT names its tensors after the signature
# (``serving_default_input:0``); samples and checks are named after the model's own tensors.
from edgeagent.runtime.checks import plain_name

from .errors import InputError

log = logging.getLogger(__name__)

ModelFormat = Literal["onnx", "tflite"]

#: TFLite files are FlatBuffers with this file identifier at byte offset 4.
_TFLITE_MAGIC = b"TFL3"


@dataclass(frozen=True)
class InputSpec:
    """One model input.

    Attributes:
        name: The tensor name as the runtime knows it.
        shape: Dimensions; ``None`` for a dynamic one.
        dtype: Element type the runtime expects.
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype[np.generic]


def model_format(path: Path) -> ModelFormat:
    """Tell an ONNX model from a TFLite model by its content (the suffix is only a hint).

    Raises:
        InputError: when the file does not exist or is neither ONNX nor TFLite.
    """
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    with path.open("rb") as f:
        head = f.read(8)
    if head[4:8] == _TFLITE_MAGIC:
        return "tflite"
    # ONNX has no magic number: a serialized ModelProto starts with field 1 (ir_version, a
    # varint, tag 0x08) in every exporter we know of; parsing settles the rest.
    if head[:1] == b"\x08" or path.suffix == ".onnx":
        load_onnx(path)
        return "onnx"
    raise InputError(
        f"{path}: not an ONNX or TFLite model; edgeconvert works on .onnx and .tflite files "
        "(export the model to ONNX first, or use `edgeconvert tflite` for Keras/SavedModel)"
    )


def load_onnx(path: Path) -> onnx.ModelProto:
    """Load and check an ONNX model.

    Raises:
        InputError: when the file is missing or not a valid ONNX model.
    """
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except (DecodeError, onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        raise InputError(f"{path}: not a valid ONNX model ({exc}); re-export it") from exc
    return model


def require_onnx(path: Path, command: str) -> None:
    """Refuse anything but an ONNX model for an ONNX-only command.

    Raises:
        InputError: naming what the file is and what to use instead.
    """
    if model_format(path) != "onnx":
        raise InputError(
            f"{path}: is a TFLite model; `edgeconvert {command}` works on ONNX models "
            "(for TFLite variants convert the Keras/SavedModel with `edgeconvert tflite`)"
        )


def onnx_opset(model: onnx.ModelProto) -> int:
    """Version of the default ONNX operator set the model imports (0 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def onnx_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Inputs of an ONNX graph, leaving out initializers (old exporters list them as inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        specs.append(InputSpec(value.name, shape, dtype))
    return specs


def load_samples(path: Path) -> dict[str, np.ndarray]:
    """Read sample data (see the module docstring for the layouts), keyed by array name.

    Raises:
        InputError: when the path is missing, empty, unreadable or inconsistent.
    """
    if path.is_dir():
        return _load_sample_dir(path)
    if not path.is_file():
        raise InputError(f"{path}: no such sample file or directory")
    if path.suffix != ".npz":
        raise InputError(f"{path}: samples must be an .npz file or a directory of .npy/.npz files")
    arrays = _read_npz(path)
    if not arrays:
        raise InputError(f"{path}: holds no arrays")
    counts = {name: a.shape[0] if a.ndim else 0 for name, a in arrays.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise InputError(
            f"{path}: every array needs the same leading sample axis, found sizes {counts}"
        )
    return arrays


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read samples ({exc})") from exc


def _load_sample_dir(path: Path) -> dict[str, np.ndarray]:
    files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz"))
    if not files:
        raise InputError(f"{path}: no .npy or .npz sample files in this directory")
    suffixes = {p.suffix for p in files}
    if len(suffixes) > 1:
        raise InputError(f"{path}: mixes .npy and .npz files; use one kind")
    per_sample: list[dict[str, np.ndarray]] = []
    for file in files:
        if file.suffix == ".npz":
            per_sample.append(_read_npz(file))
            continue
        try:
            per_sample.append({"array": np.load(file, allow_pickle=False)})
        except (OSError, ValueError) as exc:
            raise InputError(f"{file}: cannot read sample ({exc})") from exc
    names = set(per_sample[0])
    stacked = {}
    for name in sorted(names):
        parts = []
        for file, sample in zip(files, per_sample, strict=True):
            if set(sample) != names or sample[name].shape != per_sample[0][name].shape:
                raise InputError(
                    f"{file}: does not match {files[0].name} (arrays "
                    f"{_describe(sample)} vs {_describe(per_sample[0])}); all samples need the "
                    "same names and shapes"
                )
            parts.append(sample[name])
        stacked[name] = np.stack(parts)
    return stacked


def _describe(arrays: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{n}{list(a.shape)}" for n, a in arrays.items())


@dataclass(frozen=True)
class Samples:
    """Sample data matched to one model's inputs.

    Attributes:
        arrays: Input name -> array of shape ``[N, *feed_shape]``; ``arrays[name][i]`` is fed
            as-is (it has the model's rank, with a batch of one where the model has a batch axis).
        count: N, the number of samples.
    """

    arrays: dict[str, np.ndarray]
    count: int

    def feed(self, index: int) -> dict[str, np.ndarray]:
        """The inputs of sample ``index``, ready for the runtime."""
        return {name: array[index] for name, array in self.arrays.items()}


def match_samples(
    specs: Sequence[InputSpec], arrays: Mapping[str, np.ndarray], source: str,
    limit: int | None = None,
) -> Samples:
    """Fit sample arrays to a model's inputs: by name, and shape and dtype.

    Names match exactly or without LiteRT decorations; a single array always fits a
    single-input model. Floating-point samples are cast to the input's float type (fp16 models).

    Args:
        specs: The model's inputs.
        arrays: Sample arrays with a leading sample axis, as from :func:`load_samples`.
        source: Where the samples came from, for error messages.
        limit: Use at most this many samples.

    Raises:
        InputError: naming the inputs that have no data, or the shape or dtype that do not fit.
    """
    by_plain = {plain_name(name): name for name in arrays}
    matched: dict[str, np.ndarray] = {}
    for spec in specs:
        key = spec.name if spec.name in arrays else by_plain.get(plain_name(spec.name))
        if key is None and len(specs) == 1 and len(arrays) == 1:
            key = next(iter(arrays))
        if key is None:
            raise InputError(
                f"{source}: no data for model input {spec.name!r}; the samples have "
                f"{_describe(arrays)} but the model wants {_describe_specs(specs)} "
                "(name the arrays after the model inputs)"
            )
        matched[spec.name] = _fit(spec, arrays[key], source)
    counts = {a.shape[0] for a in matched.values()}
    if len(counts) != 1:
        raise InputError(f"{source}: inputs have different sample counts {sorted(counts)}")
    count = counts.pop()
    if limit is not None and limit < count:
        matched = {name: a[:limit] for name, a in matched.items()}
        count = limit
    return Samples(matched, count)


def _describe_specs(specs: Sequence[InputSpec]) -> str:
    return ", ".join(
        f"{s.name}[{', '.join('?' if d is None else str(d) for d in s.shape)}] {s.dtype}"
        for s in specs
    )


def _fit(spec: InputSpec, array: np.ndarray, source: str) -> np.ndarray:
    rank = len(spec.shape)
    given = list(array.shape)
    if array.ndim == rank:
        # Samples without the batch axis: each one becomes a batch of one.
        array = array[:, np.newaxis]
    if array.ndim != rank + 1 or not all(
        want is None or want == got for want, got in zip(spec.shape, array.shape[1:], strict=True)
    ):
        raise InputError(
            f"{source}: samples for input {spec.name!r} have shape {given} "
            f"(N samples first) but the model wants {_describe_specs([spec])}"
        )
    if array.dtype != spec.dtype:
        same_family = array.dtype.kind == spec.dtype.kind or (
            array.dtype.kind in "iu" and spec.dtype.kind in "iu"
        )
        if not same_family:
            raise InputError(
                f"{source}: samples for input {spec.name!r} are {array.dtype} but the model "
                f"wants {spec.dtype}"
            )
        array = array.astype(spec.dtype)
    return array
