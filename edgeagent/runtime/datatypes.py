"""Open Inference Protocol datatypes and their numpy equivalents.

The protocol names tensor element types with strings (``FP32``, ``INT8``, ``BYTES``...). This
module is the one place that maps them to numpy dtypes and back, and to the type strings that
onnxruntime reports (``tensor(float)``).
"""

from __future__ import annotations

import numpy as np

from edgeagent.errors import InferenceInputError

#: Protocol datatype -> numpy dtype. BYTES tensors are numpy object arrays of ``bytes``.
DATATYPE_TO_NUMPY: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

_NUMPY_TO_DATATYPE = {dt: name for name, dt in DATATYPE_TO_NUMPY.items()}
_NUMPY_TO_DATATYPE[np.dtype(np.bytes_)] = "BYTES"
_NUMPY_TO_DATATYPE[np.dtype(np.str_)] = "BYTES"

#: onnxruntime's ``NodeArg.type`` strings -> protocol datatype.
ORT_TO_DATATYPE = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

#: Size in bytes of one element, for fixed-size datatypes (BYTES is variable).
DATATYPE_SIZE = {name: dt.itemsize for name, dt in DATATYPE_TO_NUMPY.items() if name != "BYTES"}


def numpy_dtype(datatype: str) -> np.dtype[np.generic]:
    """Return the numpy dtype of a protocol datatype.

    Raises:
        InferenceInputError: for a datatype the protocol does not define.
    """
    try:
        return DATATYPE_TO_NUMPY[datatype]
    except KeyError:
        raise InferenceInputError(f"unknown datatype {datatype!r}") from None


def datatype_of(dtype: np.dtype[np.generic]) -> str:
    """Return the protocol datatype of a numpy dtype (``bytes_``/``str_`` map to BYTES)."""
    dt = np.dtype(dtype)
    if dt.kind in ("S", "U"):
        return "BYTES"
    try:
        return _NUMPY_TO_DATATYPE[dt]
    except KeyError:
        raise InferenceInputError(
            f"numpy dtype {dt} has no Open Inference Protocol datatype") from None
