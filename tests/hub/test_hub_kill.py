"""SIGKILL at each step of a download and of an activation: the restart is consistent."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from edgeconvert.hub import Hub

from tests.hub.helpers import release
from tests.hub.hubserver import HubServer

REPO = Path(__file__).resolve().parents[2]
STEPS = ("refreshed", "bundle", "download-half", "downloaded", "installed", "loaded",
         "state-written", "collected")


def _run(state: Path, server: HubServer, hub: Hub,
         kill_at: str = "") -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "tests.hub.killer", str(state), server.url,
            str(hub.meta_dir / "1.root.json")]
    if kill_at:
        argv += ["--kill-at", kill_at]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)


def _assert_consistent(state: Path) -> None:
    store = state / "hub"
    for blob in (store / "blobs").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    assert not list(store.rglob(".*.tmp"))
    for folder in (store / "models" / "m").iterdir():
        assert folder.name.isdigit(), f"half-built version folder {folder}"


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
def test_kill_at_each_step_restarts_consistent(tmp_path: Path, hub: Hub, server: HubServer,
                                               step: str) -> None:
    state = tmp_path / "state"
    release(hub, tmp_path, 1, hidden=20000)
    first = _run(state, server, hub)
    assert first.stdout.split() == ["started", "empty", "serving", "1"], first.stderr
    release(hub, tmp_path, 2, hidden=20000)
    killed = _run(state, server, hub, step)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    _assert_consistent(state)
    # The restart serves the old or the new version at once, then finishes the update.
    server.range_requests.clear()
    again = _run(state, server, hub)
    started, served = again.stdout.splitlines()
    assert started in ("started 1", "started 2"), again.stderr
    assert served == "serving 2", again.stderr
    if step == "download-half":  # the partial download was resumed, not started over
        assert any(p.endswith(".m.onnx") for p in server.range_requests)
    _assert_consistent(state)
    assert not list((state / "hub" / "downloads").iterdir())
