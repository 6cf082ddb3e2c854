"""The check model on real sessions: names paired with the model's tensors, inputs cast or
quantised to the variant's types, outputs dequantised, and every limit with a message that names
the check, the output, the metric, the value and the limit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeagent.device.plan import PlannedProvider, ProviderPlan
from edgeagent.errors import ModelError
from edgeagent.runtime.base import LoadedModel, QuantParams, TensorSpec
from edgeagent.runtime.checks import (
    ModelCheck,
    TensorNameError,
    compare,
    from_model_output,
    pair_names,
    plain_name,
    run_checks,
    to_model_input,
)
from edgeagent.runtime.registry import BackendRegistry
from tests import onnx_models

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "tflite"
LITERT_IN, LITERT_OUT = "serving_default_features:0", "StatefulPartitionedCall_1:0"


@pytest.mark.parametrize(("name", "plain"), [
    ("serving_default_features:0", "features"),
    ("StatefulPartitionedCall_1:0", "StatefulPartitionedCall_1"),
    ("serving_default_x", "x"),
    ("input", "input"),
    ("a:b:12", "a:b"),
])
def test_plain_names(name: str, plain: str) -> None:
    assert plain_name(name) == plain


@pytest.mark.parametrize(("wanted", "available", "by_position", "pairs"), [
    (["features"], [LITERT_IN], False, {"features": LITERT_IN}),
    ([LITERT_IN], [LITERT_IN, "other"], False, {LITERT_IN: LITERT_IN}),
    (["serving_default_features:0"], ["features"], False, {LITERT_IN: "features"}),
    # A single input pairs with a single-input model whatever the names.
    (["input"], [LITERT_IN], False, {"input": LITERT_IN}),
    # Outputs pair by position when the names differ (as edgeconvert validate pairs them).
    (["logits", "boxes"], ["StatefulPartitionedCall:0", "StatefulPartitionedCall:1"], True,
     {"logits": "StatefulPartitionedCall:0", "boxes": "StatefulPartitionedCall:1"}),
    (["b", "a"], ["a", "b"], True, {"b": "b", "a": "a"}),
])
def test_names_pair_like_the_build_side(wanted: list[str], available: list[str],
                                        by_position: bool, pairs: dict[str, str]) -> None:
    assert pair_names(wanted, available, by_position=by_position) == pairs


@pytest.mark.parametrize(("wanted", "available", "by_position", "missing"), [
    (["x", "q"], ["x", "k"], False, "q"),
    (["x", "q"], ["x", "k", "z"], True, "q"),
    # Two tensors with the same plain name: neither is chosen.
    (["x", "y"], ["serving_default_x:0", "x:1"], False, "x"),
])
def test_names_that_pair_with_nothing(wanted: list[str], available: list[str],
                                      by_position: bool, missing: str) -> None:
    with pytest.raises(TensorNameError) as info:
        pair_names(wanted, available, by_position=by_position)
    assert info.value.name == missing


def test_quantised_inputs_and_outputs() -> None:
    spec = TensorSpec("x", "INT8", (1, 4), QuantParams((0.5,), (3,)))
    x = np.array([[0.0, 1.0, -1.6, 1000.0]], np.float32)
    assert to_model_input(spec, x).tolist() == [[3, 5, 0, 127]]
    per_channel = TensorSpec("x", "UINT8", (1, 2), QuantParams((0.5, 0.25), (10, 0), axis=1))
    assert to_model_input(per_channel, np.array([[1.0, 1.0]])).tolist() == [[12, 4]]
    out = from_model_output(spec, np.array([[3, 5]], np.int8))
    assert out.dtype == np.float64 and out.tolist() == [[0.0, 1.0]]
    # Float for fp16, integers for integers; other mixes are left for validate to refuse.
    assert to_model_input(TensorSpec("h", "FP16", (2,)), np.ones(2, np.float32)).dtype \
        == np.float16
    assert to_model_input(TensorSpec("i", "INT32", (2,)), np.ones(2, np.int64)).dtype \
        == np.int32
    assert to_model_input(TensorSpec("i", "INT64", (2,)), np.ones(2)).dtype == np.float64


def test_metrics_follow_the_documented_definitions() -> None:
    ref = np.array([[[1.0, 0.0, 0.0]], [[0.0, 2.0, 0.0]], [[0.0, 0.0, 0.0]]])
    var = np.array([[[1.0, 0.0, 0.5]], [[3.0, 2.0, 0.0]], [[0.0, 0.0, 0.0]]])
    m = compare(ref, var)
    assert m.max_abs_error == 3.0 and m.worst_abs == 1
    cos0, cos1 = 1 / np.sqrt(1.25), 4 / (2 * np.sqrt(13))
    assert m.cosine == pytest.approx((cos0 + cos1 + 1.0) / 3)  # two zero outputs count as 1
    assert m.worst_cosine == 1
    assert m.top1 == pytest.approx(2 / 3)  # [batch, classes] per check: a classifier
    assert m.reference_range == 2.0
    assert compare(ref[:, 0], var[:, 0]).top1 is None  # [classes] per check is not


@pytest.fixture
def litert_models() -> tuple[LoadedModel, LoadedModel]:
    backend = BackendRegistry().for_format("tflite")
    plan = ProviderPlan("tflite", "fp32", (PlannedProvider("xnnpack"),), threads=1)
    fp32 = backend.load(FIXTURES / "mlp_fp32.tflite", plan)
    int8 = backend.load(FIXTURES / "mlp_int8.tflite", plan)
    return fp32, int8


def _checks(model: LoadedModel, n: int = 6, **limits: float | None) -> list[ModelCheck]:
    """Checks named as the build side names them, expected outputs from ``model``."""
    xs = np.random.default_rng(2).standard_normal((n, 1, 16)).astype(np.float32)
    return [ModelCheck({"features": x}, {"StatefulPartitionedCall_1": model.run(
        {LITERT_IN: x})[LITERT_OUT]}, **limits) for x in xs]


def test_an_int8_model_is_checked_against_fp32_answers(
        litert_models: tuple[LoadedModel, LoadedModel]) -> None:
    fp32, int8 = litert_models
    loose = {"atol": None, "rtol": None, "max_abs_error": 1.0, "min_cosine": 0.99}
    run_checks(fp32, _checks(fp32, atol=1e-6, rtol=0))
    run_checks(int8, _checks(fp32, **loose))
    with pytest.raises(ModelError, match=r"^check \d: output 'StatefulPartitionedCall_1': "
                                         r"max_abs_error 0\.\d+ > limit 0\.001$"):
        run_checks(int8, _checks(fp32, **loose | {"max_abs_error": 1e-3}))
    with pytest.raises(ModelError, match=r"^checks 0-5: output 'StatefulPartitionedCall_1': "
                                         r"min_cosine: mean cosine similarity 0\.9\d+ < "
                                         r"limit 0\.999999 \(lowest: check \d\)$"):
        run_checks(int8, _checks(fp32, **loose | {"min_cosine": 0.999999}))
    with pytest.raises(ModelError, match=r"^check \d: output 'StatefulPartitionedCall_1' is "
                                         r"off by up to 0\.\d+ \(limit atol=1e-06, rtol=0\)$"):
        run_checks(int8, _checks(fp32, atol=1e-6, rtol=0))


def test_checks_that_do_not_fit_the_model_are_named(
        litert_models: tuple[LoadedModel, LoadedModel]) -> None:
    fp32, _ = litert_models
    x = np.zeros((1, 16), np.float32)
    y = np.zeros((1, 4), np.float32)
    cases = [
        (ModelCheck({"features": x, "extra": x}, {"o": y}),
         f"check 0: input 'extra' matches no input of the model (it takes {LITERT_IN})"),
        (ModelCheck({"features": x}, {"o": y, "p": y}),
         f"check 0: output 'o' matches no output of the model (it gives {LITERT_OUT})"),
        (ModelCheck({"features": np.zeros((1, 8), np.float32)}, {"o": y}),
         f"check 0: input '{LITERT_IN}': shape [1, 8] does not match"),
        (ModelCheck({"features": x}, {"o": np.zeros((1, 5), np.float32)}),
         "check 0: output 'o' has shape [1, 4], expected [1, 5]"),
        (ModelCheck({"features": x}, {"o": np.full((1, 4), np.nan, np.float32)},
                    atol=None, rtol=None, max_abs_error=10.0),
         "check 0: output 'o': max_abs_error nan > limit 10"),
    ]
    for check, message in cases:
        with pytest.raises(ModelError) as info:
            run_checks(fp32, [check])
        assert str(info.value).startswith(message), str(info.value)


def test_checks_with_different_limits_are_measured_apart(tmp_path: Path) -> None:
    backend = BackendRegistry().for_format("onnx")
    plan = ProviderPlan("onnx", "fp32", (PlannedProvider("CPUExecutionProvider"),), threads=1)
    model = backend.load(onnx_models.mlp(tmp_path / "m.onnx", n_in=4, n_hidden=4, n_out=3),
                         plan)
    x = np.ones((1, 4), np.float32)
    right = model.run({"input": x})["logits"]
    none = {"atol": None, "rtol": None}
    # Limits apply to the checks that carry them: the far-off check is only under a loose one.
    run_checks(model, [ModelCheck({"input": x}, {"logits": right}, **none, max_abs_error=1e-5),
                       ModelCheck({"input": x}, {"logits": right + 5}, **none,
                                  max_abs_error=6.0)])
    with pytest.raises(ModelError, match=r"^check 1: output 'logits': max_abs_error 5 > "):
        run_checks(model, [ModelCheck({"input": x}, {"logits": right}, **none,
                                      max_abs_error=1e-5),
                           ModelCheck({"input": x}, {"logits": right + 5}, **none,
                                      max_abs_error=1e-5)])
    # No limit at all: only that the check runs and fits.
    run_checks(model, [ModelCheck({"input": x}, {"logits": right + 5}, **none)])
