"""``edgeconvert validate``: prove that each variant still answers close enough to the original.

Runs the reference and every variant on the same samples on this box (ONNX with onnxruntime's
CPU provider, TFLite with LiteRT), one sample at a time, and compares each output of each
variant with the reference's. Metrics (the same definitions as in ``docs/converting.md``):

* ``max_abs_error``: max |variant - reference| over all samples and elements;
* ``max_rel_error``: ``max_abs_error`` / max |reference|, the error relative to the output's
  range (``reference_range``);
* ``cosine``: mean over samples of the cosine similarity of the flattened outputs;
* ``top1``: for classifier outputs (``[batch, classes]``, two classes or more), the share of
  samples whose arg-max class agrees;
* size in bytes and mean latency per sample (after one warm-up run).

``--write-checks OUT.npz`` also writes the checks a hub bundle carries (see
:func:`write_checks`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.runtime.checks import TensorNameError, compare, pair_names, plain_name

from .errors import ConvertError, InputError
from .modelio import Samples, load_samples, match_samples, model_format
from .runners import Runner, open_runner, timed_run

log = logging.getLogger(__name__)

#: Name of the checks format, written into every checks JSON file.
CHECKS_FORMAT = "edgeconvert.checks"
CHECKS_VERSION = 1
#: Derived tolerances allow this multiple of the error measured here, since another box, or
#: another execution provider, rounds differently.
TOLERANCE_MARGIN = 2.0
#: ... and never less than this share of the reference's range (or cosine distance), so that a
#: variant that matches exactly here still passes on a GPU that sums in another order.
TOLERANCE_FLOOR = 1e-3
COSINE_FLOOR = 1e-4


@dataclass(frozen=True)
class Tolerances:
    """Limits a variant must stay within; ``None`` means not checked."""

    max_abs_error: float | None = None
    min_cosine: float | None = None
    min_top1: float | None = None


@dataclass(frozen=True)
class OutputMetrics:
    """How one output of a variant compares with the reference's."""

    name: str
    max_abs_error: float
    max_rel_error: float
    cosine: float
    top1: float | None
    reference_range: float


@dataclass(frozen=True)
class ModelResult:
    """One model's run: size, latency and (for a variant) its metrics per output."""

    path: str
    format: str
    size_bytes: int
    latency_ms: float
    outputs: list[OutputMetrics] = field(default_factory=list)

    def failures(self, tolerances: Tolerances) -> list[str]:
        """Describe every way this result breaks ``tolerances`` (empty when it passes)."""
        found = []
        for out in self.outputs:
            t = tolerances
            if t.max_abs_error is not None and out.max_abs_error > t.max_abs_error:
                found.append(f"{self.path}: output {out.name!r} max abs error "
                             f"{out.max_abs_error:.4g} > {t.max_abs_error:.4g}")
            if t.min_cosine is not None and out.cosine < t.min_cosine:
                found.append(f"{self.path}: output {out.name!r} cosine similarity "
                             f"{out.cosine:.6f} < {t.min_cosine:.6f}")
            if t.min_top1 is not None and out.top1 is not None and out.top1 < t.min_top1:
                found.append(f"{self.path}: output {out.name!r} top-1 agreement "
                             f"{out.top1:.4f} < {t.min_top1:.4f}")
        return found


@dataclass(frozen=True)
class ValidationReport:
    """The reference's run and every variant's comparison with it."""

    samples: int
    reference: ModelResult
    variants: list[ModelResult]

    def failures(self, tolerances: Tolerances) -> list[str]:
        """Every tolerance any variant breaks."""
        return [f for v in self.variants for f in v.failures(tolerances)]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``--json`` output)."""
        return asdict(self)


def run_model(runner: Runner, samples: Samples) -> tuple[dict[str, np.ndarray], float]:
    """Run every sample through ``runner``.

    Returns:
        Output name -> outputs stacked on a leading sample axis, and the mean seconds per
        sample (the first, warm-up, run is not counted).
    """
    runner.run(samples.feed(0))
    per_output: list[list[np.ndarray]] = [[] for _ in runner.output_names]
    total = 0.0
    for i in range(samples.count):
        outputs, seconds = timed_run(runner, samples.feed(i))
        total += seconds
        for store, value in zip(per_output, outputs, strict=True):
            store.append(value)
    stacked = {name: np.stack(v) for name, v in zip(runner.output_names, per_output, strict=True)}
    return stacked, total / samples.count


def compare_outputs(
    reference: Mapping[str, np.ndarray], variant: Mapping[str, np.ndarray], variant_path: str
) -> list[OutputMetrics]:
    """Compare a variant's stacked outputs with the reference's.

    Outputs pair up by name, or by position when the names differ (a TFLite model names its
    outputs after the graph, not after the ONNX model).

    Raises:
        InputError: when the outputs cannot be paired or their shapes differ.
    """
    try:
        paired = pair_names(list(reference), list(variant), by_position=True)
    except TensorNameError as exc:
        raise InputError(
            f"{variant_path}: has outputs {list(variant)}, the reference has {list(reference)}; "
            "is it a variant of this model?"
        ) from exc
    pairs = [(n, a, variant[paired[n]]) for n, a in reference.items()]
    metrics = []
    for name, ref, var in pairs:
        if ref.shape != var.shape:
            raise InputError(
                f"{variant_path}: output {name!r} has shape {list(var.shape[1:])}, the "
                f"reference's has {list(ref.shape[1:])}"
            )
        metrics.append(_metrics(name, ref.astype(np.float64), var.astype(np.float64)))
    return metrics


def _metrics(name: str, ref: np.ndarray, var: np.ndarray) -> OutputMetrics:
    # The box compares its checks with the same function (edgeagent.runtime.checks).
    m = compare(ref, var)
    scale = m.reference_range
    return OutputMetrics(
        name=name,
        max_abs_error=m.max_abs_error,
        max_rel_error=m.max_abs_error / scale if scale > 0 else m.max_abs_error,
        cosine=m.cosine,
        top1=m.top1,
        reference_range=scale,
    )


def _open_with_samples(
    path: Path, arrays: Mapping[str, np.ndarray], source: str, limit: int | None
) -> tuple[Runner, Samples]:
    runner = open_runner(path)
    return runner, match_samples(runner.inputs, arrays, source, limit=limit)


def validate_variants(
    reference: Path, variants: Sequence[Path], samples: Path, *, limit: int | None = None
) -> ValidationReport:
    """Run the reference and each variant on the same samples and compare their outputs.

    Args:
        reference: The fp32 model (ONNX or TFLite).
        variants: Models derived from it (ONNX or TFLite; int8 and fp16 handled).
        samples: Sample data named after the model inputs (``.npz`` or directory).
        limit: Use at most this many samples.

    Raises:
        InputError: for files that are not models, or samples that do not fit a model.
        ConvertError: when a model fails to load or run.
    """
    arrays = load_samples(samples)
    runner, matched = _open_with_samples(reference, arrays, str(samples), limit)
    ref_outputs, ref_seconds = run_model(runner, matched)
    log.info("reference %s: %d samples, %.3f ms/sample", reference, matched.count,
             ref_seconds * 1e3)
    results = []
    for path in variants:
        var_runner, var_samples = _open_with_samples(path, arrays, str(samples), limit)
        outputs, seconds = run_model(var_runner, var_samples)
        results.append(ModelResult(
            str(path), model_format(path), path.stat().st_size, seconds * 1e3,
            compare_outputs(ref_outputs, outputs, str(path)),
        ))
    return ValidationReport(
        matched.count,
        ModelResult(str(reference), model_format(reference), reference.stat().st_size,
                    ref_seconds * 1e3),
        results,
    )


def derive_tolerances(
    report: ValidationReport, given: Tolerances
) -> tuple[Tolerances, dict[str, Tolerances]]:
    """Tolerances for the checks: what was given, else a margin over what was measured here.

    Each variant gets ``TOLERANCE_MARGIN`` times its own measured error (with a floor); the
    default, for variants not listed, is the loosest of them. Top-1 agreement is only checked
    when given, since a check has too few samples to measure it well.

    Returns:
        The default tolerances and the tolerances per variant file name.
    """
    per_variant = {}
    for result in report.variants:
        worst_abs = max((o.max_abs_error for o in result.outputs), default=0.0)
        scale = max((o.reference_range for o in result.outputs), default=1.0) or 1.0
        worst_cos = min((o.cosine for o in result.outputs), default=1.0)
        per_variant[Path(result.path).name] = Tolerances(
            max_abs_error=given.max_abs_error
            if given.max_abs_error is not None
            else max(TOLERANCE_MARGIN * worst_abs, TOLERANCE_FLOOR * scale),
            min_cosine=given.min_cosine
            if given.min_cosine is not None
            else 1.0 - max(TOLERANCE_MARGIN * (1.0 - worst_cos), COSINE_FLOOR),
            min_top1=given.min_top1,
        )
    values = list(per_variant.values())
    default = replace(
        given,
        max_abs_error=given.max_abs_error if given.max_abs_error is not None or not values
        else max(t.max_abs_error or 0.0 for t in values),
        min_cosine=given.min_cosine if given.min_cosine is not None or not values
        else min(t.min_cosine or 1.0 for t in values),
    )
    return default, per_variant


def write_checks(
    reference: Path,
    samples: Path,
    out: Path,
    *,
    count: int = 8,
    tolerances: Tolerances | None = None,
    variant_tolerances: Mapping[str, Tolerances] | None = None,
) -> tuple[Path, Path]:
    """Write the checks a hub bundle carries: sample inputs, reference outputs, tolerances.

    ``out`` (``.npz``) holds ``inputs/NAME`` and ``outputs/NAME`` arrays, each with a leading
    check axis; ``out`` with suffix ``.json`` names that file and holds the tolerances. The
    format is described in ``docs/converting.md``.

    Args:
        reference: The fp32 model whose outputs are the expected answers.
        samples: Sample data; the first ``count`` samples become the checks.
        out: The ``.npz`` file to write; the JSON file goes next to it.
        count: Number of check samples.
        tolerances: Default tolerances, for any variant.
        variant_tolerances: Tolerances per variant file name, overriding the default.

    Returns:
        The ``.npz`` and ``.json`` paths.

    Raises:
        InputError: for a bad reference, bad samples, or an ``out`` that is not ``.npz``.
    """
    if out.suffix != ".npz":
        raise InputError(f"{out}: the checks file must end in .npz (the JSON goes next to it)")
    if count < 1:
        raise InputError(f"--checks-count must be at least 1, not {count}")
    runner, matched = _open_with_samples(reference, load_samples(samples), str(samples), count)
    outputs, _ = run_model(runner, matched)
    arrays = {f"inputs/{plain_name(n)}": a for n, a in matched.arrays.items()}
    arrays |= {f"outputs/{plain_name(n)}": a for n, a in outputs.items()}
    meta = {
        "format": CHECKS_FORMAT,
        "version": CHECKS_VERSION,
        "samples_file": out.name,
        "count": matched.count,
        "reference": {"file": reference.name, "sha256": _sha256(reference)},
        "inputs": _tensor_list(matched.arrays),
        "outputs": _tensor_list(outputs),
        "tolerances": asdict(tolerances or Tolerances()),
        "variant_tolerances": {k: asdict(v) for k, v in (variant_tolerances or {}).items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy stubs mistype **kwds
    meta_path = out.with_suffix(".json")
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out, meta_path


def _tensor_list(arrays: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    return [{"name": plain_name(n), "dtype": str(a.dtype), "shape": list(a.shape[1:])}
            for n, a in arrays.items()]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def format_report(report: ValidationReport) -> str:
    """The human-readable table ``edgeconvert validate`` prints."""
    ref = report.reference
    lines = [
        f"reference {ref.path}: {_size(ref.size_bytes)}, {ref.latency_ms:.3f} ms/sample, "
        f"{report.samples} samples",
        f"{'variant':<32} {'output':<16} {'max abs':>10} {'max rel':>10} {'cosine':>10} "
        f"{'top-1':>7} {'size':>10} {'ms/sample':>10}",
    ]
    for v in report.variants:
        for out in v.outputs:
            top1 = "-" if out.top1 is None else f"{out.top1:.4f}"
            lines.append(
                f"{Path(v.path).name:<32} {out.name:<16} {out.max_abs_error:>10.4g} "
                f"{out.max_rel_error:>10.4g} {out.cosine:>10.6f} {top1:>7} "
                f"{_size(v.size_bytes):>10} {v.latency_ms:>10.3f}"
            )
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``validate`` subcommand."""
    parser = commands.add_parser(
        "validate", help="compare variants with the fp32 reference; write hub checks",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("reference", type=Path, help="the fp32 model (ONNX or TFLite)")
    parser.add_argument("variants", type=Path, nargs="*", metavar="VARIANT",
                        help="variants to compare with it")
    parser.add_argument("--samples", type=Path, required=True, metavar="FILE_OR_DIR",
                        help=".npz (arrays named after the inputs, samples first) or directory")
    parser.add_argument("--limit", type=int, metavar="N", help="use at most N samples")
    parser.add_argument("--max-error", type=float, metavar="X",
                        help="exit 1 when a variant's max abs error is over X")
    parser.add_argument("--min-top1", type=float, metavar="P",
                        help="exit 1 when a classifier's top-1 agreement is under P (0..1)")
    parser.add_argument("--min-cosine", type=float, metavar="C",
                        help="exit 1 when an output's mean cosine similarity is under C")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--write-checks", type=Path, metavar="OUT.npz",
                        help="also write hub checks (OUT.npz and OUT.json)")
    parser.add_argument("--checks-count", type=int, default=8, metavar="K",
                        help="samples in the checks (default 8)")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    if not args.variants and args.write_checks is None:
        raise InputError("nothing to do: name at least one VARIANT, or --write-checks")
    if args.write_checks is not None and args.write_checks.suffix != ".npz":
        raise InputError(f"{args.write_checks}: the checks file must end in .npz")
    given = Tolerances(args.max_error, args.min_cosine, args.min_top1)
    report = validate_variants(args.reference, args.variants, args.samples, limit=args.limit)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_report(report))
    failures = report.failures(given)
    for failure in failures:
        print(f"edgeconvert: {failure}", file=sys.stderr)
    if failures:
        # Checks of a release that failed its own validation would only mislead a box.
        raise ConvertError(f"{len(failures)} check(s) failed; the variants are not close enough"
                           + ("; no checks written" if args.write_checks else ""))
    if args.write_checks is not None:
        default, per_variant = derive_tolerances(report, given)
        npz, meta = write_checks(
            args.reference, args.samples, args.write_checks, count=args.checks_count,
            tolerances=default, variant_tolerances=per_variant,
        )
        print(f"wrote {npz} and {meta}", file=sys.stderr if args.json else sys.stdout)
    return 0
