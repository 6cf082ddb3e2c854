"""The HTTP transport's one boundary: a bug anywhere behind it is a 500 naming a request id,
logged exactly once with that id (no second traceback from the server), and the agent keeps
serving."""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import httpx
import pytest

from tests.api.conftest import AgentThread


def _records_naming(caplog: pytest.LogCaptureFixture, rid: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if rid in r.getMessage()]


def _boom(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise RuntimeError("a bug behind the route")


@pytest.mark.parametrize(("method", "path", "target"), [
    ("GET", "/v2/models/mlp/stats", "scheduler.stats"),  # through Starlette's routing
    ("POST", "/v2/models/mlp/infer", "scheduler.infer"),  # through the infer fast path
    ("GET", "/v1/agent/status", "services.status"),
])
def test_a_bug_is_one_500_and_one_log_line(agent: AgentThread, caplog: pytest.LogCaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch, method: str,
                                           path: str, target: str) -> None:
    owner_name, attr = target.split(".")
    owner = getattr(agent.agent, owner_name)
    monkeypatch.setattr(owner, attr, _boom)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                        "data": [0.5] * 64}]}
    with httpx.Client(base_url=agent.url, headers=agent.headers, timeout=30) as c:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            r = c.request(method, path, json=body if method == "POST" else None)
        assert r.status_code == 500, r.text
        rid = r.json()["request_id"]
        assert rid in r.json()["error"]
        assert r.headers["x-request-id"] == rid
        errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
        assert len(errors) == 1, [e.getMessage() for e in errors]
        assert errors[0] in _records_naming(caplog, rid)
        assert errors[0].exc_info is not None  # with its traceback
        monkeypatch.undo()
        assert c.get("/v2/models/mlp").status_code == 200
