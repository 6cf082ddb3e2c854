"""The release bundle: ``models/NAME/VERSION/bundle.json`` on a hub, and its checks file.

One schema for both sides: ``edgeconvert publish`` builds a :class:`Bundle` and writes
:meth:`Bundle.to_dict`; the agent reads it back with :func:`parse_bundle`, which refuses
anything it does not understand with a :class:`~edgeagent.errors.VerificationError` naming the
field. A bundle only names files in its own release folder (plain names, no ``/``): with every
file's size and SHA-256 in the bundle as well as in the TUF targets metadata, a file from
another release cannot be slipped in.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeagent.errors import VerificationError
from edgeagent.runtime.manager import ModelCheck

SCHEMA = 1
FORMATS = ("onnx", "tflite")
PRECISIONS = ("fp32", "fp16", "int8")
_SUFFIX = {"onnx": ".onnx", "tflite": ".tflite"}
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NEEDS = ("arch", "providers", "delegates")


def bundle_path(name: str, version: int) -> str:
    """The TUF target path of a release's bundle.json."""
    return f"models/{name}/{version}/bundle.json"


def file_path(name: str, version: int, file: str) -> str:
    """The TUF target path of a file a release names."""
    return f"models/{name}/{version}/{file}"


@dataclass(frozen=True)
class FileRef:
    """A file of the release: plain name in the release folder, size, SHA-256."""

    file: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Variant(FileRef):
    """One runnable form of the model (what :func:`edgeagent.device.plan.rank_variants` ranks)."""

    format: str = "onnx"
    precision: str = "fp32"
    needs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.format}-{self.precision}:{self.file}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "size": self.size, "sha256": self.sha256,
                "format": self.format, "precision": self.precision,
                "needs": {k: list(v) for k, v in self.needs.items()}}


@dataclass(frozen=True)
class ChecksRef(FileRef):
    """The checks file (``.npz`` of ``inputs/NAME`` and ``outputs/NAME``) and its tolerances."""

    atol: float = 1e-3
    rtol: float = 1e-3

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "size": self.size, "sha256": self.sha256,
                "atol": self.atol, "rtol": self.rtol}


@dataclass(frozen=True)
class Bundle:
    """A model release: what ``bundle.json`` holds."""

    name: str
    version: int
    inputs: tuple[Mapping[str, Any], ...]
    outputs: tuple[Mapping[str, Any], ...]
    variants: tuple[Variant, ...]
    checks: ChecksRef | None = None

    def files(self) -> tuple[FileRef, ...]:
        """Every file the release names (variants, then checks)."""
        return (*self.variants, *((self.checks,) if self.checks else ()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "name": self.name,
            "version": self.version,
            "inputs": [dict(s) for s in self.inputs],
            "outputs": [dict(s) for s in self.outputs],
            "variants": [v.to_dict() for v in self.variants],
            "checks": self.checks.to_dict() if self.checks else None,
        }


def _fail(key: str, message: str) -> VerificationError:
    return VerificationError(f"bundle.json: {key}: {message}")


def _get(data: Mapping[str, Any], key: str, tp: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise _fail(f"{where}{key}", "missing")
    value = data[key]
    if isinstance(value, bool) and bool not in (tp if isinstance(tp, tuple) else (tp,)):
        raise _fail(f"{where}{key}", f"unexpected {value!r}")
    if not isinstance(value, tp):
        raise _fail(f"{where}{key}", f"unexpected {value!r}")
    return value


def _file_ref(data: Any, where: str) -> tuple[str, int, str]:
    if not isinstance(data, Mapping):
        raise _fail(where.rstrip("."), "expected an object")
    file = _get(data, "file", str, where)
    if not _FILE.match(file) or file == "bundle.json":
        raise _fail(f"{where}file", f"{file!r} is not a plain file name in the release folder")
    size = _get(data, "size", int, where)
    if size < 0:
        raise _fail(f"{where}size", "must be >= 0")
    sha = _get(data, "sha256", str, where)
    if not _SHA256.match(sha):
        raise _fail(f"{where}sha256", "expected 64 lowercase hex digits")
    return file, size, sha


def _signature(data: Any, key: str) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(data, list):
        raise _fail(key, "expected a list of tensors")
    for i, spec in enumerate(data):
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise _fail(f"{key}[{i}]", "expected an object with a name")
    return tuple(data)


# One branch per refused field, in document order: splitting it would only scatter the schema.
def parse_bundle(  # noqa: PLR0912
        data: Any, name: str | None = None, version: int | None = None) -> Bundle:
    """Validate a parsed bundle.json.

    Args:
        data: The parsed JSON document.
        name: The model name its hub path says; the bundle must agree.
        version: The version its hub path says; the bundle must agree.

    Raises:
        VerificationError: naming the first field that is wrong.
    """
    if not isinstance(data, Mapping):
        raise _fail("(document)", "expected a JSON object")
    if data.get("schema") != SCHEMA:
        raise _fail("schema",
                    f"unsupported schema {data.get('schema')!r} (this agent reads {SCHEMA})")
    bname = _get(data, "name", str, "")
    if not _NAME.match(bname):
        raise _fail("name", f"{bname!r} is not a model name")
    bversion = _get(data, "version", int, "")
    if bversion < 1:
        raise _fail("version", "versions start at 1")
    if name is not None and bname != name:
        raise _fail("name", f"{bname!r} published under the name {name!r}")
    if version is not None and bversion != version:
        raise _fail("version", f"{bversion} published as version {version}")
    raw_variants = _get(data, "variants", list, "")
    if not raw_variants:
        raise _fail("variants", "a release needs at least one variant")
    variants = []
    for i, raw in enumerate(raw_variants):
        where = f"variants[{i}]."
        file, size, sha = _file_ref(raw, where)
        fmt = _get(raw, "format", str, where)
        if fmt not in FORMATS:
            raise _fail(f"{where}format", f"expected {' or '.join(FORMATS)}, got {fmt!r}")
        if not file.endswith(_SUFFIX[fmt]):
            raise _fail(f"{where}file", f"a {fmt} variant must end in {_SUFFIX[fmt]}")
        precision = _get(raw, "precision", str, where)
        if precision not in PRECISIONS:
            raise _fail(f"{where}precision", f"expected {', '.join(PRECISIONS)}, got {precision!r}")
        needs_raw = raw.get("needs") or {}
        if not isinstance(needs_raw, Mapping) or set(needs_raw) - set(_NEEDS):
            raise _fail(f"{where}needs", f"expected an object with keys among {', '.join(_NEEDS)}")
        needs = {}
        for key, value in needs_raw.items():
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise _fail(f"{where}needs.{key}", "expected a list of names")
            needs[key] = tuple(value)
        variants.append(Variant(file, size, sha, fmt, precision, needs))
    if len({v.file for v in variants}) != len(variants):
        raise _fail("variants", "two variants name the same file")
    checks = None
    if data.get("checks") is not None:
        file, size, sha = _file_ref(data["checks"], "checks.")
        if not file.endswith(".npz"):
            raise _fail("checks.file", "expected a .npz file")
        tol = [_get(data["checks"], k, (int, float), "checks.") for k in ("atol", "rtol")]
        if min(tol) < 0:
            raise _fail("checks", "tolerances must be >= 0")
        checks = ChecksRef(file, size, sha, float(tol[0]), float(tol[1]))
    return Bundle(bname, bversion, _signature(data.get("inputs", []), "inputs"),
                  _signature(data.get("outputs", []), "outputs"), tuple(variants), checks)


def read_checks(data: bytes, ref: ChecksRef) -> tuple[ModelCheck, ...]:
    """Turn a checks ``.npz`` (``inputs/NAME`` and ``outputs/NAME`` arrays, each with a leading
    check axis: the format ``edgeconvert validate --write-checks`` writes) into model checks.

    Raises:
        VerificationError: the file is not such an archive.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise VerificationError(f"checks file {ref.file}: not a readable .npz ({exc})") from exc
    inputs = {k[7:]: a for k, a in arrays.items() if k.startswith("inputs/")}
    outputs = {k[8:]: a for k, a in arrays.items() if k.startswith("outputs/")}
    counts = {a.shape[0] if a.ndim else -1 for a in (*inputs.values(), *outputs.values())}
    if not inputs or not outputs or len(counts) != 1 or -1 in counts:
        raise VerificationError(
            f"checks file {ref.file}: expected inputs/NAME and outputs/NAME arrays with the same "
            "leading check axis"
        )
    return tuple(
        ModelCheck({n: a[i] for n, a in inputs.items()}, {n: a[i] for n, a in outputs.items()},
                   atol=ref.atol, rtol=ref.rtol)
        for i in range(counts.pop())
    )
