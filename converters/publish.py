"""``edgeconvert publish``: add a model release (a bundle) to a hub.

Each FILE is a variant (``.onnx`` or ``.tflite``); its precision is read from the model, or
given as ``FILE:int8``; what it needs goes after it, ``FILE:int8:delegates=edgetpu:arch=aarch64``.
``--checks FILE.npz`` adds the checks a box runs before it activates the release: either sample
inputs (the expected outputs are computed here with the first fp32 variant), or the checks
``edgeconvert validate --write-checks`` wrote (``inputs/NAME`` and ``outputs/NAME`` arrays,
with the tolerances, default and per variant, in the ``.json`` next to it). Every variant is
opened, and checks that a box could not apply to one of them are refused.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.errors import ModelError
from edgeagent.hub.repository import file_ref, release_bundle
from edgeagent.runtime.checks import TensorNameError, pair_names, plain_name
from edgeagent.runtime.inspect import onnx_precision

from .errors import ConvertError, InputError
from .hub import Hub, input_errors
from .modelio import load_samples, match_samples
from .runners import Runner, open_runner
from .validate import run_model

_NEEDS = ("arch", "providers", "delegates")


@dataclass(frozen=True)
class VariantSpec:
    """One ``FILE[:PRECISION][:KEY=A,B]...`` argument."""

    path: Path
    precision: str = ""
    needs: Mapping[str, tuple[str, ...]] | None = None

    @classmethod
    def parse(cls, text: str) -> VariantSpec:
        """Raises InputError for an unknown precision or need."""
        path, *rest = text.split(":")
        precision, needs = "", {}
        for part in rest:
            if "=" in part:
                key, _, values = part.partition("=")
                if key not in _NEEDS:
                    raise InputError(f"{text}: unknown need {key!r} (known: {', '.join(_NEEDS)})")
                needs[key] = tuple(v for v in values.split(",") if v)
            elif part in ("fp32", "fp16", "int8"):
                precision = part
            else:
                raise InputError(f"{text}: {part!r} is neither fp32, fp16, int8 nor KEY=VALUES")
        return cls(Path(path), precision, needs)


def detect_precision(path: Path) -> str:
    """A model's precision from its content (int8 quantised, fp16 weights, else fp32).

    Raises:
        InputError: the file is not a model of its kind (exit 2, not an unexpected error).
    """
    if path.suffix == ".onnx":
        try:
            return onnx_precision(path)[0]
        except ModelError as exc:
            raise InputError(f"{path}: not an ONNX model ({exc})") from exc
    try:
        # LiteRT is optional on the build side: imported only for a TFLite variant.
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise InputError(f"{path}: give its precision (FILE:int8); reading TFLite models needs "
                         "LiteRT: pip install 'edgeagent[litert]'") from exc
    try:
        details = Interpreter(model_path=str(path)).get_tensor_details()
    except (ValueError, RuntimeError) as exc:  # LiteRT's words for "not a TFLite model"
        raise InputError(f"{path}: not a TFLite model ({exc})") from exc
    dtypes = {np.dtype(d["dtype"]) for d in details}
    if dtypes & {np.dtype(np.int8), np.dtype(np.uint8)}:
        return "int8"
    return "fp16" if np.dtype(np.float16) in dtypes else "fp32"


_TOLERANCE_KEYS = ("max_abs_error", "min_cosine", "min_top1")


def _tolerances(data: Any, where: str) -> dict[str, float | None]:
    """A tolerances object from a checks JSON file, checked (the bundle checks ranges)."""
    if not isinstance(data, dict) or set(data) - set(_TOLERANCE_KEYS):
        raise InputError(f"{where}: expected an object of {', '.join(_TOLERANCE_KEYS)}")
    out: dict[str, float | None] = {}
    for key in _TOLERANCE_KEYS:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise InputError(f"{where}.{key}: expected a number or null, not {value!r}")
        out[key] = None if value is None else float(value)
    return out


def _checks_meta(meta: Path, variant_files: Sequence[str]) -> dict[str, Any]:
    """The tolerances of ``edgeconvert validate --write-checks`` (its ``.json``), for the bundle:
    ``tolerances``, and ``variant_tolerances`` of the variants published."""
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{meta}: not a readable checks JSON file ({exc})") from exc
    if not isinstance(doc, dict):
        raise InputError(f"{meta}: expected a JSON object")
    out: dict[str, Any] = {}
    default = _tolerances(doc.get("tolerances") or {}, f"{meta}: tolerances")
    per_variant = doc.get("variant_tolerances") or {}
    if not isinstance(per_variant, dict):
        raise InputError(f"{meta}: variant_tolerances: expected an object: file -> tolerances")
    variants = {k: _tolerances(v, f"{meta}: variant_tolerances[{k!r}]")
                for k, v in per_variant.items() if k in variant_files}
    # All null would check nothing: atol/rtol then apply to the variants not listed.
    if any(v is not None for v in default.values()):
        out["tolerances"] = default
    if variants:
        out["variant_tolerances"] = variants
    return out


def _checks(path: Path, reference: Path | None, atol: float, rtol: float,
            variant_files: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checks arrays (inputs/NAME, outputs/NAME) and their tolerance fields."""
    arrays = load_samples(path)
    # Values typed Any: np.savez types its **kwds together with its allow_pickle flag.
    data: dict[str, Any]
    fields: dict[str, Any] = {}
    if any(k.startswith("outputs/") for k in arrays):
        meta = path.with_suffix(".json")
        if meta.is_file():  # edgeconvert validate --write-checks
            fields = _checks_meta(meta, variant_files)
            default = fields.get("tolerances", {})
            if default.get("max_abs_error") is not None:
                # What boxes that read only atol/rtol apply.
                atol, rtol = float(default["max_abs_error"]), 0.0
        data = arrays
        if not any(k.startswith("inputs/") for k in data) or set(data) != {
                k for k in data if k.startswith(("inputs/", "outputs/"))}:
            raise InputError(f"{path}: checks hold only inputs/NAME and outputs/NAME arrays")
    else:
        if reference is None:
            raise InputError("--checks with sample inputs needs an fp32 variant to compute the "
                             "expected outputs")
        runner = open_runner(reference)
        samples = match_samples(runner.inputs, arrays, str(path))
        outputs, _ = run_model(runner, samples)
        data = {f"inputs/{plain_name(n)}": a for n, a in samples.arrays.items()}
        data |= {f"outputs/{plain_name(n)}": a for n, a in outputs.items()}
    return data, {"atol": atol, "rtol": rtol, **fields}


def _shape(dims: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def check_variant(runner: Runner, arrays: Mapping[str, np.ndarray]) -> None:
    """Refuse checks that cannot apply to a variant, with the box's own rules.

    The names pair as a box pairs them (:func:`edgeagent.runtime.checks.pair_names`), each
    check input must fit the variant's input (rank, fixed dimensions, number kind), and the
    first check, run here, must give outputs of the expected shapes.

    Raises:
        InputError: naming the variant and the tensor.
    """
    file = runner.path.name
    inputs = {k[7:]: a for k, a in arrays.items() if k.startswith("inputs/")}
    outputs = {k[8:]: a for k, a in arrays.items() if k.startswith("outputs/")}
    specs = {i.name: i for i in runner.inputs}
    try:
        in_names = pair_names(list(inputs), list(specs), by_position=False)
    except TensorNameError as exc:
        raise InputError(f"{file}: the checks' input {exc.name!r} matches no input of this "
                         f"variant (it takes {', '.join(specs)})") from exc
    feed = {}
    for name, real in in_names.items():
        spec, value = specs[real], inputs[name]
        dims = value.shape[1:]
        if len(dims) != len(spec.shape) or any(
                want is not None and want != got for want, got in zip(spec.shape, dims,
                                                                     strict=True)):
            raise InputError(f"{file}: the checks' input {name!r} has shape {_shape(dims)}, "
                             f"the variant's {real!r} takes {_shape(spec.shape)}")
        if value.dtype.kind != spec.dtype.kind and not (
                value.dtype.kind in "iu" and spec.dtype.kind in "iu"):
            raise InputError(f"{file}: the checks' input {name!r} is {value.dtype}, the "
                             f"variant's {real!r} takes {spec.dtype}")
        feed[real] = value[0].astype(spec.dtype)
    try:
        out_names = pair_names(list(outputs), runner.output_names, by_position=True)
    except TensorNameError as exc:
        raise InputError(f"{file}: the checks' output {exc.name!r} matches no output of this "
                         f"variant (it gives {', '.join(runner.output_names)})") from exc
    try:
        got = dict(zip(runner.output_names, runner.run(feed), strict=True))
    except ConvertError as exc:
        raise InputError(f"{file}: the checks do not run on this variant: {exc}") from exc
    for name, real in out_names.items():
        if got[real].shape != outputs[name].shape[1:]:
            raise InputError(f"{file}: the checks' output {name!r} has shape "
                             f"{_shape(outputs[name].shape[1:])}, the variant's {real!r} gives "
                             f"{_shape(got[real].shape)}")


def publish(hub_dir: Path, keys_dir: Path, name: str, version: int, variants: Sequence[str],
            *, checks: Path | None = None, atol: float = 1e-2, rtol: float = 1e-2,
            expiry: Mapping[str, timedelta] | None = None) -> dict[str, Any]:
    """Add a release to a hub; return its bundle.json.

    Raises:
        InputError: bad files, a version not newer than the hub's latest, bad checks.
    """
    if version < 1:
        raise InputError(f"--version must be 1 or more, not {version}")
    if not variants:
        raise InputError("name at least one model FILE")
    specs = [VariantSpec.parse(v) for v in variants]
    files: dict[str, bytes] = {}
    entries = []
    for spec in specs:
        if spec.path.suffix not in (".onnx", ".tflite") or not spec.path.is_file():
            raise InputError(f"{spec.path}: expected an existing .onnx or .tflite file")
        if spec.path.name in files:
            raise InputError(f"{spec.path.name}: two variants with the same file name")
        data = files[spec.path.name] = spec.path.read_bytes()
        entries.append({
            **file_ref(spec.path.name, data), "format": spec.path.suffix[1:],
            "precision": spec.precision or detect_precision(spec.path),
            "needs": {k: list(v) for k, v in (spec.needs or {}).items()},
        })
    reference = next((s.path for s, e in zip(specs, entries, strict=True)
                      if e["precision"] == "fp32"), None)
    runners = [open_runner(spec.path) for spec in specs]
    inputs = [{"name": plain_name(i.name), "dtype": str(i.dtype),
               "shape": [-1 if d is None else d for d in i.shape]} for i in runners[0].inputs]
    outputs = [{"name": n} for n in runners[0].output_names]
    checks_entry = None
    if checks is not None:
        arrays, fields = _checks(checks, reference, atol, rtol, list(files))
        for runner in runners:  # a check a box cannot pair with its variant would fail it
            check_variant(runner, arrays)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        files["checks.npz"] = buffer.getvalue()
        checks_entry = {**file_ref("checks.npz", files["checks.npz"]), **fields}
    with input_errors():
        bundle = release_bundle(name, version, inputs=inputs, outputs=outputs,
                                variants=entries, checks=checks_entry)
        Hub(hub_dir, keys_dir, expiry).add_release(name, version, files, bundle)
    return bundle


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``publish``."""
    p = commands.add_parser("publish", help="add a model release (bundle) to a hub",
                            description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--hub", type=Path, required=True, metavar="HUB_DIR")
    p.add_argument("--keys", type=Path, required=True, metavar="KEYS_DIR")
    p.add_argument("--name", required=True)
    p.add_argument("--version", type=int, required=True, metavar="N")
    p.add_argument("--checks", type=Path, metavar="FILE.npz",
                   help="sample inputs (or validate --write-checks output) for on-box checks")
    p.add_argument("--atol", type=float, default=1e-2,
                   help="check tolerance (absolute) where the checks bring none of their own")
    p.add_argument("--rtol", type=float, default=1e-2,
                   help="check tolerance (relative) where the checks bring none of their own")
    p.add_argument("files", nargs="+", metavar="FILE[:PRECISION][:KEY=A,B]")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    bundle = publish(args.hub, args.keys, args.name, args.version, args.files,
                     checks=args.checks, atol=args.atol, rtol=args.rtol)
    variants = ", ".join(f"{v['file']} ({v['format']}/{v['precision']})"
                         for v in bundle["variants"])
    print(f"published {args.name} version {args.version}: {variants}"
          + (" with checks" if bundle["checks"] else ""))
    return 0
