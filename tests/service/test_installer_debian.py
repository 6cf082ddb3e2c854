"""scripts/install.sh on a fresh Debian 12 (bookworm): debootstrap a root, run the installer in
it, check the venv, unit, config and user, `systemd-analyze verify` the unit there, and start
the agent from the venv as the service user.

Heavy (a ~300 MB root from Debian's mirror, about two minutes): marked ``slow``. Needs root,
debootstrap and a reachable Debian mirror (``DEBOOTSTRAP_MIRROR`` overrides
deb.debian.org); skips with the reason otherwise. The root is the host's architecture (no
binfmt support for others here).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.agentthread import free_port

REPO = Path(__file__).resolve().parents[2]
MIRROR = os.environ.get("DEBOOTSTRAP_MIRROR", "http://deb.debian.org/debian")
PACKAGES = "python3,python3-venv,ca-certificates,systemd,passwd,procps"
#: What the chroot's processes get: no host PIP_* settings (the host's local wheel folders are
#: not in the root), except the CA bundle, which a TLS-inspecting proxy may need.
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _chroot(root: Path, *argv: str, env: dict[str, str] | None = None, user: str | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess[str]:
    cmd = ["chroot", *([f"--userspec={user}:{user}"] if user else []), str(root), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**CHROOT_ENV, **(env or {})})


@pytest.fixture(scope="module")
def debian(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh Debian 12 root with /proc mounted (unmounted at the end)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, chroot)")
    for tool in ("debootstrap", "chroot", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install debootstrap)")
    root = tmp_path_factory.mktemp("debian") / "root"
    started = time.monotonic()
    made = subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}",
                           "bookworm", str(root), MIRROR],
                          capture_output=True, text=True, timeout=1200, check=False)
    if made.returncode != 0:
        pytest.skip(f"debootstrap bookworm from {MIRROR} failed: {made.stdout[-800:]}"
                    f"{made.stderr[-800:]}")
    print(f"debootstrap bookworm: {time.monotonic() - started:.0f} s")
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if host_ca.is_file():
        shutil.copy(host_ca, root / "etc/ssl/certs/host-ca.crt")
    # The working tree as it is (not HEAD), without the build products.
    shutil.copytree(REPO, root / "src/edgeagent", ignore=shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "__pycache__", ".*_cache", "edgeagent-data", "build"))
    # A fresh procfs, not a bind mount of the host's /proc or /dev: removing the root later can
    # never reach into the host (debootstrap made the /dev nodes the root needs).
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root / "proc")], check=False)
        assert not os.path.ismount(root / "proc"), f"{root}/proc is still mounted"
        shutil.rmtree(root, ignore_errors=True)  # ~700 MB; nothing of the host is mounted in it


def test_installer_on_a_fresh_debian_12(debian: Path) -> None:
    pip_env = {"PIP_CERT": "/etc/ssl/certs/host-ca.crt"} if (
        debian / "etc/ssl/certs/host-ca.crt").is_file() else {}
    started = time.monotonic()
    result = _chroot(debian, "bash", "/src/edgeagent/scripts/install.sh",
                     "--source", "/src/edgeagent", env=pip_env)
    print(f"install.sh in the root: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "making a virtual environment in /opt/edgeagent (Python 3.11" in result.stdout

    # The venv, with one onnxruntime build (cpu: no NVIDIA GPU here) and LiteRT.
    assert (debian / "opt/edgeagent/pyvenv.cfg").is_file()
    frozen = _chroot(debian, "/opt/edgeagent/bin/python", "-m", "pip", "list",
                     "--format=freeze").stdout
    names = {line.split("==")[0].lower() for line in frozen.splitlines()}
    assert {"edgeagent", "onnxruntime", "ai-edge-litert"} <= names
    assert not names & {"onnxruntime-gpu", "onnx"}
    # The system Python is left alone.
    system = _chroot(debian, "python3", "-c", "import edgeagent")
    assert system.returncode != 0 and "No module named 'edgeagent'" in system.stderr
    assert not list((debian / "usr/local/lib").glob("python3*/dist-packages/*"))

    # The unit, against the venv; the starting config; the user.
    unit_path = "/etc/systemd/system/edgeagent.service"
    unit = (debian / unit_path.lstrip("/")).read_text()
    assert "ExecStart=/opt/edgeagent/bin/edgeagent run\n" in unit
    passwd = (debian / "etc/passwd").read_text()
    assert re.search(r"^edgeagent:x:\d+:\d+::/var/lib/edgeagent:/usr/sbin/nologin$", passwd,
                     re.MULTILINE), passwd
    check = _chroot(debian, "/opt/edgeagent/bin/edgeagent", "check-config")
    assert check.returncode == 0 and "/etc/edgeagent/agent.toml: OK" in check.stdout, check.stderr
    verify = _chroot(debian, "systemd-analyze", "verify", unit_path)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    security = _chroot(debian, "systemd-analyze", "security", "--offline=yes", unit_path)
    exposure = re.search(r"Overall exposure level for edgeagent\.service: (\d+\.\d+)",
                         security.stdout)
    assert exposure and float(exposure.group(1)) < 3.7, security.stdout[-500:]
    print(f"systemd-analyze security in the root: {exposure.group(1)}")
    _serve_from_the_venv(debian)


def _serve_from_the_venv(debian: Path) -> None:
    """Start the agent from the venv as the service user, as the unit would (its directories,
    its environment), with the shipped demo model configured as a local file."""
    for d in ("var/lib/edgeagent", "var/cache/edgeagent"):
        (debian / d).mkdir(parents=True, exist_ok=True)
        assert _chroot(debian, "chown", "edgeagent:edgeagent", f"/{d}").returncode == 0
    demo = "/opt/edgeagent/lib/python3.11/site-packages/edgeagent/demo.onnx"
    assert (debian / demo.lstrip("/")).is_file()
    with (debian / "etc/edgeagent/agent.toml").open("a") as f:
        f.write(f'\n[[models]]\nname = "demo"\npath = "{demo}"\n')
    port = free_port()
    env = {**CHROOT_ENV, "HOME": "/var/lib/edgeagent", "STATE_DIRECTORY": "/var/lib/edgeagent",
           "CACHE_DIRECTORY": "/var/cache/edgeagent",
           "EDGEAGENT_HTTP__LISTEN": f"127.0.0.1:{port}"}
    proc = subprocess.Popen(["chroot", "--userspec=edgeagent:edgeagent", str(debian),
                             "/opt/edgeagent/bin/edgeagent", "run"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the agent in the root never got ready"
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v2/models/demo/infer", json={"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "1"
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'onnxruntime_build="cpu"' in metrics and 'python="3.11.' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "edgeagent.app: stopped" in out
    assert (debian / "var/lib/edgeagent").stat().st_uid != 0  # state written as the user
