"""bundle.json validation: every bad field is refused with its name."""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import pytest

from edgeagent.errors import VerificationError
from edgeagent.hub.bundle import parse_bundle, read_checks
from edgeagent.runtime.checks import Tolerances

SHA = "a" * 64


def _bundle(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": 1, "name": "m", "version": 2, "inputs": [{"name": "x"}], "outputs": [],
        "variants": [{"file": "m.onnx", "size": 3, "sha256": SHA, "format": "onnx",
                      "precision": "fp32", "needs": {"arch": ["aarch64"]}}],
        "checks": {"file": "checks.npz", "size": 1, "sha256": SHA, "atol": 0.1, "rtol": 0},
    }
    doc.update(over)
    return doc


def test_a_good_bundle_round_trips() -> None:
    bundle = parse_bundle(_bundle(), "m", 2)
    assert bundle.variants[0].needs == {"arch": ("aarch64",)}
    assert parse_bundle(bundle.to_dict()) == bundle


@pytest.mark.parametrize(("over", "where"), [
    ({"schema": 9}, "schema"),
    ({"name": "other"}, "name"),
    ({"version": 3}, "version"),
    ({"version": True}, "version"),
    ({"variants": []}, "variants"),
    ({"variants": [{"file": "../1/m.onnx", "size": 3, "sha256": SHA, "format": "onnx",
                    "precision": "fp32"}]}, "variants[0].file"),
    ({"variants": [{"file": "m.onnx", "size": 3, "sha256": "xyz", "format": "onnx",
                    "precision": "fp32"}]}, "variants[0].sha256"),
    ({"variants": [{"file": "m.onnx", "size": 3, "sha256": SHA, "format": "tflite",
                    "precision": "fp32"}]}, "variants[0].file"),
    ({"variants": [{"file": "m.onnx", "size": 3, "sha256": SHA, "format": "onnx",
                    "precision": "fp64"}]}, "variants[0].precision"),
    ({"variants": [{"file": "m.onnx", "size": 3, "sha256": SHA, "format": "onnx",
                    "precision": "fp32", "needs": {"gpu": ["x"]}}]}, "variants[0].needs"),
    ({"checks": {"file": "c.txt", "size": 1, "sha256": SHA, "atol": 0, "rtol": 0}},
     "checks.file"),
    ({"inputs": "x"}, "inputs"),
])
def test_bad_fields_are_named(over: dict[str, Any], where: str) -> None:
    pattern = where.replace("[", ".").replace("]", ".")
    with pytest.raises(VerificationError, match=f"bundle.json: {pattern}"):
        parse_bundle(_bundle(**over), "m", 2)


# ---- checks: tolerances and variant_tolerances ----------------------------------------

_TOL = {"max_abs_error": 0.5, "min_cosine": 0.99, "min_top1": None}


def _checks(**over: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"file": "checks.npz", "size": 1, "sha256": SHA,
                             "tolerances": dict(_TOL),
                             "variant_tolerances": {"m.onnx": {"max_abs_error": 0.01,
                                                               "min_cosine": None,
                                                               "min_top1": 0.9}}}
    entry.update(over)
    return {k: v for k, v in entry.items() if v != "DROP"}


def test_tolerances_round_trip_and_atol_rtol_become_optional() -> None:
    bundle = parse_bundle(_bundle(checks=_checks()), "m", 2)
    assert bundle.checks is not None
    assert (bundle.checks.atol, bundle.checks.rtol) == (None, None)
    assert bundle.checks.tolerances == Tolerances(0.5, 0.99, None)
    assert bundle.checks.for_variant("m.onnx") == Tolerances(0.01, None, 0.9)
    assert bundle.checks.for_variant("other.onnx") == Tolerances(0.5, 0.99, None)
    assert parse_bundle(bundle.to_dict()) == bundle


def test_an_old_bundle_with_atol_and_rtol_only_still_parses() -> None:
    bundle = parse_bundle(_bundle(), "m", 2)
    assert bundle.checks is not None
    assert (bundle.checks.atol, bundle.checks.rtol) == (0.1, 0.0)
    assert bundle.checks.for_variant("m.onnx") is None
    assert "tolerances" not in bundle.to_dict()["checks"]


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy stubs mistype **kwds
    return buffer.getvalue()


def test_read_checks_gives_the_variant_its_tolerances() -> None:
    data = _npz(**{"inputs/x": np.zeros((3, 1, 2), np.float32),
                   "outputs/y": np.ones((3, 1, 2), np.float32)})
    new = parse_bundle(_bundle(checks=_checks()), "m", 2).checks
    old = parse_bundle(_bundle(), "m", 2).checks
    assert new is not None and old is not None
    mine = read_checks(data, new, "m.onnx")
    assert len(mine) == 3
    assert (mine[0].atol, mine[0].rtol) == (None, None)
    assert mine[0].tolerances == Tolerances(0.01, None, 0.9)
    assert read_checks(data, new, "x.onnx")[0].tolerances == Tolerances(0.5, 0.99, None)
    assert read_checks(data, new)[0].tolerances == Tolerances(0.5, 0.99, None)
    legacy = read_checks(data, old, "m.onnx")[0]
    assert (legacy.atol, legacy.rtol, legacy.tolerances) == (0.1, 0.0, Tolerances())


@pytest.mark.parametrize("data", [
    b"not a zip",
    _npz(**{"inputs/x": np.zeros((2, 1))}),
    _npz(**{"inputs/x": np.zeros((2, 1)), "outputs/y": np.zeros((3, 1))}),
    _npz(**{"inputs/x": np.zeros((0, 1)), "outputs/y": np.zeros((0, 1))}),
    _npz(**{"inputs/x": np.float32(1), "outputs/y": np.zeros((1, 1))}),
])
def test_a_bad_checks_file_is_refused(data: bytes) -> None:
    ref = parse_bundle(_bundle(), "m", 2).checks
    assert ref is not None
    with pytest.raises(VerificationError, match=r"checks file checks\.npz"):
        read_checks(data, ref, "m.onnx")


@pytest.mark.parametrize(("over", "where"), [
    ({"tolerances": "tight"}, "checks.tolerances"),
    ({"tolerances": [0.1]}, "checks.tolerances"),
    ({"tolerances": {"max_abs_error": 0.1, "atol": 0.1}}, "checks.tolerances.atol"),
    ({"tolerances": {"max_abs_error": -0.1}}, "checks.tolerances.max_abs_error"),
    ({"tolerances": {"max_abs_error": float("nan")}}, "checks.tolerances.max_abs_error"),
    ({"tolerances": {"max_abs_error": float("inf")}}, "checks.tolerances.max_abs_error"),
    ({"tolerances": {"max_abs_error": "0.1"}}, "checks.tolerances.max_abs_error"),
    ({"tolerances": {"max_abs_error": True}}, "checks.tolerances.max_abs_error"),
    ({"tolerances": {"min_cosine": 1.5}}, "checks.tolerances.min_cosine"),
    ({"tolerances": {"min_cosine": -2}}, "checks.tolerances.min_cosine"),
    ({"tolerances": {"min_top1": 1.01}}, "checks.tolerances.min_top1"),
    ({"tolerances": {"min_top1": -0.5}}, "checks.tolerances.min_top1"),
    ({"variant_tolerances": ["m.onnx"]}, "checks.variant_tolerances"),
    ({"variant_tolerances": {"gone.onnx": dict(_TOL)}}, "checks.variant_tolerances['gone.onnx']"),
    ({"variant_tolerances": {"m.onnx": None}}, "checks.variant_tolerances['m.onnx']"),
    ({"variant_tolerances": {"m.onnx": {"min_top1": 2}}},
     "checks.variant_tolerances['m.onnx'].min_top1"),
    ({"variant_tolerances": {"m.onnx": {"max": 2}}}, "checks.variant_tolerances['m.onnx'].max"),
    # Without default tolerances, atol and rtol are the default: both needed, as before.
    ({"tolerances": "DROP"}, "checks.atol"),
    ({"tolerances": None, "variant_tolerances": None}, "checks.atol"),
    ({"tolerances": "DROP", "atol": 0.1}, "checks.rtol"),
    ({"atol": 0.1}, "checks.rtol"),
    ({"atol": -1, "rtol": 0}, "checks.atol"),
    ({"atol": "x", "rtol": 0}, "checks.atol"),
    ({"atol": 0, "rtol": float("nan")}, "checks.rtol"),
])
def test_bad_tolerance_fields_are_named(over: dict[str, Any], where: str) -> None:
    pattern = re.escape(f"bundle.json: {where}")
    with pytest.raises(VerificationError, match=pattern):
        parse_bundle(_bundle(checks=_checks(**over)), "m", 2)
