"""Every bad input gets exit status 2 (or 1) and one clear ``edgeconvert: error:`` line."""

from __future__ import annotations

import sys
from pathlib import Path

import edgeconvert
import numpy as np
import onnx
import pytest
from edgeconvert.cli import main

from tests.converters import models


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.mlp(tmp_path_factory.mktemp("err") / "mlp.onnx")


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    if code:
        last = err.strip().splitlines()[-1]
        assert last.startswith("edgeconvert: error: ") or "usage:" in err, err
        assert "Traceback" not in err
    return code, err


def test_public_api_is_pinned() -> None:
    assert edgeconvert.__all__ == [
        "ConvertError", "InputError", "Tolerances", "ValidationReport", "convert_fp16",
        "convert_tflite", "derive_tolerances", "quantize_onnx", "validate_variants",
        "write_checks",
    ]


def test_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run([], capsys)[0] == 2
    assert run(["quantize"], capsys)[0] == 2
    assert run(["tflite", "x", "--out", "y", "--int8", "--fp16"], capsys)[0] == 2
    assert run(["--help"], capsys)[0] == 0


@pytest.mark.parametrize("content", [b"", b"hello, not a model", b"\x08\x07garbage-protobuf"])
def test_not_a_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes, mlp: Path
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    code, err = run(["quantize", str(bad), "--out", str(tmp_path / "o.onnx")], capsys)
    assert code == 2
    assert "not a valid ONNX model" in err
    other = tmp_path / "bad.bin"
    other.write_bytes(content + b"\x00" * 8)
    code, err = run(["validate", str(mlp), str(other), "--samples", "x.npz"], capsys)
    assert code == 2


def test_tflite_file_given_to_onnx_commands(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fake = tmp_path / "model.tflite"
    fake.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 64)
    for command in ("quantize", "fp16"):
        code, err = run([command, str(fake), "--out", str(tmp_path / "o.onnx")], capsys)
        assert code == 2
        assert "is a TFLite model" in err
        assert "edgeconvert tflite" in err


def test_missing_files(capsys: pytest.CaptureFixture[str], tmp_path: Path, mlp: Path) -> None:
    code, err = run(["fp16", str(tmp_path / "none.onnx"), "--out", "o.onnx"], capsys)
    assert (code, "no such model file" in err) == (2, True)
    code, err = run(["quantize", str(mlp), "--out", str(tmp_path / "o.onnx"),
                     "--calibration", str(tmp_path / "none.npz")], capsys)
    assert (code, "no such sample file" in err) == (2, True)


def test_calibration_that_does_not_fit(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, mlp: Path
) -> None:
    out = str(tmp_path / "o.onnx")
    cases = {
        "names": ({"x": np.zeros((4, 64)), "y": np.zeros((4, 3))}, "no data for model input"),
        "shape": ({"input": np.zeros((4, 63), np.float32)}, "have shape [4, 63]"),
        "dtype": ({"input": np.zeros((4, 64), np.int32)}, "are int32 but the model wants float32"),
        "counts": ({"input": np.zeros((4, 64)), "other": np.zeros((3, 1))}, "same leading"),
    }
    for name, (arrays, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)  # type: ignore[arg-type]
        code, err = run(["quantize", mlp.as_posix(), "--out", out, "--calibration", str(path)],
                        capsys)
        assert code == 2, name
        assert message in err, (name, err)
    # A directory whose samples disagree with each other.
    d = tmp_path / "dir"
    d.mkdir()
    np.save(d / "a.npy", np.zeros(64, np.float32))
    np.save(d / "b.npy", np.zeros(32, np.float32))
    code, err = run(["quantize", str(mlp), "--out", out, "--calibration", str(d)], capsys)
    assert (code, "same names and shapes" in err) == (2, True)
    (tmp_path / "empty").mkdir()
    code, err = run(["quantize", str(mlp), "--out", out, "--calibration",
                     str(tmp_path / "empty")], capsys)
    assert (code, "no .npy or .npz sample files" in err) == (2, True)


def test_opset_too_old_and_qdq_without_calibration(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, mlp: Path
) -> None:
    model = onnx.load(str(mlp))
    model.opset_import[0].version = 9
    old = tmp_path / "old.onnx"
    onnx.save_model(model, str(old))
    code, err = run(["quantize", str(old), "--out", str(tmp_path / "o.onnx")], capsys)
    assert code == 2
    assert "opset 9" in err
    assert "version_converter" in err
    code, err = run(["quantize", str(mlp), "--out", str(tmp_path / "o.onnx"), "--format", "qdq"],
                    capsys)
    assert (code, "needs static quantisation" in err) == (2, True)


def test_validate_bad_usage(capsys: pytest.CaptureFixture[str], tmp_path: Path, mlp: Path) -> None:
    samples = tmp_path / "s.npz"
    np.savez(samples, input=np.zeros((3, 64), np.float32))
    code, err = run(["validate", str(mlp), "--samples", str(samples)], capsys)
    assert (code, "nothing to do" in err) == (2, True)
    code, err = run(["validate", str(mlp), "--samples", str(samples), "--write-checks", "c.json"],
                    capsys)
    assert (code, "must end in .npz" in err) == (2, True)
    cnn = models.cnn(tmp_path / "cnn.onnx")
    code, err = run(["validate", str(mlp), str(cnn), "--samples", str(samples)], capsys)
    assert (code, "wants input[?, 3, 32, 32]" in err) == (2, True)


def test_tflite_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, mlp: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, err = run(["tflite", str(mlp), "--out", str(tmp_path / "m.tflite")], capsys)
    assert (code, "not a SavedModel directory" in err) == (2, True)
    keras_file = tmp_path / "m.keras"
    keras_file.write_bytes(b"zip")
    code, err = run(["tflite", str(keras_file), "--out", "m.tflite", "--int8"], capsys)
    assert (code, "needs a representative dataset" in err) == (2, True)
    # A box without TensorFlow: the import fails as it would there.
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    code, err = run(["tflite", str(keras_file), "--out", str(tmp_path / "m.tflite")], capsys)
    assert code == 1
    assert "needs TensorFlow" in err
    assert "edgeagent[convert]" in err
