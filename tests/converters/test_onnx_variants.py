"""int8 and fp16 ONNX variants of real models, validated against fp32 through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from edgeconvert import Tolerances, convert_fp16, quantize_onnx, validate_variants
from edgeconvert.cli import main

from tests.converters import models

#: (input shape without batch, samples) per model; a few hundred samples, as calibration wants.
MODELS = {"mlp": ((64,), 300), "cnn": ((3, 32, 32), 200)}
#: Per variant: quantize/fp16 arguments, and the minimum top-1 agreement with fp32.
VARIANTS = {
    "dynamic": (["quantize"], 0.9),
    "static-qdq": (["quantize", "--calibration", "{samples}", "--format", "qdq"], 0.9),
    "static-qoperator": (["quantize", "--calibration", "{samples}", "--format", "qoperator"], 0.9),
    "per-channel": (["quantize", "--calibration", "{samples}", "--per-channel"], 0.9),
    "fp16": (["fp16"], 0.99),
    "fp16-keep-io": (["fp16", "--keep-io-types"], 0.99),
}


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Each model and its well-separated sample set (.npz named after the input)."""
    d = tmp_path_factory.mktemp("fp32")
    built = {}
    for name, (shape, count) in MODELS.items():
        path = getattr(models, name)(d / f"{name}.onnx")
        samples = d / f"{name}.npz"
        np.savez(samples, input=models.separated_samples(models.onnx_logits(path), shape, count))
        built[name] = (path, samples)
    return built


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model", MODELS)
def test_variant_agrees_with_fp32(
    fp32: dict[str, tuple[Path, Path]], tmp_path: Path, model: str, variant: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    reference, samples = fp32[model]
    command, min_top1 = VARIANTS[variant]
    out = tmp_path / f"{model}.{variant}.onnx"
    args = [a.format(samples=samples) for a in command]
    assert main([*args, str(reference), "--out", str(out)]) == 0
    onnx.checker.check_model(onnx.load(str(out)))
    assert capsys.readouterr().out == f"wrote {out}\n"

    code = main(["validate", str(reference), str(out), "--samples", str(samples),
                 "--min-top1", str(min_top1), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    (metrics,) = report["variants"][0]["outputs"]
    assert metrics["top1"] >= min_top1
    assert metrics["cosine"] >= (0.99 if min_top1 < 0.99 else 0.9999)
    assert report["samples"] == MODELS[model][1]


def test_variants_are_what_they_claim(fp32: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    reference, samples = fp32["cnn"]
    qdq = quantize_onnx(reference, tmp_path / "qdq.onnx", calibration=samples, per_channel=True)
    qop = quantize_onnx(reference, tmp_path / "qop.onnx", calibration=samples,
                        quant_format="qoperator")
    dyn = quantize_onnx(reference, tmp_path / "dyn.onnx")
    half = convert_fp16(reference, tmp_path / "half.onnx")
    kept = convert_fp16(reference, tmp_path / "kept.onnx", keep_io_types=True)

    def ops(path: Path) -> set[str]:
        return {n.op_type for n in onnx.load(str(path)).graph.node}

    assert {"QuantizeLinear", "DequantizeLinear"} <= ops(qdq)
    assert "QLinearConv" in ops(qop)
    assert "ConvInteger" in ops(dyn) or "DynamicQuantizeLinear" in ops(dyn)
    fp16 = onnx.TensorProto.FLOAT16
    assert onnx.load(str(half)).graph.input[0].type.tensor_type.elem_type == fp16
    assert onnx.load(str(kept)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # fp16 without kept I/O types takes fp16 input; validate casts the samples for it.
    report = validate_variants(reference, [half, kept], samples)
    assert all(o.top1 == 1.0 for v in report.variants for o in v.outputs)


def test_broken_variant_fails_max_error(
    fp32: dict[str, tuple[Path, Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference, samples = fp32["mlp"]
    good = quantize_onnx(reference, tmp_path / "good.onnx", calibration=samples)
    broken = models.broken_copy(reference, tmp_path / "broken.onnx")
    code = main(["validate", str(reference), str(good), str(broken), "--samples", str(samples),
                 "--max-error", "1.0", "--write-checks", str(tmp_path / "checks.npz")])
    captured = capsys.readouterr()
    assert code == 1
    assert "broken.onnx: output 'logits' max abs error" in captured.err
    assert "good.onnx" not in captured.err
    assert "no checks written" in captured.err
    assert not (tmp_path / "checks.npz").exists()
    # The table names both, with the broken one's top-1 agreement far off.
    report = validate_variants(reference, [broken], samples)
    assert report.variants[0].outputs[0].top1 is not None
    assert report.variants[0].outputs[0].top1 < 0.5
    assert report.failures(Tolerances(min_top1=0.9))


def test_write_checks_format(fp32: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    reference, samples = fp32["cnn"]
    int8 = quantize_onnx(reference, tmp_path / "cnn.int8.onnx", calibration=samples)
    checks = tmp_path / "bundle" / "checks.npz"
    assert main(["validate", str(reference), str(int8), "--samples", str(samples),
                 "--write-checks", str(checks), "--checks-count", "5"]) == 0
    meta = json.loads(checks.with_suffix(".json").read_text())
    assert meta["format"] == "edgeconvert.checks"
    assert meta["version"] == 1
    assert meta["samples_file"] == "checks.npz"
    assert meta["count"] == 5
    assert meta["reference"]["file"] == "cnn.onnx"
    assert meta["inputs"] == [{"name": "input", "dtype": "float32", "shape": [1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "logits", "dtype": "float32", "shape": [1, 10]}]
    tolerance = meta["variant_tolerances"]["cnn.int8.onnx"]
    assert 0 < tolerance["max_abs_error"] <= meta["tolerances"]["max_abs_error"]
    assert 0 < tolerance["min_cosine"] < 1
    with np.load(checks) as data:
        assert sorted(data.files) == ["inputs/input", "outputs/logits"]
        inputs, expected = data["inputs/input"], data["outputs/logits"]
    assert inputs.shape == (5, 1, 3, 32, 32)
    # The expected outputs are the reference's; the int8 variant meets its own tolerance.
    ref_run, var_run = models.onnx_logits(reference), models.onnx_logits(int8)
    for x, want in zip(inputs, expected, strict=True):
        np.testing.assert_allclose(ref_run(x), want, rtol=1e-5, atol=1e-5)
        assert np.max(np.abs(var_run(x) - want)) <= tolerance["max_abs_error"]


def test_text_report_and_calibration_directory(
    fp32: dict[str, tuple[Path, Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference, samples = fp32["mlp"]
    # A directory of .npy files, one sample each, is calibration data too.
    calib = tmp_path / "calib"
    calib.mkdir()
    with np.load(samples) as data:
        for i, x in enumerate(data["input"][:100]):
            np.save(calib / f"{i:04d}.npy", x)
    out = tmp_path / "mlp.int8.onnx"
    assert main(["quantize", str(reference), "--out", str(out), "--calibration", str(calib)]) == 0
    assert main(["validate", str(reference), str(out), "--samples", str(calib)]) == 0
    table = capsys.readouterr().out
    assert "100 samples" in table
    assert all(word in table for word in ("mlp.int8.onnx", "logits", "ms/sample"))


def test_console_entry_point(fp32: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    reference, _ = fp32["mlp"]
    out = tmp_path / "mlp.fp16.onnx"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(
        [sys.executable, "-m", "edgeconvert", "fp16", str(reference), "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert out.is_file()
    done = subprocess.run(
        [sys.executable, "-m", "edgeconvert", "quantize", str(tmp_path / "missing.onnx"),
         "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("edgeconvert: error: ")
    assert "Traceback" not in done.stderr


def loaded_precision(path: Path) -> str:
    """Load a variant through the agent's model manager and return the precision it reports."""
    import asyncio

    from edgeagent.device.plan import ProviderPlan
    from edgeagent.runtime.manager import ModelManager, ModelSource
    from edgeagent.runtime.registry import BackendRegistry

    async def load() -> str:
        manager = ModelManager(BackendRegistry(),
                               lambda f, p, s, o: ProviderPlan(f, p, (), threads=1))
        try:
            mv = await manager.load("variant", ModelSource(path))
            return mv.precision
        finally:
            await manager.close()

    return asyncio.run(load())


def test_variants_run_in_the_agent_with_their_precision(
        fp32: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    reference, samples = fp32["cnn"]
    variants = {
        "fp32": reference,
        "int8": quantize_onnx(reference, tmp_path / "dyn.onnx"),
        "int8-qdq": quantize_onnx(reference, tmp_path / "qdq.onnx", calibration=samples,
                                  quant_format="qdq"),
        "fp16": convert_fp16(reference, tmp_path / "fp16.onnx"),
        "fp16-io32": convert_fp16(reference, tmp_path / "fp16io.onnx", keep_io_types=True),
    }
    for label, path in variants.items():
        assert loaded_precision(path) == label.split("-")[0], label
