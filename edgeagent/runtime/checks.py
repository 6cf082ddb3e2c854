"""Bundle checks: sample inputs, the outputs a model must give for them, and tolerances.

A box runs a new version's checks before it activates it (DESIGN 3.4). The checks are written
on the build side (``edgeconvert validate --write-checks``) with the reference model's tensor
names, without LiteRT's decorations; the variant a box runs may name its tensors otherwise
(``serving_default_features:0``) and take other input types (fp16, int8 with a scale and zero
point). :func:`run_checks` matches the names (:func:`pair_names`, the same rules as
``edgeconvert validate``), casts or quantises each input to the variant's type, dequantises its
outputs, and compares them with the expected ones using the metrics of
``docs/converting.md`` (:func:`compare`, which ``edgeconvert validate`` uses as well):

* ``max_abs_error``: max |output - expected| over all checks and elements;
* ``min_cosine``: mean over checks of the cosine similarity of the flattened outputs;
* ``min_top1``: classifier outputs (``[batch, classes]``) only, the share of checks whose
  arg-max class agrees;
* ``atol``/``rtol``: ``np.allclose`` on each check, for bundles that carry only those.

This module is shared with the build side (``edgeconvert`` imports it); it imports nothing
from ``converters/``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgeagent.errors import EdgeAgentError, ModelError
from edgeagent.runtime.base import LoadedModel, TensorSpec
from edgeagent.runtime.datatypes import DATATYPE_TO_NUMPY

#: LiteRT names its tensors after the signature (``serving_default_input:0``); checks and
#: samples are named after the model's own tensors (``input``).
_LITERT_NAME = re.compile(r"^(?:serving_default_)?(?P<name>.*?)(?::\d+)?$")


def plain_name(name: str) -> str:
    """A tensor name without LiteRT's signature decorations (``serving_default_x:0`` -> ``x``)."""
    match = _LITERT_NAME.match(name)
    return match.group("name") if match else name


class TensorNameError(ValueError):
    """A check names a tensor the model does not have (and position cannot pair them)."""

    def __init__(self, name: str, available: Sequence[str]) -> None:
        self.name = name
        self.available = tuple(available)
        super().__init__(f"{name!r} matches none of {', '.join(map(repr, available)) or '(none)'}")


def pair_names(wanted: Sequence[str], available: Sequence[str], *,
               by_position: bool) -> dict[str, str]:
    """Pair the names a check uses with a model's real tensor names.

    Every wanted name matches its exact name, else the one tensor with the same
    :func:`plain_name`. When some name matches nothing and ``by_position`` is set and the counts
    are equal, they pair by position instead (``edgeconvert validate`` pairs outputs so: a TFLite
    model names them after the graph, ``StatefulPartitionedCall:0``); a single input always pairs
    with a single-input model.

    Returns:
        wanted name -> available name.

    Raises:
        TensorNameError: naming the first wanted name that pairs with nothing.
    """
    by_plain: dict[str, list[str]] = {}
    for name in available:
        by_plain.setdefault(plain_name(name), []).append(name)
    pairs: dict[str, str] = {}
    missing = ""
    for name in wanted:
        same = by_plain.get(plain_name(name), [])
        if name in available:
            pairs[name] = name
        elif len(same) == 1:
            pairs[name] = same[0]
        elif not missing:
            missing = name
    if not missing:
        return pairs
    if len(wanted) == len(available) and (by_position or len(wanted) == 1):
        return dict(zip(wanted, available, strict=True))
    raise TensorNameError(missing, available)


@dataclass(frozen=True)
class Tolerances:
    """Limits an output must stay within over the checks; ``None`` means not checked."""

    max_abs_error: float | None = None
    min_cosine: float | None = None
    min_top1: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {"max_abs_error": self.max_abs_error, "min_cosine": self.min_cosine,
                "min_top1": self.min_top1}


@dataclass(frozen=True)
class ModelCheck:
    """A sample input and the output a model must give for it (bundle checks, DESIGN 3.4).

    ``atol``/``rtol`` compare each check on its own with ``np.allclose`` (set both to ``None``
    to skip); ``max_abs_error``, ``min_cosine`` and ``min_top1`` are measured over all the checks
    given together with the same limits (the definitions in the module docstring).
    """

    inputs: Mapping[str, np.ndarray]
    expected: Mapping[str, np.ndarray]
    atol: float | None = 1e-3
    rtol: float | None = 1e-3
    max_abs_error: float | None = None
    min_cosine: float | None = None
    min_top1: float | None = None

    @property
    def tolerances(self) -> Tolerances:
        return Tolerances(self.max_abs_error, self.min_cosine, self.min_top1)


@dataclass(frozen=True)
class Metrics:
    """How stacked outputs (a leading sample axis) compare with the expected ones."""

    max_abs_error: float
    cosine: float
    top1: float | None
    reference_range: float
    """max |expected|."""
    worst_abs: int
    """The sample with the largest absolute error."""
    worst_cosine: int
    """The sample with the lowest cosine similarity."""


def compare(expected: np.ndarray, got: np.ndarray) -> Metrics:
    """The metrics of ``docs/converting.md`` for outputs stacked on a leading sample axis.

    Both arrays have the same shape ``[N, *output shape]``; they are compared in float64.
    """
    ref = np.asarray(expected, np.float64)
    var = np.asarray(got, np.float64)
    n = len(ref)
    if ref.size == 0:
        return Metrics(0.0, 1.0, None, 0.0, 0, 0)
    err = np.abs(var - ref).reshape(n, -1)
    flat_ref = ref.reshape(n, -1)
    flat_var = var.reshape(n, -1)
    ref_norm = np.linalg.norm(flat_ref, axis=1)
    var_norm = np.linalg.norm(flat_var, axis=1)
    norms = ref_norm * var_norm
    dots = np.sum(flat_ref * flat_var, axis=1)
    # Two all-zero outputs are identical; one zero output against a non-zero one is not.
    both_zero = (ref_norm == 0) & (var_norm == 0)
    cosines = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), both_zero * 1.0)
    # A classifier output is [batch, classes] per sample: stacked, [N, batch, classes].
    top1 = None
    if ref.ndim == 3 and ref.shape[-1] >= 2:
        top1 = float(np.mean(np.argmax(ref, axis=-1) == np.argmax(var, axis=-1)))
    per_sample = np.max(err, axis=1)
    return Metrics(
        max_abs_error=float(np.max(per_sample)),
        cosine=float(np.mean(cosines)),
        top1=top1,
        reference_range=float(np.max(np.abs(ref))),
        worst_abs=int(np.argmax(per_sample)),
        worst_cosine=int(np.argmin(cosines)),
    )


def _spec_dtype(spec: TensorSpec) -> np.dtype[np.generic]:
    return DATATYPE_TO_NUMPY[spec.datatype]


def _broadcast(values: tuple[float, ...] | tuple[int, ...], axis: int, ndim: int) -> np.ndarray:
    """Per-tensor (one value) or per-channel quantisation parameters, shaped to broadcast."""
    arr = np.asarray(values, np.float64)
    if arr.size == 1 or ndim == 0:
        return arr.reshape(())
    shape = [1] * ndim
    shape[axis] = arr.size
    return arr.reshape(shape)


def to_model_input(spec: TensorSpec, value: np.ndarray) -> np.ndarray:
    """A check's input as the model takes it.

    Floats are cast to the model's float type (fp16); a quantised integer input (int8/uint8
    TFLite) gets ``round(x / scale) + zero_point``, clipped to its range; anything else is left
    for :meth:`LoadedModel.validate` to accept or refuse.
    """
    if spec.datatype == "BYTES":
        return value
    dtype = _spec_dtype(spec)
    q = spec.quantization
    if q is not None and dtype.kind in "iu" and value.dtype.kind == "f":
        scale = _broadcast(q.scale, q.axis, value.ndim)
        zero = _broadcast(q.zero_point, q.axis, value.ndim)
        info = np.iinfo(dtype)  # type: ignore[type-var]  # an integer dtype, checked above
        quantised = np.round(value.astype(np.float64) / scale) + zero
        return np.asarray(np.clip(quantised, info.min, info.max).astype(dtype))
    same_family = value.dtype.kind == dtype.kind or (value.dtype.kind in "iu"
                                                     and dtype.kind in "iu")
    if value.dtype != dtype and same_family:
        return value.astype(dtype)
    return value


def from_model_output(spec: TensorSpec, value: np.ndarray) -> np.ndarray:
    """A model's output as real numbers (float64): quantised integers are dequantised."""
    q = spec.quantization
    if q is not None and value.dtype.kind in "iu":
        scale = _broadcast(q.scale, q.axis, value.ndim)
        zero = _broadcast(q.zero_point, q.axis, value.ndim)
        return np.asarray((value.astype(np.float64) - zero) * scale)
    return np.asarray(value, np.float64)


def _span(indices: Sequence[int]) -> str:
    if len(indices) == 1:
        return f"check {indices[0]}"
    if list(indices) == list(range(indices[0], indices[-1] + 1)):
        return f"checks {indices[0]}-{indices[-1]}"
    return f"checks {', '.join(map(str, indices))}"


def _limits(t: Tolerances, name: str, m: Metrics, indices: Sequence[int]) -> None:
    if t.max_abs_error is not None and not m.max_abs_error <= t.max_abs_error:
        raise ModelError(
            f"check {indices[m.worst_abs]}: output {name!r}: max_abs_error "
            f"{m.max_abs_error:.4g} > limit {t.max_abs_error:.4g}"
        )
    if t.min_cosine is not None and not m.cosine >= t.min_cosine:
        raise ModelError(
            f"{_span(indices)}: output {name!r}: min_cosine: mean cosine similarity "
            f"{m.cosine:.6f} < limit {t.min_cosine:.6f} (lowest: check "
            f"{indices[m.worst_cosine]})"
        )
    if t.min_top1 is not None and m.top1 is not None and not m.top1 >= t.min_top1:
        raise ModelError(
            f"{_span(indices)}: output {name!r}: min_top1: top-1 agreement {m.top1:.4f} "
            f"< limit {t.min_top1:.4f}"
        )


def _fix_names(model: LoadedModel, check: ModelCheck) -> tuple[dict[str, str], dict[str, str]]:
    try:
        inputs = pair_names(list(check.inputs), [s.name for s in model.inputs],
                            by_position=False)
    except TensorNameError as exc:
        raise ModelError(f"input {exc.name!r} matches no input of the model (it takes "
                         f"{', '.join(exc.available)})") from exc
    try:
        outputs = pair_names(list(check.expected), [s.name for s in model.outputs],
                             by_position=True)
    except TensorNameError as exc:
        raise ModelError(f"output {exc.name!r} matches no output of the model (it gives "
                         f"{', '.join(exc.available)})") from exc
    return inputs, outputs


def run_checks(model: LoadedModel, checks: Sequence[ModelCheck]) -> None:
    """Run a bundle's checks on a loaded model.

    Raises:
        ModelError: naming the check, the output, the metric, its value and the limit of the
            first one out of tolerance (or the check that does not fit the model).
    """
    in_specs = {s.name: s for s in model.inputs}
    out_specs = {s.name: s for s in model.outputs}
    # Outputs per tolerance group: (limits) -> check name -> (check indices, expected, got).
    groups: dict[Tolerances, dict[str, tuple[list[int], list[np.ndarray], list[np.ndarray]]]]
    groups = {}
    names: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[dict[str, str], dict[str, str]]]
    names = {}
    for i, check in enumerate(checks):
        key = (tuple(check.inputs), tuple(check.expected))
        if key not in names:
            try:
                names[key] = _fix_names(model, check)
            except ModelError as exc:
                raise ModelError(f"check {i}: {exc}") from exc
        in_names, out_names = names[key]
        try:
            feed = model.validate({real: to_model_input(in_specs[real], check.inputs[name])
                                   for name, real in in_names.items()})
            got = model.run(feed, list(out_names.values()))
        except EdgeAgentError as exc:
            raise ModelError(f"check {i}: {exc}") from exc
        for name, want in check.expected.items():
            real = out_names[name]
            have = from_model_output(out_specs[real], got[real])
            if have.shape != want.shape:
                raise ModelError(
                    f"check {i}: output {name!r} has shape {list(have.shape)}, "
                    f"expected {list(want.shape)}"
                )
            b = want.astype(np.float64)
            if check.atol is not None or check.rtol is not None:
                atol, rtol = check.atol or 0.0, check.rtol or 0.0
                if not np.allclose(have, b, atol=atol, rtol=rtol):
                    err = float(np.max(np.abs(have - b)))
                    raise ModelError(
                        f"check {i}: output {name!r} is off by up to {err:.3g} "
                        f"(limit atol={atol:g}, rtol={rtol:g})"
                    )
            entry = groups.setdefault(check.tolerances, {}).setdefault(name, ([], [], []))
            entry[0].append(i)
            entry[1].append(b)
            entry[2].append(have)
    for limits, outputs in groups.items():
        if limits == Tolerances():
            continue
        for name, (indices, wanted, had) in outputs.items():
            _limits(limits, name, compare(np.stack(wanted), np.stack(had)), indices)
