"""``edgeagent run`` as systemd runs it: notify messages, watchdog rate, reload, graceful stop."""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests.onnx_models import mlp
from tests.service.agentproc import (
    AgentProcess,
    NotifyListener,
    count,
    free_port,
    infer_body,
    wait_ready_http,
    write_config,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    lst = NotifyListener()
    yield lst
    lst.close()


@pytest.fixture
def spawn() -> Iterator[list[AgentProcess]]:
    procs: list[AgentProcess] = []
    yield procs
    for p in procs:
        p.kill()


def _expected(model: Path, rows: int) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": np.full((rows, 64), 0.5, np.float32)})[0]
    return np.asarray(out)


def _infer(port: int, name: str, rows: int = 1, timeout: float = 60) -> httpx.Response:
    # A fresh connection per request, as independent clients would make.
    return httpx.post(f"http://127.0.0.1:{port}/v2/models/{name}/infer", json=infer_body(rows),
                      headers={"Connection": "close"}, timeout=timeout)


def _lines_with(messages: list[str], key: str) -> list[str]:
    return [line for m in messages for line in m.splitlines() if line.startswith(key)]


def test_ready_watchdog_reload_and_stop(  # noqa: PLR0915 - one agent, one story
        tmp_path: Path, listener: NotifyListener,
        spawn: list[AgentProcess]) -> None:
    port = free_port()
    m = mlp(tmp_path / "m.onnx")
    config = write_config(tmp_path / "agent.toml", tmp_path / "state", port, {"m": m})
    stderr = tmp_path / "stderr"
    stderr.touch()
    st = os.stat(stderr)  # the child's stderr is this file, as if it were the journal stream
    agent = AgentProcess(config, {"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "1000000",
                                  "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stderr)
    spawn.append(agent)

    start = listener.wait_for("READY=1")
    assert _lines_with(start, "STATUS=")[0].startswith("STATUS=starting: loading 1 model(s)")
    assert _lines_with(start, "STATUS=")[-1] == f"STATUS=serving 1/1 model(s) on 127.0.0.1:{port}"
    assert _infer(port, "m").status_code == 200

    # Pings are due every 0.5 s: about 6 in 3 s; the bounds only catch "none" and "flooding".
    pings = count(listener.collect(3.0), "WATCHDOG=1")
    assert 2 <= pings <= 20, pings

    # A model added to the file is served after SIGHUP.
    m2 = mlp(tmp_path / "m2.onnx", seed=1)
    write_config(config, tmp_path / "state", port, {"m": m, "m2": m2})
    agent.signal(signal.SIGHUP)
    reload = listener.wait_for("READY=1")
    assert _lines_with(reload, "RELOADING=1")
    assert _lines_with(reload, "MONOTONIC_USEC=")
    assert _lines_with(reload, "STATUS=")[-1].startswith("STATUS=serving 2/2 model(s)")
    assert _infer(port, "m2").status_code == 200

    # A model file replaced in place (same path, same configuration) is loaded on SIGHUP.
    before = _infer(port, "m2").json()["outputs"][0]["data"]
    os.replace(mlp(tmp_path / "m2-new.onnx", seed=2), m2)
    agent.signal(signal.SIGHUP)
    assert _lines_with(listener.wait_for("READY=1"), "RELOADING=1")
    out = _infer(port, "m2").json()["outputs"][0]
    assert out["data"] != before
    np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]),
                               _expected(m2, 1), atol=1e-5)

    # A bad file is reported and the running configuration kept.
    good = config.read_text()
    config.write_text(good + "\n[agent2]\nx = 1\n")
    agent.signal(signal.SIGHUP)
    failed = listener.wait_for("READY=1")
    assert "reload failed, running on the previous" in _lines_with(failed, "STATUS=")[-1]
    assert _infer(port, "m2").status_code == 200

    # What only a restart applies is reported and left alone.
    write_config(config, tmp_path / "state", free_port(), {"m": m})
    agent.signal(signal.SIGHUP)
    partial = listener.wait_for("READY=1")
    assert _lines_with(partial, "STATUS=")[-1].endswith("restart to apply: http.listen")
    assert _infer(port, "m").status_code == 200
    assert _infer(port, "m2").status_code == 404  # removed from the file: unloaded

    agent.signal(signal.SIGTERM)
    assert _lines_with(listener.wait_for("STOPPING=1"), "STOPPING=1")
    assert agent.wait() == 0

    log = agent.log().splitlines()
    assert log, "the agent logged nothing"
    assert all(re.match(r"<[0-7]>", line) for line in log), log  # journald priorities...
    assert not any(re.match(r"<\d>\d{4}-", line) for line in log)  # ...and no timestamps
    assert "<6>edgeagent.service.lifecycle: reloading the configuration" in log
    assert "<6>edgeagent.service.lifecycle: configuration reloaded: loaded: m2" in log
    assert any(line.startswith("<3>edgeagent.service.lifecycle: configuration not reloaded")
               for line in log)
    assert any(line.startswith("<4>") and "http.listen" in line for line in log)


def _classify(  # noqa: PLR0911 - one return per outcome
        response_or_error: httpx.Response | Exception, expected: np.ndarray) -> str:
    if isinstance(response_or_error, httpx.ConnectError):
        return "refused"  # the listener is closed
    if isinstance(response_or_error, httpx.RemoteProtocolError | httpx.ReadError):
        # Reset in the listen backlog: the server closed its socket before accepting it.
        return "unanswered"
    if isinstance(response_or_error, Exception):
        return f"bad: {response_or_error!r}"
    r = response_or_error
    if r.status_code == 503 and "error" in r.json():
        return "refused"
    if r.status_code != 200:
        return f"bad: {r.status_code} {r.text[:200]}"
    out = r.json()["outputs"][0]
    got = np.asarray(out["data"], np.float32).reshape(out["shape"])
    if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-4):
        return "bad: wrong answer"
    return "ok"


def test_sigterm_lets_requests_in_flight_finish(  # noqa: PLR0915 - one agent, one story
        tmp_path: Path, spawn: list[AgentProcess]) -> None:
    port = free_port()
    small = mlp(tmp_path / "m.onnx")
    # Wide enough that a large batch takes a noticeable time on a CPU: requests stay in flight.
    big = mlp(tmp_path / "big.onnx", n_hidden=8192)
    rows = 8192
    config = write_config(tmp_path / "agent.toml", tmp_path / "state", port,
                          {"m": small, "big": big})
    agent = AgentProcess(config, {}, tmp_path / "stderr")  # not under systemd: no notify socket
    spawn.append(agent)
    wait_ready_http(port, agent)
    small_expected, big_expected = _expected(small, 1), _expected(big, rows)

    stop = threading.Event()
    fast: list[str] = []
    slow: list[str] = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                result: httpx.Response | Exception = _infer(port, "m")
            except httpx.HTTPError as exc:
                result = exc
            fast.append(_classify(result, small_expected))

    def one_slow() -> None:
        try:
            result: httpx.Response | Exception = _infer(port, "big", rows)
        except httpx.HTTPError as exc:
            result = exc
        slow.append(_classify(result, big_expected))

    hammers = [threading.Thread(target=hammer) for _ in range(3)]
    for t in hammers:
        t.start()
    try:
        # Start two slow requests and wait until the agent reports both running: they are
        # accepted beyond doubt. If they finish before that is seen, try again.
        for _attempt in range(10):
            slow.clear()
            slows = [threading.Thread(target=one_slow) for _ in range(2)]
            for t in slows:
                t.start()
            seen = False
            while any(t.is_alive() for t in slows):
                status = httpx.get(f"http://127.0.0.1:{port}/v1/agent/status", timeout=30).json()
                big_status = next(m for m in status["models"] if m["name"] == "big")
                if big_status.get("in_flight") == 2:
                    seen = True
                    break
            if seen:
                break
            for t in slows:
                t.join()
        else:
            pytest.fail("never saw two slow requests in flight")
        agent.signal(signal.SIGTERM)
        for t in slows:
            t.join(120)
        assert slow == ["ok", "ok"]
        assert agent.wait() == 0
    finally:
        stop.set()
        for t in hammers:
            t.join(120)
    assert "ok" in fast
    assert not [r for r in fast if r.startswith("bad")], fast
    with pytest.raises(httpx.ConnectError):
        _infer(port, "m")
    assert "Traceback" not in agent.log()
