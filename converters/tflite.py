"""``edgeconvert tflite``: TFLite (LiteRT) variants from a Keras model or a SavedModel.

Needs TensorFlow (``pip install 'edgeagent[convert]'``). Three precisions:

* fp32 (default): a plain conversion;
* ``--fp16``: float16 weights, float32 compute on CPU and float16 on GPU delegates;
* ``--int8 --calibration DIR_OR_NPZ``: full-integer quantisation with a representative dataset,
  int8 inputs and outputs included, as the Edge TPU compiler and ARM integer kernels require.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import ConvertError, InputError
from .modelio import load_samples, match_samples
from .runners import TfliteRunner

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
KERAS_SUFFIXES = (".keras", ".h5")


def convert_tflite(
    source: Path,
    out: Path,
    *,
    precision: Precision = "fp32",
    calibration: Path | None = None,
    calibration_limit: int | None = None,
) -> Path:
    """Convert a Keras model file or a SavedModel directory to TFLite.

    Args:
        source: A ``.keras``/``.h5`` file or a SavedModel directory.
        out: Where to write the ``.tflite`` file.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"`` (full integer, int8 inputs/outputs).
        calibration: Representative samples, required for int8 (named after the model inputs).
        calibration_limit: Use at most this many calibration samples.

    Returns:
        ``out``.

    Raises:
        InputError: for a source that is neither, missing or unfit calibration data.
        ConvertError: when TensorFlow is missing or the converter fails.
    """
    if precision == "int8" and calibration is None:
        raise InputError(
            "int8 TFLite needs a representative dataset: pass --calibration DIR_OR_NPZ "
            "(a few hundred samples)"
        )
    if not (source.is_dir() and (source / "saved_model.pb").is_file()) and not (
        source.is_file() and source.suffix in KERAS_SUFFIXES
    ):
        raise InputError(
            f"{source}: not a SavedModel directory (with saved_model.pb) or a Keras model file "
            f"({', '.join(KERAS_SUFFIXES)}); for ONNX models use `edgeconvert quantize`/`fp16`"
        )
    tf = _import_tensorflow()
    arrays = load_samples(calibration) if calibration is not None else None
    if precision == "int8":
        assert arrays is not None
        assert calibration is not None
        # The fp32 conversion tells the inputs' names, order and shapes, which the
        # representative dataset must follow.
        specs = TfliteRunner(content=_convert(tf, source, "fp32", None)).inputs
        samples = match_samples(specs, arrays, str(calibration), limit=calibration_limit)
        log.info("full-integer int8 conversion, calibrating on %d samples", samples.count)

        def representative() -> Iterator[list[np.ndarray]]:
            for i in range(samples.count):
                feed = samples.feed(i)
                yield [feed[spec.name] for spec in specs]

        content = _convert(tf, source, "int8", representative)
    else:
        content = _convert(tf, source, precision, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(content)
    log.info("wrote %s (%d bytes)", out, len(content))
    return out


def _import_tensorflow() -> Any:
    # TensorFlow logs a page of C++ start-up notes to stderr; keep the user's terminal readable.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise ConvertError(
            "`edgeconvert tflite` needs TensorFlow, which is not installed: "
            "pip install 'edgeagent[convert]' (x86-64 build machines)"
        ) from exc
    return tf


def _convert(tf: Any, source: Path, precision: Precision, representative: Any) -> bytes:
    chatter = io.StringIO()
    try:
        # Keras prints its export summary to stdout and the converter warns about
        # statistics it computes itself; route both to the debug log.
        with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if source.is_dir():
                converter = tf.lite.TFLiteConverter.from_saved_model(str(source))
            else:
                import keras

                converter = tf.lite.TFLiteConverter.from_keras_model(
                    keras.models.load_model(source)
                )
            if precision != "fp32":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            if precision == "fp16":
                converter.target_spec.supported_types = [tf.float16]
            elif precision == "int8":
                converter.representative_dataset = representative
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                converter.inference_input_type = tf.int8
                converter.inference_output_type = tf.int8
            content = converter.convert()
    except Exception as exc:  # TensorFlow raises a zoo of its own and standard exceptions
        raise ConvertError(
            f"{source}: TFLite {precision} conversion failed ({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        log.debug("converter output: %s", chatter.getvalue())
    return bytes(content)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``tflite`` subcommand."""
    parser = commands.add_parser(
        "tflite", help="TFLite from Keras/SavedModel (fp32, fp16, full-integer int8)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", type=Path, metavar="SAVED_MODEL_OR_KERAS")
    parser.add_argument("--out", type=Path, required=True, help=".tflite file to write")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--int8", action="store_true", help="full-integer int8")
    precision.add_argument("--fp16", action="store_true", help="float16 weights")
    parser.add_argument("--calibration", type=Path, metavar="DIR_OR_NPZ",
                        help="representative samples (required with --int8)")
    parser.add_argument("--calibration-limit", type=int, metavar="N",
                        help="use at most N calibration samples")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    precision: Precision = "int8" if args.int8 else "fp16" if args.fp16 else "fp32"
    convert_tflite(
        args.source, args.out, precision=precision, calibration=args.calibration,
        calibration_limit=args.calibration_limit,
    )
    print(f"wrote {args.out}")
    return 0
