"""Checks that fit each variant, end to end: ``edgeconvert validate --write-checks``, then
``edgeconvert publish`` to a real hub in a temp dir, then the box's side — the release fetched
and verified over loopback HTTP, its checks read for the chosen variant, and the version loaded,
warmed up and checked by the real model manager (onnxruntime and LiteRT sessions).

Seam 5 of issue 11: a TFLite release with checks could never be activated (check names
``features`` against LiteRT's ``serving_default_features:0``, float inputs for an int8 model).
Seam 6: the per-variant tolerances of docs/converting.md were not applied on the box.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgeconvert.cli import main as edgeconvert
from edgeconvert.fp16 import convert_fp16
from edgeconvert.hub import Hub

from edgeagent.device.plan import PlannedProvider, ProviderPlan
from edgeagent.errors import ModelError
from edgeagent.hub.bundle import read_checks
from edgeagent.hub.client import HubClient
from edgeagent.hub.fetcher import HubFetcher
from edgeagent.runtime.manager import ModelManager, ModelSource
from edgeagent.runtime.registry import BackendRegistry
from tests.converters.models import broken_copy
from tests.hub.hubserver import HubServer
from tests.onnx_models import mlp

pytest.importorskip("ai_edge_litert")

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "tflite"


def _wait(what: str, cond: Callable[[], bool]) -> None:
    """Wait for the agent's background work (a generous bound that only keeps a broken build
    from hanging, not a timing assertion)."""
    deadline = time.monotonic() + 120
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.05)


def planner(fmt: str, precision: str, sha: str, overrides: object = None) -> ProviderPlan:
    first = "CPUExecutionProvider" if fmt == "onnx" else "xnnpack"
    return ProviderPlan(fmt, precision, (PlannedProvider(first),), threads=1)


def scaled_tflite(source: Path, dest: Path, factor: float) -> Path:
    """A copy of a float TFLite model with its output layer's weights multiplied by ``factor``
    (the weight bytes sit verbatim in the flatbuffer, so they are replaced in place)."""
    from ai_edge_litert.interpreter import Interpreter

    data = bytearray(source.read_bytes())
    interpreter = Interpreter(model_path=str(source))
    detail = next(d for d in interpreter.get_tensor_details() if "logits" in d["name"]
                  and d["name"].endswith("MatMul"))
    weights = interpreter.get_tensor(detail["index"])
    at = data.find(weights.tobytes())
    assert at > 0 and data.count(weights.tobytes()) == 1
    data[at:at + weights.nbytes] = (weights * np.float32(factor)).astype(np.float32).tobytes()
    dest.write_bytes(bytes(data))
    return dest


def tflite_samples(path: Path, n: int = 64) -> Path:
    np.savez(path, features=np.random.default_rng(5).standard_normal((n, 16)).astype(np.float32))
    return path


def onnx_samples(path: Path, n_in: int, n: int = 64) -> Path:
    np.savez(path, input=np.random.default_rng(6).standard_normal((n, n_in)).astype(np.float32))
    return path


def write_checks(tmp_path: Path, reference: Path, variants: list[Path], samples: Path,
                 *options: str) -> Path:
    out = tmp_path / "release" / "checks.npz"
    code = edgeconvert(["validate", str(reference), *map(str, variants), "--samples",
                        str(samples), "--write-checks", str(out), *options])
    assert code == 0
    return out


def edit_tolerances(checks: Path, **changes: Any) -> None:
    """What an operator may change in the checks.json beside the archive before publishing."""
    meta = checks.with_suffix(".json")
    doc = json.loads(meta.read_text())
    doc.update(changes)
    meta.write_text(json.dumps(doc))


def publish(hub: Hub, version: int, files: list[Path], checks: Path,
            capsys: pytest.CaptureFixture[str] | None = None) -> dict[str, Any]:
    args = ["publish", "--hub", str(hub.dir), "--keys", str(hub.keys_dir), "--name", "m",
            "--version", str(version), "--checks", str(checks), *map(str, files)]
    assert edgeconvert(args) == 0
    return hub.releases()["m"][version]


def activate(tmp_path: Path, server: HubServer, hub: Hub, version: int, variant_file: str,
             feed: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Fetch a release's variant and checks from the hub as a box does (TUF-verified over
    HTTP), read the checks for that variant, and let the model manager load, warm up, check and
    activate it; then run ``feed`` on it. Raises what the manager raises."""
    box = tmp_path / "box" / f"{version}-{variant_file}"
    box.mkdir(parents=True)
    fetcher = HubFetcher()
    try:
        client = HubClient(server.url, hub.meta_dir / "1.root.json", box / "metadata", fetcher)
        client.refresh()
        bundle = client.bundle("m", version)
        variant = next(v for v in bundle.variants if v.file == variant_file)
        assert bundle.checks is not None
        client.download("m", version, variant.file, box / variant.file)
        client.download("m", version, bundle.checks.file, box / bundle.checks.file)
    finally:
        fetcher.close()
    checks = read_checks((box / bundle.checks.file).read_bytes(), bundle.checks, variant.file)

    async def go() -> dict[str, np.ndarray]:
        manager = ModelManager(BackendRegistry(), planner)
        try:
            mv = await manager.load("m", ModelSource(box / variant.file, version,
                                                     variant.precision, origin="hub",
                                                     variant=variant.file, checks=checks))
            assert manager.get("m").version == version
            if feed is None:
                return {}
            spec, x = mv.model.inputs[0], feed["x"]
            if spec.quantization is not None:  # a client of an int8 model quantises
                q = spec.quantization
                x = (np.round(x / q.scale[0]) + q.zero_point[0]).astype(np.int8)
            _, outputs = await manager.infer("m", {spec.name: x})
            return outputs
        finally:
            await manager.close(1)

    return asyncio.run(go())


# ---- seam 5: checks keyed by the names the box sees ------------------------------------


def test_a_tflite_release_with_validate_checks_activates_on_the_box(
        tmp_path: Path, hub: Hub, server: HubServer) -> None:
    fp32, int8 = FIXTURES / "mlp_fp32.tflite", FIXTURES / "mlp_int8.tflite"
    checks = write_checks(tmp_path, fp32, [int8], tflite_samples(tmp_path / "s.npz"))
    meta = json.loads(checks.with_suffix(".json").read_text())
    assert meta["inputs"][0]["name"] == "features"  # the build side's plain names
    bundle = publish(hub, 1, [fp32, int8], checks)
    assert set(bundle["checks"]["variant_tolerances"]) == {"mlp_int8.tflite"}
    assert bundle["checks"]["tolerances"] == meta["tolerances"]
    x = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
    # The fp32 variant (float tensors named serving_default_features:0) and the int8 one
    # (inputs quantised with the tensor's scale and zero point, outputs dequantised).
    out32 = activate(tmp_path, server, hub, 1, "mlp_fp32.tflite", {"x": x})
    out8 = activate(tmp_path, server, hub, 1, "mlp_int8.tflite", {"x": x})
    assert list(out32) == ["StatefulPartitionedCall_1:0"]
    assert out8["StatefulPartitionedCall_1:0"].dtype == np.int8


def test_an_onnx_release_with_fp16_io_and_int8_activates(
        tmp_path: Path, hub: Hub, server: HubServer) -> None:
    ref = mlp(tmp_path / "m.onnx", n_in=8, n_hidden=16, n_out=4, seed=3)
    # Without --keep-io-types the fp16 model takes float16: the box casts the float32 checks.
    fp16 = convert_fp16(ref, tmp_path / "m.fp16.onnx")
    int8 = tmp_path / "m.int8.onnx"
    assert edgeconvert(["quantize", str(ref), "--out", str(int8)]) == 0
    checks = write_checks(tmp_path, ref, [fp16, int8], onnx_samples(tmp_path / "s.npz", 8))
    publish(hub, 1, [ref, fp16, int8], checks)
    for file in ("m.onnx", "m.fp16.onnx", "m.int8.onnx"):
        activate(tmp_path, server, hub, 1, file)


def test_a_mixed_release_pairs_tflite_outputs_by_position(
        tmp_path: Path, hub: Hub, server: HubServer) -> None:
    # Checks from the TFLite reference (input 'features', output 'StatefulPartitionedCall_1')
    # on an ONNX variant of the same shape ('input', 'logits'): paired as validate pairs them.
    fp32 = FIXTURES / "mlp_fp32.tflite"
    checks = write_checks(tmp_path, fp32, [], tflite_samples(tmp_path / "s.npz"))
    edit_tolerances(checks, tolerances={"max_abs_error": None, "min_cosine": -1.0,
                                        "min_top1": None})
    onnx = mlp(tmp_path / "m.onnx", n_in=16, n_hidden=8, n_out=4)
    publish(hub, 1, [fp32, onnx], checks)
    activate(tmp_path, server, hub, 1, "m.onnx")


# ---- seam 6: the tolerances of each variant applied on the box -------------------------


def test_a_broken_variant_fails_its_own_tolerance_while_fp32_passes(
        tmp_path: Path, hub: Hub, server: HubServer) -> None:
    ref = mlp(tmp_path / "m.onnx", n_in=8, n_hidden=16, n_out=4, seed=3)
    (tmp_path / "good").mkdir()
    good = convert_fp16(ref, tmp_path / "good" / "m.fp16.onnx", keep_io_types=True)
    checks = write_checks(tmp_path, ref, [good], onnx_samples(tmp_path / "s.npz", 8))
    meta = json.loads(checks.with_suffix(".json").read_text())
    assert meta["variant_tolerances"]["m.fp16.onnx"]["max_abs_error"] < 0.01
    # The file published as m.fp16.onnx is not the one validated: its weights are scaled.
    (tmp_path / "bad").mkdir()
    broken = convert_fp16(broken_copy(ref, tmp_path / "bad" / "broken.onnx"),
                          tmp_path / "bad" / "m.fp16.onnx", keep_io_types=True)
    publish(hub, 1, [ref, broken], checks)
    activate(tmp_path, server, hub, 1, "m.onnx")
    with pytest.raises(ModelError, match=r"m version 1: check \d+: output 'logits': "
                                         r"max_abs_error [0-9.e+-]+ > limit [0-9.e+-]+"):
        activate(tmp_path, server, hub, 1, "m.fp16.onnx")


@pytest.mark.parametrize(("default", "for_int8", "passes"), [
    ({"max_abs_error": 1e-6}, {"max_abs_error": 10.0}, True),
    ({"max_abs_error": 10.0}, {"max_abs_error": 1e-6}, False),
])
def test_the_variant_tolerance_wins_over_the_default(
        tmp_path: Path, hub: Hub, server: HubServer,
        default: dict[str, float], for_int8: dict[str, float], passes: bool) -> None:
    fp32, int8 = FIXTURES / "mlp_fp32.tflite", FIXTURES / "mlp_int8.tflite"
    checks = write_checks(tmp_path, fp32, [int8], tflite_samples(tmp_path / "s.npz"))
    empty = {"min_cosine": None, "min_top1": None}
    edit_tolerances(checks, tolerances=default | empty,
                    variant_tolerances={"mlp_int8.tflite": for_int8 | empty})
    publish(hub, 1, [int8], checks)
    if passes:
        activate(tmp_path, server, hub, 1, "mlp_int8.tflite")
    else:
        with pytest.raises(ModelError, match=r"output 'StatefulPartitionedCall_1': "
                                             r"max_abs_error [0-9.e+-]+ > limit 1e-06"):
            activate(tmp_path, server, hub, 1, "mlp_int8.tflite")


@pytest.mark.parametrize(("tolerances", "message"), [
    ({"min_cosine": 0.99},
     r"checks 0-7: output 'StatefulPartitionedCall_1': min_cosine: mean cosine similarity "
     r"-?[0-9.]+ < limit 0\.990000 \(lowest: check \d\)"),
    ({"min_top1": 0.99},
     r"checks 0-7: output 'StatefulPartitionedCall_1': min_top1: top-1 agreement [0-9.]+ "
     r"< limit 0\.9900"),
])
def test_min_cosine_and_min_top1_are_enforced(
        tmp_path: Path, hub: Hub, server: HubServer,
        tolerances: dict[str, float], message: str) -> None:
    fp32 = FIXTURES / "mlp_fp32.tflite"
    bad = scaled_tflite(fp32, tmp_path / "mlp_bad.tflite", -3.0)  # sign-flipped logits
    checks = write_checks(tmp_path, fp32, [], tflite_samples(tmp_path / "s.npz"))
    edit_tolerances(checks, tolerances={"max_abs_error": None, "min_cosine": None,
                                        "min_top1": None} | tolerances)
    publish(hub, 1, [fp32, bad], checks)
    activate(tmp_path, server, hub, 1, "mlp_fp32.tflite")
    with pytest.raises(ModelError, match=message):
        activate(tmp_path, server, hub, 1, "mlp_bad.tflite")


def test_a_release_with_atol_and_rtol_only_still_activates(
        tmp_path: Path, hub: Hub, server: HubServer) -> None:
    ref = mlp(tmp_path / "m.onnx", n_in=8, n_hidden=16, n_out=4, seed=3)
    # --checks with sample inputs: expected outputs computed at publish, atol/rtol from the
    # command line, as every bundle before the tolerances.
    bundle = publish(hub, 1, [ref], onnx_samples(tmp_path / "s.npz", 8, n=4))
    assert set(bundle["checks"]) == {"file", "size", "sha256", "atol", "rtol"}
    activate(tmp_path, server, hub, 1, "m.onnx")
    (tmp_path / "other").mkdir()
    other = mlp(tmp_path / "other" / "m.onnx", n_in=8, n_hidden=16, n_out=4, seed=4)
    np.savez(tmp_path / "wrong.npz", **{"inputs/input": np.zeros((2, 1, 8), np.float32),
                                        "outputs/logits": np.full((2, 1, 4), 9, np.float32)})
    publish(hub, 2, [other], tmp_path / "wrong.npz")
    with pytest.raises(ModelError, match=r"check 0: output 'logits' is off by up to [0-9.]+ "
                                         r"\(limit atol=0\.01, rtol=0\.01\)"):
        activate(tmp_path, server, hub, 2, "m.onnx")


# ---- a whole agent against the hub ------------------------------------------------------


def test_an_agent_serves_a_tflite_release_published_with_checks(
        tmp_path: Path, hub: Hub, server: HubServer) -> None:
    import httpx

    from edgeagent.config import load_config
    from tests.agentthread import AgentThread, free_port

    fp32, int8 = FIXTURES / "mlp_fp32.tflite", FIXTURES / "mlp_int8.tflite"
    checks = write_checks(tmp_path, fp32, [int8], tflite_samples(tmp_path / "s.npz"))
    publish(hub, 1, [fp32, int8], checks)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\ndevice_id = "checks-test"\n'
        f'profile = "x86-64-cpu"\nshutdown_grace_s = 5.0\n'
        f'[http]\nlisten = "127.0.0.1:{free_port()}"\n'
        f'[hub]\nurl = "{server.url}"\nroot = "{hub.meta_dir / "1.root.json"}"\n'
        'poll_interval_s = 0.2\n'
        '[[models]]\nname = "m"\nversion = "latest"\n')
    agent = AgentThread(load_config(str(config), {})).start()
    try:
        def state() -> dict[str, Any]:
            r = httpx.get(f"{agent.url}/v1/agent/status", headers=agent.headers, timeout=30)
            return next((m for m in r.json()["models"] if m["name"] == "m"), {})

        _wait("a verdict on version 1", lambda: state().get("state") in ("ready", "failed")
              or bool(state().get("last_error")))
        assert state()["state"] == "ready", state()
        meta = httpx.get(f"{agent.url}/v2/models/m", headers=agent.headers, timeout=30).json()
        assert meta["inputs"][0]["name"] == "serving_default_features:0"
        assert meta["platform"] == "tensorflow_lite"
    finally:
        agent.stop()


def test_an_agent_applies_the_tolerance_of_the_variant_it_picked(
        tmp_path: Path, hub: Hub, server: HubServer) -> None:
    import httpx

    from edgeagent.config import load_config
    from tests.agentthread import AgentThread, free_port

    fp32, int8 = FIXTURES / "mlp_fp32.tflite", FIXTURES / "mlp_int8.tflite"
    checks = write_checks(tmp_path, fp32, [int8], tflite_samples(tmp_path / "s.npz"))
    empty = {"min_cosine": None, "min_top1": None}
    edit_tolerances(checks, tolerances={"max_abs_error": 10.0} | empty,
                    variant_tolerances={"mlp_int8.tflite": {"max_abs_error": 1e-6} | empty})
    publish(hub, 1, [fp32, int8], checks)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\ndevice_id = "checks-test"\n'
        f'profile = "x86-64-cpu"\nshutdown_grace_s = 5.0\n'
        f'[http]\nlisten = "127.0.0.1:{free_port()}"\n'
        f'[hub]\nurl = "{server.url}"\nroot = "{hub.meta_dir / "1.root.json"}"\n'
        'poll_interval_s = 0.2\n'
        '[[models]]\nname = "m"\nversion = "latest"\n')
    agent = AgentThread(load_config(str(config), {})).start()
    try:
        def state() -> dict[str, Any]:
            r = httpx.get(f"{agent.url}/v1/agent/status", headers=agent.headers, timeout=30)
            return next((m for m in r.json()["models"] if m["name"] == "m"), {})

        # x86-64-cpu prefers the int8 TFLite variant; its own limit (1e-6) refuses it.
        _wait("a verdict on version 1", lambda: state().get("state") in ("ready", "failed")
              or bool(state().get("last_error")))
        assert state()["state"] == "failed", state()
        assert "max_abs_error" in state()["last_error"]
    finally:
        agent.stop()


# ---- publish refuses checks a variant cannot take ---------------------------------------


def _archive(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy stubs mistype **kwds
    return path


def _refused(hub: Hub, files: list[Path], checks: Path,
             capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    code = edgeconvert(["publish", "--hub", str(hub.dir), "--keys", str(hub.keys_dir),
                        "--name", "m", "--version", "1", "--checks", str(checks),
                        *map(str, files)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert hub.releases() == {}, "nothing published"
    return err


def test_publish_refuses_a_check_input_no_tensor_matches(
        tmp_path: Path, hub: Hub, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.onnx_models import multi_io

    model = multi_io(tmp_path / "multi.onnx")
    x, k = np.ones((2, 1, 3), np.float32), np.ones((2, 1, 3), np.int64)
    checks = _archive(tmp_path / "c.npz", **{"inputs/x": x, "inputs/q": k, "outputs/sum": x,
                                             "outputs/k2": k})
    err = _refused(hub, [model], checks, capsys)
    assert ("multi.onnx: the checks' input 'q' matches no input of this variant "
            "(it takes x, k)") in err
    checks = _archive(tmp_path / "c.npz", **{"inputs/x": x, "inputs/k": k, "outputs/sum": x,
                                             "outputs/nope": k, "outputs/third": k})
    err = _refused(hub, [model], checks, capsys)
    assert ("multi.onnx: the checks' output 'nope' matches no output of this variant "
            "(it gives sum, k2)") in err
    checks = _archive(tmp_path / "c.npz", **{"inputs/x": k, "inputs/k": k, "outputs/sum": x,
                                             "outputs/k2": k})
    err = _refused(hub, [model], checks, capsys)
    assert "multi.onnx: the checks' input 'x' is int64, the variant's 'x' takes float32" in err


def test_publish_refuses_checks_whose_shapes_do_not_fit_a_variant(
        tmp_path: Path, hub: Hub, capsys: pytest.CaptureFixture[str]) -> None:
    fp32 = FIXTURES / "mlp_fp32.tflite"
    checks = write_checks(tmp_path, fp32, [], tflite_samples(tmp_path / "s.npz"))
    # The TFLite MLP takes [1, 16]; this ONNX one [batch, 8]: the checks cannot apply to it.
    narrow = mlp(tmp_path / "narrow.onnx", n_in=8, n_hidden=8, n_out=4)
    err = _refused(hub, [fp32, narrow], checks, capsys)
    assert ("narrow.onnx: the checks' input 'features' has shape [1, 16], the variant's "
            "'input' takes [?, 8]") in err
    fewer = mlp(tmp_path / "fewer.onnx", n_in=16, n_hidden=8, n_out=3)
    err = _refused(hub, [fp32, fewer], checks, capsys)
    assert ("fewer.onnx: the checks' output 'StatefulPartitionedCall_1' has shape [1, 4], "
            "the variant's 'logits' gives [1, 3]") in err


@pytest.mark.parametrize(("meta", "message"), [
    ("not json", "not a readable checks JSON file"),
    ('["a list"]', "expected a JSON object"),
    ('{"tolerances": "tight"}', "tolerances: expected an object of max_abs_error, min_cosine"),
    ('{"tolerances": {"max_abs_error": "0.1"}}', "tolerances.max_abs_error: expected a number"),
    ('{"tolerances": {"max_abs_error": -1}}', "checks.tolerances.max_abs_error: -1.0 must be"),
    ('{"variant_tolerances": ["m.onnx"]}', "variant_tolerances: expected an object"),
    ('{"variant_tolerances": {"m.onnx": {"min_top1": 3}}}',
     "checks.variant_tolerances['m.onnx'].min_top1: 3.0 must be a number between 0 and 1"),
])
def test_publish_refuses_a_bad_checks_json(
        tmp_path: Path, hub: Hub, capsys: pytest.CaptureFixture[str],
        meta: str, message: str) -> None:
    model = mlp(tmp_path / "m.onnx", n_in=8, n_hidden=8, n_out=4)
    checks = write_checks(tmp_path, model, [], onnx_samples(tmp_path / "s.npz", 8))
    checks.with_suffix(".json").write_text(meta)
    assert message in _refused(hub, [model], checks, capsys)


def test_publish_refuses_a_checks_archive_with_other_arrays(
        tmp_path: Path, hub: Hub, capsys: pytest.CaptureFixture[str]) -> None:
    model = mlp(tmp_path / "m.onnx", n_in=8, n_hidden=8, n_out=4)
    x = np.ones((2, 1, 8), np.float32)
    checks = _archive(tmp_path / "c.npz", **{"inputs/input": x, "outputs/logits": x[..., :4],
                                             "stray": x})
    assert "checks hold only inputs/NAME and outputs/NAME arrays" in _refused(
        hub, [model], checks, capsys)
