"""``edgeconvert fp16``: float16 weights and compute for GPUs (Jetson, TensorRT, CUDA).

Uses the converter that ships with onnxruntime (``onnxruntime.transformers.float16``). With
``--keep-io-types`` the model still takes and returns float32 (Cast nodes at the edges), so
clients need no change; without it, inputs and outputs are float16 too.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import onnx

from .errors import ConvertError
from .modelio import load_onnx, require_onnx

log = logging.getLogger(__name__)


def convert_fp16(model: Path, out: Path, *, keep_io_types: bool = False) -> Path:
    """Convert an fp32 ONNX model to fp16.

    Args:
        model: The fp32 ONNX model.
        out: Where to write the fp16 model.
        keep_io_types: Keep graph inputs and outputs float32.

    Returns:
        ``out``.

    Raises:
        InputError: when ``model`` is not a valid ONNX model.
        ConvertError: when the conversion fails.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    require_onnx(model, "fp16")
    proto = load_onnx(model)
    try:
        with warnings.catch_warnings():
            # It warns once per weight that fp16 clamps (tiny or huge values); the validation
            # step measures what that costs, which is what matters.
            warnings.simplefilter("ignore", UserWarning)
            converted = OnnxModel(convert_float_to_float16(proto, keep_io_types=keep_io_types))
        # The converter appends the Cast nodes of kept I/O types at the end of the graph;
        # ONNX requires topological order, which onnxruntime tolerates but other tools do not.
        converted.topological_sort()
        onnx.checker.check_model(converted.model)
    except Exception as exc:  # the converter raises anything from onnx's shape inference
        raise ConvertError(
            f"{model}: fp16 conversion failed ({type(exc).__name__}: {exc})"
        ) from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(converted.model, str(out))
    log.info("wrote %s (%d bytes)", out, out.stat().st_size)
    return out


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``fp16`` subcommand."""
    parser = commands.add_parser(
        "fp16", help="float16 ONNX for GPUs", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=Path, help="fp32 ONNX model")
    parser.add_argument("--out", type=Path, required=True, help="fp16 ONNX model to write")
    parser.add_argument(
        "--keep-io-types", action="store_true", help="keep inputs and outputs float32"
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    convert_fp16(args.model, args.out, keep_io_types=args.keep_io_types)
    print(f"wrote {args.out}")
    return 0
