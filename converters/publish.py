"""``edgeconvert publish``: add a model release (a bundle) to a hub.

Each FILE is a variant (``.onnx`` or ``.tflite``); its precision is read from the model, or
given as ``FILE:int8``; what it needs goes after it, ``FILE:int8:delegates=edgetpu:arch=aarch64``.
``--checks FILE.npz`` adds the checks a box runs before it activates the release: either sample
inputs (the expected outputs are computed here with the first fp32 variant), or the checks
``edgeconvert validate --write-checks`` wrote (``inputs/NAME`` and ``outputs/NAME`` arrays,
with the tolerances in the ``.json`` next to it).
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
from edgeagent.runtime.inspect import onnx_precision

from .errors import InputError
from .hub import Hub, input_errors
from .modelio import load_samples, match_samples, plain_name
from .runners import open_runner
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


def _checks(path: Path, reference: Path | None, atol: float, rtol: float
            ) -> tuple[bytes, float, float]:
    """The checks archive (inputs/NAME, outputs/NAME) and its tolerances."""
    arrays = load_samples(path)
    # Values typed Any: np.savez types its **kwds together with its allow_pickle flag.
    data: dict[str, Any]
    if any(k.startswith("outputs/") for k in arrays):
        meta = path.with_suffix(".json")
        if meta.is_file():  # edgeconvert validate --write-checks
            tolerances = json.loads(meta.read_text()).get("tolerances", {})
            if tolerances.get("max_abs_error") is not None:
                atol, rtol = float(tolerances["max_abs_error"]), 0.0
        data = arrays
    else:
        if reference is None:
            raise InputError("--checks with sample inputs needs an fp32 variant to compute the "
                             "expected outputs")
        runner = open_runner(reference)
        samples = match_samples(runner.inputs, arrays, str(path))
        outputs, _ = run_model(runner, samples)
        data = {f"inputs/{plain_name(n)}": a for n, a in samples.arrays.items()}
        data |= {f"outputs/{plain_name(n)}": a for n, a in outputs.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **data)
    return buffer.getvalue(), atol, rtol


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
    runner = open_runner(specs[0].path)
    inputs = [{"name": plain_name(i.name), "dtype": str(i.dtype),
               "shape": [-1 if d is None else d for d in i.shape]} for i in runner.inputs]
    outputs = [{"name": n} for n in runner.output_names]
    checks_entry = None
    if checks is not None:
        data, c_atol, c_rtol = _checks(checks, reference, atol, rtol)
        files["checks.npz"] = data
        checks_entry = {**file_ref("checks.npz", data), "atol": c_atol, "rtol": c_rtol}
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
    p.add_argument("--atol", type=float, default=1e-2, help="check tolerance (absolute)")
    p.add_argument("--rtol", type=float, default=1e-2, help="check tolerance (relative)")
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
