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
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeagent.errors import VerificationError
from edgeagent.runtime.checks import ModelCheck, Tolerances

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
    """The checks file (``.npz`` of ``inputs/NAME`` and ``outputs/NAME``) and its tolerances.

    A variant is checked with ``variant_tolerances[its file]``, else ``tolerances``, else
    ``atol``/``rtol`` (``np.allclose`` per check, what bundles before the tolerances carried).
    """

    atol: float | None = 1e-3
    rtol: float | None = 1e-3
    tolerances: Tolerances | None = None
    variant_tolerances: Mapping[str, Tolerances] = field(default_factory=dict)

    def for_variant(self, file: str | None) -> Tolerances | None:
        """The tolerances a variant is checked with; None: ``atol``/``rtol``."""
        if file is not None and file in self.variant_tolerances:
            return self.variant_tolerances[file]
        return self.tolerances

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "size": self.size, "sha256": self.sha256}
        if self.atol is not None and self.rtol is not None:
            out |= {"atol": self.atol, "rtol": self.rtol}
        if self.tolerances is not None:
            out["tolerances"] = self.tolerances.to_dict()
        if self.variant_tolerances:
            out["variant_tolerances"] = {k: v.to_dict()
                                         for k, v in self.variant_tolerances.items()}
        return out


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


#: Each tolerance and the range it must lie in.
_TOLERANCE_RANGE = {"max_abs_error": (0.0, math.inf), "min_cosine": (-1.0, 1.0),
                    "min_top1": (0.0, 1.0)}


def _number(data: Mapping[str, Any], key: str, where: str, low: float, high: float) -> float:
    value = _get(data, key, (int, float), where)
    if not math.isfinite(value) or not low <= value <= high:
        bounds = f">= {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
        raise _fail(f"{where}{key}", f"{value!r} must be a number {bounds}")
    return float(value)


def _tolerances(data: Any, where: str) -> Tolerances:
    if not isinstance(data, Mapping):
        raise _fail(where.rstrip("."), "expected an object of max_abs_error, min_cosine, "
                    "min_top1 (null: not checked)")
    unknown = sorted(set(data) - set(_TOLERANCE_RANGE))
    if unknown:
        raise _fail(f"{where}{unknown[0]}",
                    f"unknown tolerance (known: {', '.join(_TOLERANCE_RANGE)})")
    values = {key: None if data.get(key) is None else _number(data, key, where, *bounds)
              for key, bounds in _TOLERANCE_RANGE.items()}
    return Tolerances(**values)


def _checks_ref(data: Any, variant_files: list[str]) -> ChecksRef:
    file, size, sha = _file_ref(data, "checks.")
    if not file.endswith(".npz"):
        raise _fail("checks.file", "expected a .npz file")
    tolerances = None
    if data.get("tolerances") is not None:
        tolerances = _tolerances(data["tolerances"], "checks.tolerances.")
    per_variant: dict[str, Tolerances] = {}
    raw = data.get("variant_tolerances")
    if raw is not None:
        if not isinstance(raw, Mapping):
            raise _fail("checks.variant_tolerances", "expected an object: variant file -> "
                        "tolerances")
        for key, value in raw.items():
            if key not in variant_files:
                raise _fail(f"checks.variant_tolerances[{key!r}]",
                            "names no variant of this release")
            per_variant[key] = _tolerances(value, f"checks.variant_tolerances[{key!r}].")
    atol = rtol = None
    # Without default tolerances, atol and rtol are the default (and older boxes read them).
    if "atol" in data or "rtol" in data or tolerances is None:
        atol, rtol = (_number(data, k, "checks.", 0.0, math.inf) for k in ("atol", "rtol"))
    return ChecksRef(file, size, sha, atol, rtol, tolerances, per_variant)


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
        checks = _checks_ref(data["checks"], [v.file for v in variants])
    return Bundle(bname, bversion, _signature(data.get("inputs", []), "inputs"),
                  _signature(data.get("outputs", []), "outputs"), tuple(variants), checks)


def read_checks(data: bytes, ref: ChecksRef, variant: str | None = None
                ) -> tuple[ModelCheck, ...]:
    """Turn a checks ``.npz`` (``inputs/NAME`` and ``outputs/NAME`` arrays, each with a leading
    check axis: the format ``edgeconvert validate --write-checks`` writes) into model checks.

    Args:
        data: The checks file's content.
        ref: Its entry in the bundle, with the tolerances.
        variant: The file of the variant the checks run on: its ``variant_tolerances`` apply,
            else the bundle's ``tolerances``, else ``atol``/``rtol``.

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
    if not inputs or not outputs or len(counts) != 1 or -1 in counts or 0 in counts:
        raise VerificationError(
            f"checks file {ref.file}: expected inputs/NAME and outputs/NAME arrays with the same "
            "leading check axis"
        )
    tolerances = ref.for_variant(variant)
    limits: dict[str, float | None] = (
        {"atol": ref.atol, "rtol": ref.rtol} if tolerances is None
        else {"atol": None, "rtol": None, **tolerances.to_dict()}
    )
    return tuple(
        ModelCheck({n: a[i] for n, a in inputs.items()}, {n: a[i] for n, a in outputs.items()},
                   **limits)
        for i in range(counts.pop())
    )
