"""Per-model overrides and tuning settings in ``[[models]]``: what is accepted, what is refused."""

from __future__ import annotations

from typing import Any

import pytest

from edgeagent.config import TuneSection, parse_config
from edgeagent.errors import ConfigError

HUB = {"url": "http://127.0.0.1:1/", "root": "root.json"}


def one(**model: Any) -> Any:
    model.setdefault("name", "m")
    if "path" not in model:
        model.setdefault("version", 1)
    return parse_config({"hub": HUB, "models": [model]}).models[0]


def test_defaults_override_nothing_and_do_not_tune() -> None:
    m = one()
    assert (m.providers, m.precision, m.variant, m.threads) == ((), "", "", None)
    assert m.tune == TuneSection(enabled=False)


def test_overrides_read() -> None:
    m = one(providers=["CUDAExecutionProvider", "CPUExecutionProvider"], precision="int8",
            variant="m-int8.onnx", threads=2, tune=True)
    assert m.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert (m.precision, m.variant, m.threads) == ("int8", "m-int8.onnx", 2)
    assert m.tune.enabled and m.tune.objective == "throughput" and m.tune.budget_s == 60.0


def test_tune_table() -> None:
    m = one(max_batch_size=8, tune={"objective": "latency", "budget_s": 20, "max_memory_mb": 300,
                                    "max_p99_ms": 15, "threads": [1, 2], "batch_sizes": [4, 8]})
    assert m.tune == TuneSection(True, "latency", 20.0, 300.0, 15.0, 0.05, (1, 2), (4, 8))
    assert not one(tune={"enabled": False}).tune.enabled
    assert not one(tune=False).tune.enabled


BAD = [
    ({"providers": ["CUDA EP"]}, "models[0].providers[0]", "provider"),
    ({"providers": ["a", "a"]}, "models[0].providers", "twice"),
    ({"providers": "CUDAExecutionProvider"}, "models[0].providers", "list"),
    ({"precision": "fp64"}, "models[0].precision", "fp32, fp16, int8"),
    ({"variant": "../m.onnx"}, "models[0].variant", "file name"),
    ({"path": "m.onnx", "variant": "m.onnx"}, "models[0].variant", "hub models"),
    ({"threads": -1}, "models[0].threads", ">= 0"),
    ({"threads": 1.5}, "models[0].threads", "integer"),
    ({"tune": "yes"}, "models[0].tune", "true, false or a table"),
    ({"tune": {"objective": "fast"}}, "models[0].tune.objective", "throughput or latency"),
    ({"tune": {"budget": 5}}, "models[0].tune", "unknown key 'budget'"),
    ({"tune": {"budget_s": 0}}, "models[0].tune.budget_s", "> 0"),
    ({"tune": {"max_memory_mb": -1}}, "models[0].tune.max_memory_mb", ">= 0"),
    ({"tune": {"threads": [0]}}, "models[0].tune.threads[0]", "> 0"),
    ({"tune": {"batch_sizes": [4]}}, "models[0].tune.batch_sizes", "batching on"),
    ({"max_batch_size": 4, "tune": {"batch_sizes": [8]}}, "models[0].tune.batch_sizes",
     "above max_batch_size"),
    ({"tunes": True}, "models[0]", "unknown key 'tunes'"),
]


@pytest.mark.parametrize(("model", "key", "words"), BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_overrides_are_refused_by_key(model: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        one(**model)
    assert info.value.key_path == key
    assert words in str(info.value)
