"""TFLite fp32/fp16/int8 from a Keras model, validated with LiteRT (needs TensorFlow: slow)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

from edgeconvert.cli import main  # noqa: E402

from tests.converters import models  # noqa: E402

# Keras 3 saving a model under NumPy 2 warns from inside Keras; nothing of ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A Keras MLP 64 -> 32 -> 10 (deterministic weights), saved as .keras and SavedModel."""
    import keras

    d = tmp_path_factory.mktemp("keras")
    inputs = keras.Input((64,), name="input")
    hidden = keras.layers.Dense(32, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(hidden))
    rng = np.random.default_rng(3)
    model.set_weights([
        (rng.standard_normal(w.shape) / np.sqrt(w.shape[0] if w.ndim == 2 else 10)).astype(
            np.float32) for w in model.get_weights()
    ])
    model.save(d / "mlp.keras")
    model.export(str(d / "saved_model"), format="tf_saved_model", verbose=False)
    samples = d / "samples.npz"
    np.savez(samples, input=models.separated_samples(
        lambda x: np.asarray(model(x, training=False)), (64,), 300))
    return d / "mlp.keras", d / "saved_model", samples


def test_keras_to_tflite_variants(
    keras_model: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keras_file, saved_model, samples = keras_model
    fp32, fp16, int8 = (tmp_path / f"mlp.{p}.tflite" for p in ("fp32", "fp16", "int8"))
    assert main(["tflite", str(keras_file), "--out", str(fp32)]) == 0
    assert main(["tflite", str(saved_model), "--out", str(fp16), "--fp16"]) == 0
    assert main(["tflite", str(keras_file), "--out", str(int8), "--int8",
                 "--calibration", str(samples)]) == 0
    capsys.readouterr()

    from ai_edge_litert.interpreter import Interpreter

    detail = Interpreter(model_path=str(int8)).get_input_details()[0]
    assert detail["dtype"] == np.int8  # full integer: Edge TPU and ARM integer kernels
    assert int8.stat().st_size < fp16.stat().st_size < fp32.stat().st_size

    code = main(["validate", str(fp32), str(fp16), str(int8), "--samples", str(samples),
                 "--json", "--min-top1", "0.9", "--write-checks", str(tmp_path / "checks.npz")])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(out)
    by_name = {Path(v["path"]).name: v["outputs"][0] for v in report["variants"]}
    assert by_name["mlp.fp16.tflite"]["top1"] >= 0.99
    assert by_name["mlp.fp16.tflite"]["cosine"] >= 0.9999
    assert by_name["mlp.int8.tflite"]["top1"] >= 0.9
    assert by_name["mlp.int8.tflite"]["cosine"] >= 0.99
    meta = json.loads((tmp_path / "checks.json").read_text())
    assert meta["inputs"][0]["name"] == "input"
    assert set(meta["variant_tolerances"]) == {"mlp.fp16.tflite", "mlp.int8.tflite"}

    # Each variant runs in the agent's own runtime and reports the precision it really has.
    from tests.converters.test_onnx_variants import loaded_precision

    for path, precision in ((fp32, "fp32"), (fp16, "fp16"), (int8, "int8")):
        assert loaded_precision(path) == precision, path.name
