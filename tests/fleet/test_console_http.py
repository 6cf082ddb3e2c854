"""The console's server side over plain HTTP: sign-in, the cookie gate, CSRF and Origin checks,
security headers, and the device-list filters it relies on (a real controller process)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from benchmarks.console import fill_inventory
from edgeagent.fleet.console.app import group_errors
from tests.fleet.conftest import Controller

OPEN: list[httpx.Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Any:
    yield
    while OPEN:
        OPEN.pop().close()


def client_for(c: Controller, **kw: Any) -> httpx.Client:
    client = httpx.Client(base_url=c.url, timeout=30, **kw)
    OPEN.append(client)
    return client


def sign_in(c: Controller, token: str | None = None) -> httpx.Client:
    client = client_for(c, headers={"Origin": c.url})
    r = client.post("/console/login", data={"token": c.token if token is None else token})
    if token is None:
        assert r.status_code == 303 and r.headers["location"] == "/console/", r.text
    return client


def test_sign_in_sets_a_strict_http_only_cookie(mosquitto: Any, controllers: Any) -> None:
    c: Controller = controllers(mosquitto).start()
    anon = client_for(c)
    assert anon.get("/").headers["location"] == "/console/"
    r = anon.get("/console/")
    assert r.status_code == 303 and r.headers["location"] == "/console/login"
    page = anon.get("/console/login")
    assert page.status_code == 200 and 'name="token"' in page.text
    assert c.token not in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"

    client = client_for(c, headers={"Origin": c.url})
    r = client.post("/console/login", data={"token": c.token})
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert c.token not in cookie
    shell = client.get("/console/")
    assert shell.status_code == 200 and "/console/static/console.js" in shell.text
    assert "<script>" not in shell.text and c.token not in shell.text  # no inline script
    js = client.get("/console/static/console.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert client.get("/console/static/nope.js").status_code == 404
    assert client.get("/console/static/..%2Fapp.py").status_code == 404
    # The cookie stands for the token on the API.
    assert client.get("/v1/fleet/status").status_code == 200
    csrf = client.get("/console/api/session").json()["csrf"]
    assert len(csrf) == 64
    # Sign out: the cookie is cleared.
    out = client.post("/console/logout", headers={"X-CSRF-Token": csrf})
    assert out.status_code == 200 and 'edgeagent_console=""' in out.headers["set-cookie"]


def test_a_wrong_token_is_refused(mosquitto: Any, controllers: Any) -> None:
    c: Controller = controllers(mosquitto).start()
    for token in ("", "wrong-token-wrong-token", c.token + "x", c.token[:-1]):
        client = sign_in(c, token)
        r = client.post("/console/login", data={"token": token})
        assert r.status_code == 401 and "Wrong token" in r.text
        assert "set-cookie" not in r.headers
        assert client.get("/v1/fleet/status").status_code == 401
        assert client.get("/console/api/session").status_code == 401
    # A forged or tampered cookie is no session.
    client = sign_in(c)
    good = client.cookies["edgeagent_console"]
    nonce, expires, mac = good.split(".")
    for bad in (f"{nonce}x.{expires}.{mac}", f"{nonce}.{int(expires) + 1}.{mac}",
                f"{nonce}.{expires}.{'0' * 64}", "garbage", f"{nonce}.{int(time.time()) - 5}.x"):
        forged = client_for(c, cookies={"edgeagent_console": bad})
        assert forged.get("/v1/fleet/status").status_code == 401
        assert forged.get("/console/").status_code == 303
    # An oversized sign-in form is refused before it is read whole.
    client = sign_in(c, "x")
    r = client.post("/console/login", content=b"token=" + b"a" * 10_000,
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413 and "set-cookie" not in r.headers
    r = client.post("/console/login", content=b"\xff\xfe=\x00", headers={
        "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 401
    # Sign-in from a foreign page (login CSRF) is refused even with the right token.
    r = httpx.post(f"{c.url}/console/login", data={"token": c.token},
                   headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    r = httpx.post(f"{c.url}/console/login", data={"token": c.token})  # no Origin at all
    assert r.status_code == 403


def test_actions_need_the_csrf_token_and_the_console_origin(mosquitto: Any,
                                                            controllers: Any) -> None:
    c: Controller = controllers(mosquitto).start()
    client = sign_in(c)
    csrf = client.get("/console/api/session").json()["csrf"]
    body = {"model": "mlp", "version": 2, "fleet": True}
    cases = [({}, "X-CSRF-Token"), ({"X-CSRF-Token": "0" * 64}, "X-CSRF-Token"),
             ({"X-CSRF-Token": csrf, "Origin": "http://evil.example"}, "origin"),
             ({"X-CSRF-Token": csrf, "Origin": ""}, "origin")]
    for headers, why in cases:
        r = client.post("/v1/fleet/rollouts", json=body, headers=headers)
        assert r.status_code == 403 and why in r.json()["error"], r.text
        r = client.put("/v1/fleet/devices/d1/pins/mlp", json={"version": 3}, headers=headers)
        assert r.status_code == 403
        r = client.delete("/v1/fleet/devices/d1/pins/mlp", headers=headers)
        assert r.status_code == 403
    assert c.get("/v1/fleet/rollouts")["rollouts"] == []  # nothing started
    # With both, the request reaches the API (which refuses it on its own terms: no devices).
    r = client.post("/v1/fleet/rollouts", json=body, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 400 and "no devices" in r.json()["error"]
    # A session signed under another token is worth nothing here.
    from edgeagent.fleet.console.auth import Sessions
    other = client_for(c, cookies={"edgeagent_console": Sessions("x" * 32).issue()})
    assert other.get("/console/api/session").status_code == 401
    assert other.get("/v1/fleet/status").status_code == 401


def test_device_filters_count_and_paginate(mosquitto: Any, controllers: Any) -> None:
    c: Controller = controllers(mosquitto).start()
    fill_inventory(str(c.dir / "fleet.db"), 1200)
    every = c.get("/v1/fleet/devices?total=1&limit=1")
    assert every["total"] == 1200 and every["next"] == "dev-00000"
    expect = {"profile=jetson": 400, "group=g1": 300, "model=mlp&version=2": 600,
              "state=offline": 120, "error=OUT%20OF%20memory": 13, "error=%25": 0,
              "error=_": 0, "profile=jetson&group=g0&state=online": 80}
    for query, n in expect.items():
        page = c.get(f"/v1/fleet/devices?{query}&total=1&limit=1000")
        assert page["total"] == n == len(page["devices"]), query
    # Pages in id order, no repeats, no gaps.
    seen: list[str] = []
    after = ""
    while True:
        page = c.get(f"/v1/fleet/devices?profile=cpu&limit=300&after={after}")
        seen += [d["device_id"] for d in page["devices"]]
        if page["next"] is None:
            break
        after = page["next"]
    assert len(seen) == 800 == len(set(seen)) and seen == sorted(seen)
    status = c.get("/v1/fleet/status")["inventory"]
    assert status["profiles"] == {"cpu": 800, "jetson": 400}
    assert status["failing_models"] == {"mlp": 13}
    assert status["models"]["mlp"]["decided"] == {"1": {"config": 600}, "2": {"config": 600}}
    # Bad filters are refused with the parameter named; nothing else changes.
    for query, why in (("version=two", "version: expected an integer"),
                       ("state=asleep", "state: expected online"),
                       ("limit=0", "limit: expected 1 to 1000")):
        status_code, body = c.api("GET", f"/v1/fleet/devices?{query}&total=1")
        assert status_code == 400 and why in body["error"], body


def test_errors_are_grouped_by_the_wave_that_reached_the_device() -> None:
    waves = [{"threshold": 100}, {"threshold": 5000}, {"threshold": 10000}]
    failed = [(50, "oom"), (99, "oom"), (100, "bad input"), (4999, "oom"), (9000, ""),
              (9001, "")]
    assert group_errors(waves, failed) == [
        {"wave": 1, "errors": [{"error": "oom", "devices": 2}]},
        {"wave": 2, "errors": [{"error": "bad input", "devices": 1},
                               {"error": "oom", "devices": 1}]},
        {"wave": 3, "errors": [{"error": "(no error text)", "devices": 2}]}]
    assert group_errors([], [(5, "x")]) == []


def test_the_grouped_errors_need_a_session_or_the_token(mosquitto: Any, controllers: Any) -> None:
    c: Controller = controllers(mosquitto).start()
    anon = client_for(c)
    assert anon.get("/console/api/rollouts/r-1/errors").status_code == 401
    wrong = client_for(c, headers={"Authorization": "Bearer wrong-token-wrong-token"})
    assert wrong.get("/console/api/rollouts/r-1/errors").status_code == 401
    status, body = c.api("GET", "/console/api/rollouts/r-1/errors")
    assert status == 404 and "no rollout 'r-1'" in body["error"]
