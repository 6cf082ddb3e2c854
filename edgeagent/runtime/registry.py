"""Backends by model format, imported lazily.

A backend module is imported the first time a model of its format is loaded. A missing optional
package (LiteRT on a box without it) is reported as :class:`BackendUnavailable` with the install
hint; an error inside our own module is a bug and propagates as it is.
"""

from __future__ import annotations

import importlib
import threading
from pathlib import Path

from edgeagent.errors import BackendUnavailable, ModelError
from edgeagent.runtime.base import Backend

#: format -> (module, class). The class's constructor raises BackendUnavailable when its
#: runtime package is missing.
BACKENDS: dict[str, tuple[str, str]] = {
    "onnx": ("edgeagent.runtime.onnx_backend", "OnnxBackend"),
    "tflite": ("edgeagent.runtime.litert_backend", "LiteRTBackend"),
}

_SUFFIXES = {".onnx": "onnx", ".tflite": "tflite"}


def model_format(path: Path) -> str:
    """The format of a model file, from its name, confirmed by its first bytes.

    Raises:
        ModelError: for a name that is neither ``.onnx`` nor ``.tflite``, or content that is
            clearly not that format (a TFLite flatbuffer carries ``TFL3`` at offset 4).
    """
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ModelError(f"{path.name}: not a model file (expected .onnx or .tflite)")
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror}") from exc
    if fmt == "tflite" and head[4:8] != b"TFL3":
        raise ModelError(f"{path.name}: not a TFLite flatbuffer (no TFL3 identifier)")
    # An ONNX ModelProto starts with one of its field tags (ir_version, producer, graph...).
    onnx_tags = (b"\x08", b"\x12", b"\x1a", b"\x22", b"\x3a", b"\x42")
    if fmt == "onnx" and (len(head) < 2 or head[:1] not in onnx_tags):
        raise ModelError(f"{path.name}: not an ONNX protobuf")
    return fmt


class BackendRegistry:
    """Creates each backend once, on first use, and remembers why one is unavailable."""

    def __init__(self, backends: dict[str, tuple[str, str]] | None = None) -> None:
        self._specs = dict(backends or BACKENDS)
        self._made: dict[str, Backend] = {}
        self._described: dict[str, dict[str, object]] = {}
        self._lock = threading.Lock()

    def for_format(self, fmt: str) -> Backend:
        """The backend for a model format.

        Raises:
            BackendUnavailable: its runtime package is not installed.
            ModelError: no backend handles this format.
        """
        with self._lock:
            if fmt in self._made:
                return self._made[fmt]
            try:
                module_name, cls_name = self._specs[fmt]
            except KeyError:
                raise ModelError(f"no backend for model format {fmt!r}") from None
            module = importlib.import_module(module_name)
            backend: Backend = getattr(module, cls_name)()
            self._made[fmt] = backend
            self._described.pop(fmt, None)  # the status describes the backend itself now
            return backend

    def status(self) -> dict[str, dict[str, object]]:
        """Per format: whether a backend is available, its versions, or why not.

        A backend no model has needed yet is described without being created where its class
        can tell from what is installed (``probe``): reading the status must not load a
        runtime (LiteRT's import alone maps 11 MB into a box that serves only ONNX models).
        Each description is made once and kept until that backend is created (probes and
        version lookups read the filesystem, and every scrape of /metrics and every reported
        state reads the status).
        """
        return {fmt: self._describe(fmt) for fmt in self._specs}

    def _describe(self, fmt: str) -> dict[str, object]:
        with self._lock:
            known = self._described.get(fmt)
            made = self._made.get(fmt)
        if known is not None:
            return known
        described: dict[str, object] | None = None
        if made is None:
            module_name, cls_name = self._specs[fmt]
            probe = getattr(getattr(importlib.import_module(module_name), cls_name),
                            "probe", None)
            described = probe() if probe is not None else None
        probed = described is not None
        if described is None:
            try:
                backend = self.for_format(fmt)
            except BackendUnavailable as exc:
                described = {"available": False, "reason": str(exc), "hint": exc.hint}
            else:
                described = {"available": True, "backend": backend.name, **backend.versions()}
        with self._lock:
            if not (probed and fmt in self._made):  # a probe made stale by a load meanwhile
                self._described[fmt] = described
        return described
