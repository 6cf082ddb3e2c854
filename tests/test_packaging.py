"""The installable package: public API, the package list, and what a wheel carries."""

from __future__ import annotations

import re
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
        "InferenceError", "InferenceInputError", "ModelError", "ModelNotFound", "ModelNotReady",
        "Overloaded", "ProfileError", "VerificationError", "__version__", "load_config",
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
    found |= {"edgeagent.device_profiles", "edgeconvert"}
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


@pytest.mark.slow
def test_wheel_carries_profiles_and_converters(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("edgeagent-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    profiles = {n for n in names
                if n.startswith("edgeagent/device_profiles/") and n.endswith(".toml")}
    assert "edgeagent/device_profiles/x86-64-cpu.toml" in profiles
    assert len(profiles) >= 10
    assert "edgeconvert/cli.py" in names
    # The fleet console's assets are package data (docs/console.md).
    assert {f"edgeagent/fleet/console/static/{f}" for f in
            ("index.html", "console.js", "console.css", "favicon.svg")} <= names
    assert not any(n.startswith(("tests/", "converters/")) for n in names)
