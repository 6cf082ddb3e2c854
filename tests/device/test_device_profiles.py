"""Device profiles: the shipped files, validation errors, and selection on fake trees."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgeagent.device.facts import RuntimeFacts, collect_facts
from edgeagent.device.profiles import load_profiles, select_profile
from edgeagent.errors import ProfileError
from tests.device.trees import BOARDS, write

SHIPPED = {
    "jetson-agx-orin", "jetson-orin-nx", "jetson-orin-nano", "jetson-xavier-nx", "jetson-nano",
    "raspberry-pi-5", "raspberry-pi-4", "generic-arm64", "x86-64-cpu", "x86-64-nvidia",
}

SELECTION = [
    ("agx-orin", "jetson-agx-orin",
     "device-tree model 'NVIDIA Jetson AGX Orin Developer Kit' contains 'AGX Orin'"),
    ("orin-nx", "jetson-orin-nx",
     "device-tree model 'NVIDIA Jetson Orin NX Engineering Reference Developer Kit' contains "
     "'Orin NX'"),
    ("orin-nano", "jetson-orin-nano",
     "device-tree model 'NVIDIA Jetson Orin Nano Developer Kit' contains 'Orin Nano'"),
    ("xavier-nx", "jetson-xavier-nx",
     "device-tree model 'NVIDIA Jetson Xavier NX Developer Kit' contains 'Xavier NX'"),
    ("nano", "jetson-nano",
     "device-tree model 'NVIDIA Jetson Nano Developer Kit' contains 'Jetson Nano'"),
    ("pi5", "raspberry-pi-5",
     "device-tree model 'Raspberry Pi 5 Model B Rev 1.0' contains 'Raspberry Pi 5'; "
     "architecture aarch64"),
    ("pi4", "raspberry-pi-4",
     "device-tree model 'Raspberry Pi 4 Model B Rev 1.4' contains 'Raspberry Pi 4'; "
     "architecture aarch64"),
    ("rock5b", "generic-arm64", "architecture aarch64"),
    ("x86-nvidia", "x86-64-nvidia", "architecture x86_64; GPU NVIDIA GeForce RTX 4090"),
    ("x86-cpu", "x86-64-cpu", "architecture x86_64"),
]


def test_every_shipped_profile_loads() -> None:
    profiles = load_profiles()
    assert set(profiles) == SHIPPED
    for profile in profiles.values():
        assert profile.description
        assert profile.onnx_providers[-1].name == "CPUExecutionProvider"
        assert profile.onnx_precisions
        assert profile.tflite_precisions


def test_every_shipped_profile_is_selected_by_its_board() -> None:
    assert {name for _, name, _ in SELECTION} == SHIPPED


@pytest.mark.parametrize(("board", "expected", "reason"), SELECTION)
def test_selection(tmp_path: Path, board: str, expected: str, reason: str) -> None:
    spec = BOARDS[board]
    selection = select_profile(load_profiles(), collect_facts(spec.build(tmp_path), spec.runtimes))
    assert selection.profile.name == expected
    assert selection.reason == reason
    assert {c.name for c in selection.candidates} == SHIPPED - {expected}


def test_losers_say_why(tmp_path: Path) -> None:
    spec = BOARDS["orin-nano"]
    selection = select_profile(load_profiles(), collect_facts(spec.build(tmp_path), spec.runtimes))
    why = {c.name: (c.matched, c.reason) for c in selection.candidates}
    assert why["generic-arm64"] == (
        True, "matched (architecture aarch64) but jetson-orin-nano wins on priority (100 over 10)")
    assert why["jetson-nano"] == (
        False, "device-tree model 'NVIDIA Jetson Orin Nano Developer Kit' contains none of "
               "'Jetson Nano'")
    assert why["x86-64-nvidia"] == (False, "architecture aarch64 is not x86_64")
    # Matching candidates come first, best first.
    assert selection.candidates[0].name == "generic-arm64"


def test_ties_break_on_specificity_then_name(tmp_path: Path) -> None:
    extra = tmp_path / "profiles"
    write(extra, "a-board.toml", GOOD.replace('libraries = ["edgetpu"]\n', ""))
    write(extra, "b-board.toml", GOOD.replace('libraries = ["edgetpu"]\n', ""))
    write(extra, "c-board.toml", GOOD.replace('libraries = ["edgetpu"]', "gpu = false"))
    root = BOARDS["rock5b"].build(tmp_path / "root")
    selection = select_profile(load_profiles(extra), collect_facts(root, RuntimeFacts()))
    assert selection.profile.name == "c-board"
    assert selection.reason == "architecture aarch64; no GPU"
    why = {c.name: c.reason for c in selection.candidates}
    assert why["a-board"].endswith("c-board wins on specificity (2 criteria over 1)")
    write(extra, "c-board.toml", GOOD.replace('arch = ["aarch64"]', 'arch = ["x86_64"]'))
    selection = select_profile(load_profiles(extra), collect_facts(root, RuntimeFacts()))
    assert selection.profile.name == "a-board"
    assert {c.name: c.reason for c in selection.candidates}["b-board"].endswith(
        "a-board wins on name order (same priority and specificity)")


def test_forced_profile(tmp_path: Path) -> None:
    spec = BOARDS["orin-nano"]
    facts = collect_facts(spec.build(tmp_path), spec.runtimes)
    selection = select_profile(load_profiles(), facts, forced="generic-arm64")
    assert selection.profile.name == "generic-arm64"
    assert selection.reason == "forced by configuration (agent.profile = 'generic-arm64')"
    assert select_profile(load_profiles(), facts, forced="auto").profile.name == "jetson-orin-nano"


def test_forcing_an_unknown_profile_lists_the_known_ones(tmp_path: Path) -> None:
    facts = collect_facts(tmp_path, RuntimeFacts())
    with pytest.raises(ProfileError, match=r"agent\.profile: unknown device profile "
                                           r"'jetson-tx2' \(known: generic-arm64, ") as info:
        select_profile(load_profiles(), facts, forced="jetson-tx2")
    assert "x86-64-nvidia" in str(info.value)
    assert info.value.exit_code == 2


def test_no_profile_matches_an_unknown_arch(tmp_path: Path) -> None:
    write(tmp_path, "proc/sys/kernel/arch", "riscv64\n")
    with pytest.raises(ProfileError, match=r"no device profile matches this box \(architecture "
                                           r"riscv64.*set agent\.profile to one of: "):
        select_profile(load_profiles(), collect_facts(tmp_path, RuntimeFacts()))


def test_32_bit_pi_os_is_not_a_pi_profile(tmp_path: Path) -> None:
    spec = BOARDS["pi4"]
    write(spec.build(tmp_path), "proc/sys/kernel/arch", "armv7l\n")
    with pytest.raises(ProfileError, match="architecture armv7l"):
        select_profile(load_profiles(), collect_facts(tmp_path, RuntimeFacts()))


GOOD = """\
description = "a Coral dev box"
priority = 200
memory_budget_mb = 256

[match]
arch = ["aarch64"]
libraries = ["edgetpu"]

[onnx]
precisions = ["int8"]

[[onnx.providers]]
name = "CPUExecutionProvider"

[tflite]
precisions = ["int8", "fp32"]

[[tflite.delegates]]
name = "edgetpu"
options = { device = "usb" }
"""


def test_operator_profiles_add_and_replace(tmp_path: Path) -> None:
    extra = tmp_path / "profiles"
    write(extra, "coral-board.toml", GOOD)
    write(extra, "x86-64-cpu.toml", GOOD.replace("a Coral dev box", "my own x86"))
    profiles = load_profiles(extra)
    assert profiles["x86-64-cpu"].description == "my own x86"
    assert profiles["x86-64-cpu"].source == str(extra / "x86-64-cpu.toml")
    root = BOARDS["rock5b"].build(tmp_path / "root")
    write(root, "usr/lib/aarch64-linux-gnu/libedgetpu.so.1.0", "")
    selection = select_profile(profiles, collect_facts(root, RuntimeFacts()))
    assert selection.profile.name == "coral-board"
    assert selection.reason == ("architecture aarch64; "
                                "/usr/lib/aarch64-linux-gnu/libedgetpu.so.1.0 present")
    assert selection.profile.tflite_delegates[0].library == "libedgetpu.so.1"
    assert dict(selection.profile.tflite_delegates[0].options) == {"device": "usb"}


def test_missing_operator_directory(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="profiles directory does not exist"):
        load_profiles(tmp_path / "nope")


def _edit(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new, 1)


# (what is wrong, document, key path, message)
BAD = [
    ("unknown top-level key", "colour = 'red'\n" + GOOD, "colour", "unknown key"),
    ("unknown key in match", _edit("[match]\n", "[match]\nmodel = ['x']\n"), "match.model",
     "unknown key"),
    ("unknown key in a provider", _edit('name = "CPUExecutionProvider"\n',
                                        'name = "CPUExecutionProvider"\nfast = true\n'),
     "onnx.providers[0].fast", "unknown key"),
    ("wrong type", _edit("priority = 200", "priority = '200'"), "priority",
     "expected an integer, got a string ('200')"),
    ("bool is not an int", _edit("priority = 200", "priority = true"), "priority",
     "expected an integer, got a boolean (True)"),
    ("negative budget", _edit("memory_budget_mb = 256", "memory_budget_mb = -1"),
     "memory_budget_mb", "must be at least 1"),
    ("unknown provider", _edit('"CPUExecutionProvider"', '"TurboExecutionProvider"'),
     "onnx.providers[0].name", "unknown execution provider 'TurboExecutionProvider'"),
    ("bad precision", _edit('precisions = ["int8"]', 'precisions = ["int4"]'),
     "onnx.precisions[0]", "'int4' is not one of fp32, fp16, int8"),
    ("duplicate precision", _edit('precisions = ["int8"]', 'precisions = ["int8", "int8"]'),
     "onnx.precisions[1]", "listed twice"),
    ("empty precisions", _edit('precisions = ["int8"]', "precisions = []"), "onnx.precisions",
     "must not be empty"),
    ("bad arch", _edit('arch = ["aarch64"]', 'arch = ["sparc"]'), "match.arch[0]",
     "'sparc' is not one of"),
    ("unknown library", _edit('libraries = ["edgetpu"]', 'libraries = ["libfoo"]'),
     "match.libraries[0]", "'libfoo' is not one of"),
    ("unknown delegate", _edit('name = "edgetpu"', 'name = "hexagon"'),
     "tflite.delegates[0].name", "'hexagon' is not one of edgetpu, xnnpack, gpu"),
    ("xnnpack has no library", _edit('name = "edgetpu"', 'name = "xnnpack"\nlibrary = "x.so"'),
     "tflite.delegates[0].library", "built into LiteRT"),
    ("missing required key", _edit('description = "a Coral dev box"\n', ""), "description",
     "required key is missing"),
    ("missing table", _edit("[match]\n", "[matches]\n"), "match", "required key is missing"),
    ("CPU not last", _edit('[[onnx.providers]]\nname = "CPUExecutionProvider"\n',
                           '[[onnx.providers]]\nname = "CPUExecutionProvider"\n'
                           '[[onnx.providers]]\nname = "CUDAExecutionProvider"\n'),
     "onnx.providers[0].name", "must come last"),
    ("planner-owned option", _edit('name = "CPUExecutionProvider"\n',
                                   'name = "TensorrtExecutionProvider"\n'
                                   'options = { trt_fp16_enable = true }\n'
                                   '[[onnx.providers]]\nname = "CPUExecutionProvider"\n'),
     "onnx.providers[0].options.trt_fp16_enable", "set by the planner"),
    ("unknown CUDA option", _edit('name = "CPUExecutionProvider"\n',
                                  'name = "CUDAExecutionProvider"\n'
                                  'options = { gpu_mem = 1 }\n'
                                  '[[onnx.providers]]\nname = "CPUExecutionProvider"\n'),
     "onnx.providers[0].options.gpu_mem", "unknown CUDAExecutionProvider option"),
    ("bad CUDA option value", _edit('name = "CPUExecutionProvider"\n',
                                    'name = "CUDAExecutionProvider"\n'
                                    'options = { cudnn_conv_algo_search = "FAST" }\n'
                                    '[[onnx.providers]]\nname = "CPUExecutionProvider"\n'),
     "onnx.providers[0].options.cudnn_conv_algo_search", "'FAST' is not one of EXHAUSTIVE"),
    ("fp16 flag on CUDA", _edit('name = "CPUExecutionProvider"\n',
                                'name = "CUDAExecutionProvider"\nfp16 = true\n'
                                '[[onnx.providers]]\nname = "CPUExecutionProvider"\n'),
     "onnx.providers[0].fp16", "unknown key"),
    ("option of a wrong type", _edit('options = { device = "usb" }', "options = { device = [1] }"),
     "tflite.delegates[0].options.device", "expected a string or an integer"),
    ("providers not an array of tables",
     _edit('[[onnx.providers]]\nname = "CPUExecutionProvider"\n',
           'providers = ["CPUExecutionProvider"]\n'),
     "onnx.providers[0]", "expected a table"),
]


@pytest.mark.parametrize(("what", "text", "key_path", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_profile_names_file_and_key(tmp_path: Path, what: str, text: str, key_path: str,
                                        message: str) -> None:
    path = write(tmp_path, "bad.toml", text)
    with pytest.raises(ProfileError) as info:
        load_profiles(tmp_path)
    assert info.value.file == str(path)
    assert info.value.key_path == key_path
    assert str(info.value).startswith(f"{path}: {key_path}: ")
    assert message in str(info.value)


def test_bad_toml_syntax_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.toml", GOOD.replace("priority = 200", "priority = = 200"))
    with pytest.raises(ProfileError, match=re.escape(f"{path}: invalid TOML: ")
                       + r".*line 2") as info:
        load_profiles(tmp_path)
    assert info.value.file == str(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.toml"
    path.write_bytes(b'description = "caf\xe9"\n')
    with pytest.raises(ProfileError, match="not UTF-8"):
        load_profiles(tmp_path)


def test_bad_profile_name(tmp_path: Path) -> None:
    write(tmp_path, "My Board.toml", GOOD)
    with pytest.raises(ProfileError, match="profile name 'My Board' must be lower-case"):
        load_profiles(tmp_path)
