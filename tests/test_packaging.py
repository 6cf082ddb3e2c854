"""The installable package: public API, the package list, and what a wheel carries."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import edgeagent

REPO = Path(__file__).resolve().parent.parent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_public_api_is_pinned() -> None:
    assert sorted(edgeagent.__all__) == [
        "AgentConfig", "BackendUnavailable", "ConfigError", "EdgeAgentError", "HubError",
        "HubTransientError", "InferenceError", "InferenceInputError", "ModelError",
        "ModelNotFound", "ModelNotReady", "Overloaded", "ProfileError", "VerificationError",
        "__version__", "load_config",
    ]
    for name in edgeagent.__all__:
        assert hasattr(edgeagent, name)


def test_every_package_folder_is_listed_in_pyproject() -> None:
    """pyproject lists packages by hand (two are mapped from other folders): keep it in step."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "edgeagent").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    # Data folders listed as packages so setuptools ships them without warning.
    found |= {"edgeagent.device_profiles", "edgeagent.dashboards", "edgeagent.fleet.console.static",
              "edgeconvert"}
    assert found == listed


def test_agent_never_imports_the_converters() -> None:
    pattern = re.compile(r"^\s*(from|import)\s+(edgeconvert|converters)\b", re.MULTILINE)
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "edgeagent").rglob("*.py")
                 if pattern.search(p.read_text())]
    assert offenders == []


def test_serving_without_hub_or_broker_imports_neither() -> None:
    # A box without [hub] or [mqtt] never loads tuf, httpx or paho: ~17 MB of RSS and a few
    # hundred ms of start-up (docs/performance.md). Checked in a fresh interpreter.
    code = """
import sys
from edgeagent.cli import build_parser
build_parser(full=False)
import edgeagent.app, edgeagent.api.app, edgeagent.service.lifecycle
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'tuf', 'httpx', 'paho', 'tqdm'})
print(','.join(heavy))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == "", f"imported without a hub or broker: {out.stdout}"


def test_a_running_agent_loads_only_what_its_configuration_needs(tmp_path: Path) -> None:
    """Started for real (gRPC on, no hub, no broker, no .tflite model) and asked for its
    status, the agent has not loaded LiteRT (11 MB), grpcio (15 MB of resident code: its gRPC
    is its own HTTP/2), Triton's client package (its gRPC messages come without it), the HTTP
    client, WebSockets or the hub's TUF stack (docs/decisions.md, "Memory that comes back",
    "gRPC on the agent's own HTTP/2")."""
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        http_port, grpc_port = a.getsockname()[1], b.getsockname()[1]
    from tests import onnx_models

    model = onnx_models.mlp(tmp_path / "mlp.onnx")
    code = f"""
import asyncio, sys
from edgeagent.app import Agent
from edgeagent.config import parse_config
config = parse_config({{"agent": {{"state_dir": {str(tmp_path / "state")!r}}},
                        "http": {{"listen": "127.0.0.1:{http_port}"}},
                        "grpc": {{"listen": "127.0.0.1:{grpc_port}"}},
                        "models": [{{"name": "mlp", "path": {str(model)!r}}}]}})
async def main():
    agent = Agent(config)
    await agent.start()
    status = agent.status()
    await agent.stop()
    return status
status = asyncio.run(main())
assert status["backends"]["tflite"]["loaded"] is False, status["backends"]
assert [m["state"] for m in status["models"]] == ["ready"], status["models"]
unwanted = {{"ai_edge_litert", "tflite_runtime", "httpx", "tuf", "websockets", "rapidjson",
            "ml_dtypes", "tritonclient.grpc", "grpc"}}
loaded = set(sys.modules) | {{m.split(".")[0] for m in sys.modules}}
print(",".join(sorted(loaded & unwanted)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO, timeout=120)
    assert out.stdout.strip().splitlines()[-1:] in ([], [""]), out.stdout


def test_licence_is_declared_as_spdx_and_shipped() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a pointer to it
    assert set(project["urls"]) >= {"Homepage", "Documentation", "Source", "Issues"}


def test_classifiers_name_every_supported_python() -> None:
    """requires-python and the version classifiers say the same (3.10 up to the newest)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.10"
    versions = sorted(int(c.rsplit(".", 1)[1]) for c in project["classifiers"]
                      if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    assert versions[0] == 10
    assert versions == list(range(10, versions[-1] + 1))
    assert "License :: OSI Approved :: Apache Software License" not in project["classifiers"], (
        "PEP 639: the licence expression replaces licence classifiers")


@pytest.mark.slow
def test_wheel_carries_profiles_and_converters(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v",
         "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    warnings = [line for line in (build.stdout + build.stderr).splitlines()
                if re.search(r"DeprecationWarning|BuildBackendWarning|is deprecated", line)]
    assert warnings == [], "the build warns:\n" + "\n".join(warnings)
    (wheel,) = tmp_path.glob("edgeagent-*.whl")
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    meta = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta
    assert "License-File: LICENSE" in meta
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "Project-URL: Source, " in meta
    assert "Classifier: Programming Language :: Python :: 3.12" in meta
    assert "edgeagent/py.typed" in names
    assert {"edgeagent/dashboards/edgeagent-box.json",
            "edgeagent/dashboards/edgeagent-fleet.json"} <= names
    profiles = {n for n in names
                if n.startswith("edgeagent/device_profiles/") and n.endswith(".toml")}
    assert "edgeagent/device_profiles/x86-64-cpu.toml" in profiles
    assert len(profiles) >= 10
    assert "edgeconvert/cli.py" in names
    # The fleet console's assets are package data (docs/console.md).
    assert {f"edgeagent/fleet/console/static/{f}" for f in
            ("index.html", "console.js", "console.css", "favicon.svg")} <= names
    assert not any(n.startswith(("tests/", "converters/", "dashboards/")) for n in names)


def test_a_box_without_onnx_and_onnxruntime(tmp_path: Path) -> None:
    """The core names no onnxruntime build and no onnx: precisions are still read, the demo hub
    is still made, and the onnx backend says which extra to add. Checked in a fresh
    interpreter in which both packages cannot be imported, as on a bare install."""
    model = REPO / "edgeagent" / "demo.onnx"
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('onnx', 'onnxruntime'):
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Block())
from pathlib import Path
from edgeagent.runtime.inspect import onnx_precision
from edgeagent.runtime.registry import BackendRegistry
from edgeagent.demo import ensure_demo_hub
print(onnx_precision(Path({str(model)!r}))[0])
print(ensure_demo_hub(Path({str(tmp_path)!r})))
print(BackendRegistry().status()['onnx']['reason'])
assert not {{m.split('.')[0] for m in sys.modules}} & {{'onnx', 'onnxruntime'}}
"""
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "fp32", "True",
        "backend 'onnxruntime' unavailable: install edgeagent[cpu] or edgeagent[gpu] "
        "(pip install 'edgeagent[cpu]', or 'edgeagent[gpu]' on an NVIDIA box "
        "(onnxruntime-gpu); never both)"]


def test_core_names_no_onnxruntime_build_and_extras_bring_one_each() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] for r in reqs}

    core = names(project["dependencies"])
    assert not core & {"onnx", "onnxruntime", "onnxruntime-gpu"}
    extras = {k: names(v) for k, v in project["optional-dependencies"].items()}
    assert "onnxruntime" in extras["cpu"] and "onnxruntime-gpu" not in extras["cpu"]
    assert "onnxruntime-gpu" in extras["gpu"] and "onnxruntime" not in extras["gpu"]
    builds = {"onnxruntime", "onnxruntime-gpu"}
    assert all(not v & builds for k, v in extras.items() if k not in ("cpu", "gpu"))
    assert "onnx" in extras["convert"]
