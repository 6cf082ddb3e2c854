"""Docs that state facts about shipped data stay in step with it."""

from __future__ import annotations

from pathlib import Path

from edgeagent.device import DeviceProfile, load_profiles

REPO = Path(__file__).resolve().parent.parent

_MAKE = {
    ("onnx", "fp16"): "`edgeconvert fp16 --keep-io-types`",
    ("onnx", "int8"): "`edgeconvert quantize`",
    ("onnx", "fp32"): "the fp32 model as it is",
    ("tflite", "int8"): "`edgeconvert tflite --int8`",
    ("tflite", "fp16"): "`edgeconvert tflite --fp16`",
    ("tflite", "fp32"): "`edgeconvert tflite`",
}


_SHORT = {"TensorrtExecutionProvider": "TensorRT", "CUDAExecutionProvider": "CUDA",
          "CPUExecutionProvider": "CPU"}


def _row(p: DeviceProfile) -> str:
    providers = " → ".join(_SHORT.get(x.name, x.name) for x in p.onnx_providers)
    onnx = f"{', '.join(p.onnx_precisions)} on {providers}"
    tflite = ", ".join(p.tflite_precisions)
    if p.tflite_delegates:
        tflite += f" with {' → '.join(d.name for d in p.tflite_delegates)}"
    fmt = p.formats[0]
    best = (p.onnx_precisions if fmt == "onnx" else p.tflite_precisions)[0]
    return f"| `{p.name}` | {best} {fmt}: {_MAKE[(fmt, best)]} | {onnx} | {tflite} |"


def profile_table() -> str:
    head = ("| profile | variant it prefers, and how to make it | ONNX precisions, providers | "
            "TFLite precisions, delegates |\n|---|---|---|---|")
    return "\n".join([head, *(_row(p) for _, p in sorted(load_profiles().items()))])


def test_converting_doc_states_what_each_profile_prefers() -> None:
    table = profile_table()
    assert table in (REPO / "docs/converting.md").read_text(), (
        "docs/converting.md is out of step with device_profiles/; the table should read:\n" + table)
