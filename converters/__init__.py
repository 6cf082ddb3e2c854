"""edgeconvert: the build-side tool that turns one fp32 model into the variants edge boxes run.

int8 ONNX (:func:`quantize_onnx`), fp16 ONNX (:func:`convert_fp16`), TFLite fp32/fp16/int8
(:func:`convert_tflite`), and proof that each variant answers close enough to the original
(:func:`validate_variants`, :func:`write_checks`). The agent never imports this package.
"""

from .errors import ConvertError, InputError
from .fp16 import convert_fp16
from .quantize import quantize_onnx
from .tflite import convert_tflite
from .validate import (
    Tolerances,
    ValidationReport,
    derive_tolerances,
    validate_variants,
    write_checks,
)

__all__ = [
    "ConvertError",
    "InputError",
    "Tolerances",
    "ValidationReport",
    "convert_fp16",
    "convert_tflite",
    "derive_tolerances",
    "quantize_onnx",
    "validate_variants",
    "write_checks",
]
