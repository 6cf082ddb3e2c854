"""``edgeconvert quantize``: int8 ONNX with onnxruntime's quantisation tooling.

Two modes:

* dynamic (no calibration data): weights are int8, activations are quantised at run time.
  Good for MLPs and transformers on CPU; the result is in operator format.
* static (``--calibration``): activation ranges come from a few hundred representative samples.
  ``--format qdq`` writes QuantizeLinear/DequantizeLinear pairs with symmetric int8
  activations and weights, which is what TensorRT consumes; ``--format qoperator`` writes
  QLinear* operators with uint8 activations, the fastest layout on x86/ARM CPUs.

Every mode first runs onnxruntime's pre-processing (symbolic shape inference and graph
optimisation), as onnxruntime's documentation recommends.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

from .errors import ConvertError, InputError
from .modelio import (
    Samples,
    load_onnx,
    load_samples,
    match_samples,
    onnx_input_specs,
    onnx_opset,
    require_onnx,
)

log = logging.getLogger(__name__)

QuantFormatName = Literal["qdq", "qoperator"]

#: onnxruntime's quantiser needs QuantizeLinear/DequantizeLinear (opset 10); per-channel QDQ
#: needs their ``axis`` attribute (opset 13).
MIN_OPSET = 10
MIN_OPSET_PER_CHANNEL_QDQ = 13


def quantize_onnx(
    model: Path,
    out: Path,
    *,
    calibration: Path | None = None,
    quant_format: QuantFormatName | None = None,
    per_channel: bool = False,
    calibration_limit: int | None = None,
) -> Path:
    """Quantise an fp32 ONNX model to int8.

    Args:
        model: The fp32 ONNX model.
        out: Where to write the int8 model.
        calibration: Sample data (``.npz`` or a directory, see :mod:`edgeconvert.modelio`) for
            static quantisation; ``None`` quantises dynamically.
        quant_format: ``"qdq"`` (default for static) or ``"qoperator"``; dynamic quantisation
            only exists in operator format.
        per_channel: Quantise weights per output channel (better accuracy for convolutions).
        calibration_limit: Use at most this many calibration samples.

    Returns:
        ``out``.

    Raises:
        InputError: for a bad model, bad calibration data, an opset too old, or a format that
            does not fit the mode.
        ConvertError: when onnxruntime's tooling fails.
    """
    require_onnx(model, "quantize")
    proto = load_onnx(model)
    opset = onnx_opset(proto)
    if calibration is None and quant_format == "qdq":
        raise InputError(
            "QDQ format needs static quantisation: pass --calibration with sample data "
            "(dynamic quantisation only writes operator format)"
        )
    fmt = quant_format or "qdq"
    per_channel_qdq = per_channel and calibration is not None and fmt == "qdq"
    needed = MIN_OPSET_PER_CHANNEL_QDQ if per_channel_qdq else MIN_OPSET
    if opset < needed:
        raise InputError(
            f"{model}: uses ONNX opset {opset}, onnxruntime can quantise this only from opset "
            f"{needed}; re-export with a newer opset or upgrade it with "
            "onnx.version_converter.convert_version(model, 17)"
        )
    samples = None
    if calibration is not None:
        samples = match_samples(
            onnx_input_specs(proto), load_samples(calibration), str(calibration),
            limit=calibration_limit,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeconvert-", dir=out.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        _preprocess(model, prepared)
        if samples is None:
            _quantize_dynamic(prepared, out, per_channel)
        else:
            _quantize_static(prepared, out, samples, fmt, per_channel)
    log.info("wrote %s (%d bytes)", out, out.stat().st_size)
    return out


def _preprocess(model: Path, prepared: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Symbolic shape inference (it resolves dynamic dimensions, mostly in transformers) needs
    # sympy, an optional package; ONNX's own shape inference and the optimisation still run.
    symbolic = importlib.util.find_spec("sympy") is not None
    if not symbolic:
        log.info("sympy is not installed: skipping symbolic shape inference")
    try:
        quant_pre_process(str(model), str(prepared), skip_symbolic_shape=not symbolic)
    except Exception as exc:  # its sub-steps raise anything from onnx, sympy and onnxruntime
        raise ConvertError(
            f"{model}: onnxruntime's quantisation pre-processing failed ({exc}); check that the "
            "model runs in onnxruntime and has static ranks"
        ) from exc


def _quantize_dynamic(prepared: Path, out: Path, per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    log.info("dynamic int8 quantisation (per-channel: %s)", per_channel)
    _call_quantizer(
        quantize_dynamic, prepared, out, per_channel=per_channel, weight_type=QuantType.QInt8
    )


def _quantize_static(
    prepared: Path, out: Path, samples: Samples, fmt: QuantFormatName, per_channel: bool
) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]  # untyped base class
        def __init__(self) -> None:
            self._next = 0

        def get_next(self) -> dict[str, Any] | None:
            if self._next >= samples.count:
                return None
            self._next += 1
            return samples.feed(self._next - 1)

    log.info(
        "static int8 quantisation, %s format, per-channel %s, calibrating on %d samples",
        fmt, per_channel, samples.count,
    )
    if fmt == "qdq":
        # TensorRT takes symmetric int8 (zero point 0) for activations and weights.
        options = {"quant_format": QuantFormat.QDQ, "activation_type": QuantType.QInt8,
                   "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True}}
    else:
        # uint8 activations with int8 weights is the layout onnxruntime's CPU kernels favour.
        options = {"quant_format": QuantFormat.QOperator, "activation_type": QuantType.QUInt8}
    _call_quantizer(
        quantize_static, prepared, out, calibration_data_reader=Reader(),
        per_channel=per_channel, weight_type=QuantType.QInt8, **options,
    )


def _call_quantizer(function: Any, prepared: Path, out: Path, **kwargs: Any) -> None:
    try:
        with warnings.catch_warnings():
            # The quantiser warns about its own internals (deprecated helpers it still calls);
            # nothing the user can act on.
            warnings.simplefilter("ignore")
            function(str(prepared), str(out), **kwargs)
    except Exception as exc:  # onnxruntime's quantiser raises ValueError, RuntimeError, ...
        raise ConvertError(f"int8 quantisation failed ({type(exc).__name__}: {exc})") from exc


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``quantize`` subcommand."""
    parser = commands.add_parser(
        "quantize", help="int8 ONNX (dynamic, or static with calibration data)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=Path, help="fp32 ONNX model")
    parser.add_argument("--out", type=Path, required=True, help="int8 ONNX model to write")
    parser.add_argument(
        "--calibration", type=Path, metavar="DIR_OR_NPZ",
        help="representative samples for static quantisation (a few hundred)",
    )
    parser.add_argument(
        "--format", dest="quant_format", choices=("qdq", "qoperator"),
        help="qdq (TensorRT; default for static) or qoperator (fastest on CPU)",
    )
    parser.add_argument(
        "--per-channel", action="store_true", help="per-channel weight scales"
    )
    parser.add_argument(
        "--calibration-limit", type=int, metavar="N", help="use at most N calibration samples"
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    quantize_onnx(
        args.model, args.out, calibration=args.calibration, quant_format=args.quant_format,
        per_channel=args.per_channel, calibration_limit=args.calibration_limit,
    )
    print(f"wrote {args.out}")
    return 0
