"""bundle.json validation: every bad field is refused with its name."""

from __future__ import annotations

from typing import Any

import pytest

from edgeagent.errors import VerificationError
from edgeagent.hub.bundle import parse_bundle

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
