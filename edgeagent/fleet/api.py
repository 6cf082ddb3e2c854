"""The controller's JSON API (Starlette): inventory, telemetry, rollouts, pins.

Every route but ``GET /v1/fleet/health`` needs ``Authorization: Bearer TOKEN``. Errors are
``{"error": "..."}`` with 400 (bad request), 401 (no or wrong token), 404 (no such thing), 409
(conflicts with the state), 503 (broker or database unavailable). ``docs/fleet.md`` lists the
routes; the ``edgeagent fleet`` commands and the web console are its clients. Handlers are thin:
they parse, call the controller in a worker thread (the database is blocking), and answer.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from edgeagent.errors import EdgeAgentError
from edgeagent.fleet.controller import FleetController
from edgeagent.fleet.rollouts import RolloutRefused
from edgeagent.fleet.store import StoreError

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
MAX_PAGE = 1000


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status, media_type="application/json")


class TokenGuard:
    """Refuses every request without the bearer token (health excepted)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/v1/fleet/health":
            given = dict(scope.get("headers", ())).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                reply = json_response({"error": "missing or wrong token: send "
                                                "'Authorization: Bearer TOKEN' (the token is "
                                                "in the controller's api.token_file)"}, 401)
                reply.headers["WWW-Authenticate"] = "Bearer"
                await reply(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _int_arg(request: Request, name: str, default: int | None, low: int = 0,
             high: int = 2**62) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name}: expected an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name}: expected {low} to {high}, got {value}")
    return value


async def _body(request: Request) -> dict[str, Any]:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
    if not raw:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body: expected a JSON object")
    return body


def _target(body: dict[str, Any]) -> str:
    group, fleet = body.get("group"), body.get("fleet")
    if (group is None) == (not fleet):
        raise ApiError(400, "give exactly one of 'group' (a name) or 'fleet': true")
    if group is not None and not isinstance(group, str):
        raise ApiError(400, f"group: expected a name, got {group!r}")
    return f"group:{group}" if group is not None else "fleet"


def build_app(c: FleetController, token: str) -> ASGIApp:  # noqa: PLR0915 - one line per route
    """The API application for one controller replica."""
    inv = c.config.inventory

    def route(fn: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:  # noqa: PLR0911 - the one error map
            try:
                result = await fn(request)
            except ApiError as exc:
                return json_response({"error": str(exc)}, exc.status)
            except RolloutRefused as exc:
                return json_response({"error": str(exc)}, exc.status)
            except StoreError as exc:
                return json_response({"error": str(exc)}, 503)
            except EdgeAgentError as exc:
                return json_response({"error": str(exc)}, 400)
            except Exception:
                log.exception("API %s %s failed", request.method, request.url.path)
                return json_response({"error": "internal error (see the controller's log)"},
                                     500)
            if isinstance(result, Response):
                return result
            return json_response(result)

        return handler

    async def health(_r: Request) -> Any:
        return {"ok": True, "broker_connected": c.broker.connected.is_set()}

    async def status(_r: Request) -> Any:
        return await run_in_threadpool(c.status)

    async def devices(r: Request) -> Any:
        limit = _int_arg(r, "limit", 100, 1, MAX_PAGE) or 100
        version = _int_arg(r, "version", None, 0)
        state = r.query_params.get("state")
        if state not in (None, "online", "offline", "stopped", "silent", "unknown"):
            raise ApiError(400, f"state: expected online, offline, stopped, silent or unknown, "
                                f"got {state!r}")
        after = r.query_params.get("after", "")
        rows = await run_in_threadpool(
            c.store.devices, group=r.query_params.get("group"),
            model=r.query_params.get("model"), version=version, state=state, after=after,
            limit=limit, now=time.time(), offline_after_s=inv.offline_after_s)
        nxt = rows[-1]["device_id"] if rows and len(rows) == limit else None
        return {"devices": rows, "next": nxt}

    async def device(r: Request) -> Any:
        found = await run_in_threadpool(c.store.device, r.path_params["device_id"])
        if found is None:
            raise ApiError(404, f"no device {r.path_params['device_id']!r} in the inventory")
        return found

    async def telemetry(r: Request) -> Any:
        window = _int_arg(r, "window_s", int(inv.telemetry_window_s), 1, 10**9) or 1
        limit = _int_arg(r, "limit", inv.telemetry_max_points, 1, 10_000) or 1
        rows = await run_in_threadpool(c.store.telemetry, r.path_params["device_id"],
                                       time.time() - window, limit)
        return {"device_id": r.path_params["device_id"], "window_s": window, "points": rows}

    async def groups(_r: Request) -> Any:
        return {"groups": await run_in_threadpool(c.store.groups)}

    async def pin(r: Request) -> Any:
        body = await _body(r)
        return await run_in_threadpool(c.pin, r.path_params["device_id"],
                                       r.path_params["model"], body.get("version"))

    async def unpin(r: Request) -> Any:
        return await run_in_threadpool(c.pin, r.path_params["device_id"],
                                       r.path_params["model"], None)

    async def rollouts(r: Request) -> Any:
        active = r.query_params.get("active") in ("1", "true")
        limit = _int_arg(r, "limit", 50, 1, MAX_PAGE) or 50
        rows = await run_in_threadpool(c.store.rollouts, active, limit or 50)
        return {"rollouts": [await run_in_threadpool(c.engine.describe, x["rollout_id"])
                             for x in rows]}

    def _options(body: dict[str, Any]) -> dict[str, Any]:
        known = {"model", "version", "group", "fleet", "waves", "min_devices", "max_failures",
                 "wave_timeout_s"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return {k: body[k] for k in ("waves", "min_devices", "max_failures", "wave_timeout_s")
                if body.get(k) is not None}

    async def start(r: Request) -> Any:
        body = await _body(r)
        options = _options(body)
        result = await run_in_threadpool(lambda: c.engine.create(
            body.get("model"), body.get("version"), _target(body), **options))  # type: ignore[arg-type]
        return json_response(result, 201)

    async def rollback(r: Request) -> Any:
        body = await _body(r)
        options = _options(body)
        result = await run_in_threadpool(lambda: c.engine.rollback(
            body.get("model"), _target(body), **options))  # type: ignore[arg-type]
        return json_response(result, 201)

    async def show(r: Request) -> Any:
        return await run_in_threadpool(c.engine.describe, r.path_params["rollout_id"])

    async def act(r: Request) -> Any:
        return await run_in_threadpool(c.engine.act, r.path_params["rollout_id"],
                                       r.path_params["action"])

    routes = [
        Route("/v1/fleet/health", route(health)),
        Route("/v1/fleet/status", route(status)),
        Route("/v1/fleet/devices", route(devices)),
        Route("/v1/fleet/devices/{device_id}", route(device)),
        Route("/v1/fleet/devices/{device_id}/telemetry", route(telemetry)),
        Route("/v1/fleet/devices/{device_id}/pins/{model}", route(pin), methods=["PUT"]),
        Route("/v1/fleet/devices/{device_id}/pins/{model}", route(unpin), methods=["DELETE"]),
        Route("/v1/fleet/groups", route(groups)),
        Route("/v1/fleet/rollouts", route(rollouts)),
        Route("/v1/fleet/rollouts", route(start), methods=["POST"]),
        Route("/v1/fleet/rollouts/{rollout_id}", route(show)),
        Route("/v1/fleet/rollouts/{rollout_id}/{action}", route(act), methods=["POST"]),
        Route("/v1/fleet/rollbacks", route(rollback), methods=["POST"]),
    ]
    return TokenGuard(Starlette(routes=routes), token)
