"""The HTTP application: Open Inference Protocol routes (KServe v2) with Triton's extensions.

Handlers are thin: they read the request within the configured limits, call the transport-free
services (scheduler, manager, repository) and encode what those return. Errors are raised as
:class:`~edgeagent.errors.EdgeAgentError` subclasses and turned into ``{"error": ...}`` with
their status by :mod:`edgeagent.api.errors`, the one place that maps them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from edgeagent.api.auth import RequestGuard
from edgeagent.api.codec import parse_json
from edgeagent.api.dataplane import DataPlane
from edgeagent.api.errors import (
    BadRequest,
    ErrorBoundary,
    handle_edgeagent_error,
    handle_http_exception,
    handle_unexpected,
)
from edgeagent.api.infer import InferEndpoint, infer_fast_path, parse_version, receive_body
from edgeagent.api.metrics import metrics_response, registry_for
from edgeagent.api.triton import server_metadata
from edgeagent.errors import EdgeAgentError

if TYPE_CHECKING:
    from edgeagent.api.services import Services

Handler = Callable[[Request], Awaitable[Response]]


async def read_body(request: Request, limit: int) -> bytearray:
    """The body of a request to a Starlette route, within ``limit`` (see :func:`receive_body`)."""
    return await receive_body(request.receive, request.headers.get("content-length"), limit)


def _version(request: Request) -> int | None:
    return parse_version(request.path_params["name"], request.path_params.get("version"))


class Api:
    """The route handlers, bound to the agent's services."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self.http = services.config.http
        self.plane = DataPlane(services)
        self.registry = registry_for(services)

    # ---- health and metadata ----------------------------------------------------------

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(server_metadata())

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        self.plane.server_ready()
        return JSONResponse({"ready": True})

    async def model_metadata(self, request: Request) -> Response:
        return JSONResponse(self.plane.model_metadata(request.path_params["name"],
                                                      _version(request)))

    async def model_ready(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.plane.model_ready(name, _version(request))
        return JSONResponse({"name": name, "ready": True})

    async def model_config(self, request: Request) -> Response:
        return JSONResponse(self.plane.model_config(request.path_params["name"],
                                                    _version(request)))

    # ---- statistics and metrics -------------------------------------------------------

    async def all_stats(self, request: Request) -> Response:
        return JSONResponse({"model_stats": self.plane.statistics(None, None)})

    async def model_stats(self, request: Request) -> Response:
        entries = self.plane.statistics(request.path_params["name"], _version(request))
        return JSONResponse({"model_stats": entries})

    async def metrics(self, request: Request) -> Response:
        return metrics_response(self.registry, request)

    async def agent_status(self, request: Request) -> Response:
        return JSONResponse(self.s.status())

    # ---- model repository extension ---------------------------------------------------

    async def _json_object(self, request: Request) -> dict[str, Any]:
        body = await read_body(request, self.http.max_request_bytes)
        if not body.strip():
            return {}
        payload = parse_json(body)
        if not isinstance(payload, dict):
            raise BadRequest("the request body must be a JSON object")
        return payload

    async def repository_index(self, request: Request) -> Response:
        payload = await self._json_object(request)
        ready_only = payload.get("ready", False)
        if not isinstance(ready_only, bool):
            raise BadRequest("'ready' must be true or false")
        return JSONResponse(self.plane.repository_index(ready_only))

    async def repository_load(self, request: Request) -> Response:
        name = request.path_params["name"]
        params = (await self._json_object(request)).get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest("'parameters' must be a JSON object")
        version = await self.plane.repository_load(name, params)
        return JSONResponse({"name": name, "version": str(version), "state": "READY"})

    async def repository_unload(self, request: Request) -> Response:
        name = request.path_params["name"]
        await self._json_object(request)  # read and check the body even if nothing in it is used
        await self.plane.repository_unload(name)
        return JSONResponse({"name": name, "state": "UNLOADED"})

    # ---- the operator's commands (admin channel, or the token) ----------------------------

    def _model_report(self, name: str) -> dict[str, Any]:
        serving = self.s.manager.ready(name)
        return {"name": name, "serving": self.s.manager.get(name).version if serving else None,
                **self.s.owner.describe(name)}

    async def agent_models(self, request: Request) -> Response:
        return JSONResponse({"models": [self._model_report(n) for n in self.s.owner.names()]})

    async def agent_pull(self, request: Request) -> Response:
        name = request.path_params["name"]
        payload = await self._json_object(request)
        version = payload.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                    or not 1 <= version < 2**63):
            raise BadRequest("'version' must be an integer >= 1, or null to follow the fleet "
                             "or the configuration again")
        if version is None:
            await self.s.owner.unpin(name)
        else:
            await self.s.owner.pin(name, version)
        return JSONResponse(self._model_report(name))

    async def agent_tune(self, request: Request) -> Response:
        """Tune a model now (``edgeagent tune``): NDJSON lines ``{"progress": ...}`` per
        candidate, then ``{"result": ...}`` (or ``{"error": ...}``). Refusals known before the
        search starts (unknown model, nothing serving) are plain JSON errors."""
        name = request.path_params["name"]
        await self._json_object(request)
        owner = self.s.owner
        owner.known(name)
        if not self.s.manager.ready(name):
            self.s.manager.get(name)  # raises ModelNotReady with the reason
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def progress(done: int, total: int, row: Any) -> None:
            queue.put_nowait({"progress": {"done": done, "total": total, **row.to_dict()}})

        async def run() -> None:
            try:
                result = await owner.tune(name, progress)
                queue.put_nowait({"result": result.to_dict(), "model": self._model_report(name)})
            except EdgeAgentError as exc:
                queue.put_nowait({"error": str(exc)})
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(run(), name=f"tune {name} (operator)")

        async def lines() -> AsyncIterator[bytes]:
            try:
                while (item := await queue.get()) is not None:
                    yield json.dumps(item).encode() + b"\n"
            finally:
                await task

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def agent_rollback(self, request: Request) -> Response:
        name = request.path_params["name"]
        await self._json_object(request)
        await self.s.owner.rollback(name)
        return JSONResponse(self._model_report(name))

    # ---- system shared memory extension -----------------------------------------------

    async def shm_status(self, request: Request) -> Response:
        return JSONResponse(self.s.shm.status(request.path_params.get("name", "")))

    async def shm_register(self, request: Request) -> Response:
        payload = await self._json_object(request)
        key = payload.get("key")
        offset = payload.get("offset", 0)
        byte_size = payload.get("byte_size")
        if not isinstance(key, str):
            raise BadRequest("'key' must be the shared memory object's key ('/NAME')")
        for field_name, value in (("offset", offset), ("byte_size", byte_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadRequest(f"'{field_name}' must be an integer")
        assert isinstance(byte_size, int)
        self.s.shm.register(request.path_params["name"], key, offset, byte_size)
        return JSONResponse({})

    async def shm_unregister(self, request: Request) -> Response:
        await self._json_object(request)
        self.s.shm.unregister(request.path_params.get("name", ""))
        return JSONResponse({})

    # ---- CUDA shared memory extension -------------------------------------------------

    async def cuda_status(self, request: Request) -> Response:
        return JSONResponse(self.s.shm.status(request.path_params.get("name", ""), "cuda"))

    async def cuda_register(self, request: Request) -> Response:
        payload = await self._json_object(request)
        handle = payload.get("raw_handle")
        b64 = handle.get("b64") if isinstance(handle, dict) else None
        if not isinstance(b64, str):
            raise BadRequest("'raw_handle' must be {\"b64\": <the base64 cudaIpcMemHandle_t>}")
        try:
            raw = base64.b64decode(b64, validate=True)
        except binascii.Error:
            raise BadRequest("'raw_handle.b64' is not base64") from None
        values = []
        for field_name in ("device_id", "byte_size"):
            value = payload.get(field_name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadRequest(f"'{field_name}' must be an integer")
            values.append(value)
        await asyncio.get_running_loop().run_in_executor(
            None, self.s.shm.register_cuda, request.path_params["name"], raw, values[0],
            values[1])
        return JSONResponse({})

    async def cuda_unregister(self, request: Request) -> Response:
        await self._json_object(request)
        self.s.shm.unregister(request.path_params.get("name", ""), "cuda")
        return JSONResponse({})


def _model_routes(suffix: str, handler: Handler | ASGIApp, method: str) -> list[Route]:
    """The same route with and without ``/versions/{version}``."""
    return [Route(f"/v2/models/{{name}}{suffix}", handler, methods=[method]),
            Route(f"/v2/models/{{name}}/versions/{{version}}{suffix}", handler, methods=[method])]


def build_app(services: Services, *, trusted: bool = False) -> ASGIApp:
    """The ASGI application serving the local API on ``services``.

    Every request passes the :class:`ErrorBoundary` (any unexpected exception: one 500, one
    log line) and the :class:`RequestGuard` (header size, token); inference requests then take
    the fast path to :class:`InferEndpoint`, the rest go through Starlette.

    Args:
        services: What the handlers call.
        trusted: The local admin channel: its socket's permissions authorise, so no token.
    """
    api = Api(services)
    infer = InferEndpoint(services)
    routes = [
        Route("/v2", api.server_metadata, methods=["GET"]),
        Route("/v2/health/live", api.live, methods=["GET"]),
        Route("/v2/health/ready", api.ready, methods=["GET"]),
        # Before /v2/models/{name}, which would otherwise take "stats" for a model name.
        Route("/v2/models/stats", api.all_stats, methods=["GET"]),
        *_model_routes("", api.model_metadata, "GET"),
        *_model_routes("/ready", api.model_ready, "GET"),
        *_model_routes("/config", api.model_config, "GET"),
        *_model_routes("/stats", api.model_stats, "GET"),
        # Reached only by methods other than POST (405): POSTs take the fast path.
        *_model_routes("/infer", infer, "POST"),
        Route("/v2/repository/index", api.repository_index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", api.repository_load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", api.repository_unload, methods=["POST"]),
        Route("/v2/systemsharedmemory/status", api.shm_status, methods=["GET"]),
        Route("/v2/systemsharedmemory/region/{name}/status", api.shm_status, methods=["GET"]),
        Route("/v2/systemsharedmemory/region/{name}/register", api.shm_register,
              methods=["POST"]),
        Route("/v2/systemsharedmemory/region/{name}/unregister", api.shm_unregister,
              methods=["POST"]),
        Route("/v2/systemsharedmemory/unregister", api.shm_unregister, methods=["POST"]),
        Route("/v2/cudasharedmemory/status", api.cuda_status, methods=["GET"]),
        Route("/v2/cudasharedmemory/region/{name}/status", api.cuda_status, methods=["GET"]),
        Route("/v2/cudasharedmemory/region/{name}/register", api.cuda_register,
              methods=["POST"]),
        Route("/v2/cudasharedmemory/region/{name}/unregister", api.cuda_unregister,
              methods=["POST"]),
        Route("/v2/cudasharedmemory/unregister", api.cuda_unregister, methods=["POST"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/v1/agent/status", api.agent_status, methods=["GET"]),
        Route("/v1/agent/models", api.agent_models, methods=["GET"]),
        Route("/v1/agent/models/{name}/pull", api.agent_pull, methods=["POST"]),
        Route("/v1/agent/models/{name}/rollback", api.agent_rollback, methods=["POST"]),
        Route("/v1/agent/models/{name}/tune", api.agent_tune, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={EdgeAgentError: handle_edgeagent_error,
                            HTTPException: handle_http_exception,
                            Exception: handle_unexpected},
    )
    return ErrorBoundary(RequestGuard(infer_fast_path(app, infer), token=services.token,
                                      max_header_bytes=services.config.http.max_header_bytes,
                                      trusted=trusted))
