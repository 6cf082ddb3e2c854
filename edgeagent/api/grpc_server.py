"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` as Triton serves
it (``grpc_service.proto``), on the agent's own HTTP/2 transport (:mod:`edgeagent.api.http2`),
on the agent's event loop.

The servicer is thin, like the HTTP handlers: it checks the token, decodes the message, calls
the transport-free :class:`~edgeagent.api.dataplane.DataPlane` (the same scheduler, batching,
limits, statistics and metrics as HTTP) and encodes what it returns. The message classes are
Triton's own generated ones, from ``tritonclient.grpc`` (so the wire format is Triton's by
construction); they (and protobuf) are imported only when ``grpc.listen`` is set. grpcio is
never imported by the agent.

Errors map to gRPC status codes in one place (:func:`grpc_code`), from the HTTP status of the
same error, as Triton maps its own: 400/413 INVALID_ARGUMENT/RESOURCE_EXHAUSTED, 401
UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 NOT_FOUND, 503 UNAVAILABLE, 500 INTERNAL.

Token (``http.token_file``): every call needs ``authorization: Bearer <token>`` metadata; the
repository load and unload calls always need it (PERMISSION_DENIED when none is configured).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from edgeagent.api.dataplane import DataPlane
from edgeagent.api.errors import BadRequest, Forbidden, Unauthorized, status_of
from edgeagent.api.grpc_codec import decode_infer, encode_infer
from edgeagent.api.grpc_messages import model_config_pb2, service_pb2
from edgeagent.api.http2 import Call, GrpcHttp2Server, Method, RpcError, StatusCode
from edgeagent.api.infer import offload, parse_version
from edgeagent.api.protocol import connection_cap
from edgeagent.api.triton import server_metadata
from edgeagent.errors import EdgeAgentError
from edgeagent.runtime.shm import RegionExists, RegionForbidden

if TYPE_CHECKING:
    from edgeagent.api.services import Services

log = logging.getLogger(__name__)

#: Requests of one ModelStreamInfer stream running at once; the stream is read no further
#: until one finishes (back-pressure through gRPC's flow control).
STREAM_IN_FLIGHT = 64

_CODES = {400: StatusCode.INVALID_ARGUMENT, 401: StatusCode.UNAUTHENTICATED,
          403: StatusCode.PERMISSION_DENIED, 404: StatusCode.NOT_FOUND,
          413: StatusCode.RESOURCE_EXHAUSTED, 431: StatusCode.RESOURCE_EXHAUSTED,
          502: StatusCode.UNAVAILABLE, 503: StatusCode.UNAVAILABLE}

R = TypeVar("R")
Handler = Callable[["InferenceServicer", Any, Call], Awaitable[R]]


class Undecodable:
    """What a request that is not a valid message of its type parses to, so the method
    answers INVALID_ARGUMENT with the reason."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.message = f"the request is not a valid {type_name} message: {error}"


def _safe_parser(message_cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except DecodeError as exc:
            return Undecodable(message_cls.DESCRIPTOR.full_name, exc)

    return parse


def _methods(servicer: InferenceServicer) -> dict[bytes, Method]:
    """The service's methods the servicer serves, by path (others answer UNIMPLEMENTED)."""
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    methods: dict[bytes, Method] = {}
    for method in service.methods:
        handler = getattr(servicer, method.name, None)
        if handler is None:
            continue
        parse = _safe_parser(getattr(service_pb2, method.input_type.name))
        path = f"/{service.full_name}/{method.name}".encode()
        if method.client_streaming:
            methods[path] = Method(streaming=_streaming(handler, parse))
        else:
            methods[path] = Method(unary=_unary(handler, parse))
    return methods


async def serialize(message: Any) -> bytes:
    """A response message's bytes (a large one serialised in a worker thread)."""
    return bytes(await offload(message.ByteSize(), message.SerializeToString))


def _unary(handler: Callable[[Any, Call], Awaitable[Any]],
           parse: Callable[[bytes], Any]) -> Callable[[bytes, Call], Awaitable[bytes]]:
    async def call(data: bytes, context: Call) -> bytes:
        response = await handler(await offload(len(data), parse, data), context)
        return await serialize(response)

    return call


def _streaming(handler: Callable[[AsyncIterator[Any], Call], Awaitable[None]],
               parse: Callable[[bytes], Any]) -> Callable[[Call], Awaitable[None]]:
    async def call(context: Call) -> None:
        async def requests() -> AsyncIterator[Any]:
            while (data := await context.read()) is not None:
                yield await offload(len(data), parse, data)

        await handler(requests(), context)

    return call


def grpc_code(exc: EdgeAgentError) -> StatusCode:
    """The gRPC status code of an edgeagent error (the one place that decides it)."""
    if isinstance(exc, RegionExists):
        return StatusCode.ALREADY_EXISTS
    if isinstance(exc, RegionForbidden):
        return StatusCode.PERMISSION_DENIED
    return _CODES.get(status_of(exc), StatusCode.INTERNAL)


def _version(name: str, raw: str) -> int | None:
    return parse_version(name, raw or None)


def _rpc(*, repository: bool = False) -> Callable[[Handler[R]], Handler[R]]:
    """A servicer method: token checked first, every error answered with its status code."""

    def wrap(method: Handler[R]) -> Handler[R]:
        @functools.wraps(method)
        async def call(self: InferenceServicer, request: Any, context: Call) -> R:
            try:
                self.check_token(context, repository)
                if isinstance(request, Undecodable):
                    raise BadRequest(request.message)
                return await method(self, request, context)
            except EdgeAgentError as exc:
                if status_of(exc) >= 500 and status_of(exc) != 503:
                    log.error("gRPC %s failed: %s", method.__name__, exc)
                raise RpcError(grpc_code(exc), str(exc)) from None
            except (asyncio.CancelledError, RpcError):
                raise
            except Exception as exc:
                log.exception("gRPC %s failed", method.__name__)
                raise RpcError(StatusCode.INTERNAL,
                               f"internal error: {type(exc).__name__}: {exc}") from None

        return call

    return wrap


class InferenceServicer:
    """``inference.GRPCInferenceService`` on the agent's services."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self.plane = DataPlane(services)
        self._token = services.token.encode() if services.token else None

    def check_token(self, context: Call, repository: bool) -> None:
        """The HTTP token rules, on the ``authorization`` metadata."""
        if self._token is None:
            if repository:
                raise Forbidden("configure http.token_file to use the model repository API")
            return
        given = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                # Stripped, as HTTP header values are (perf_analyzer's -H keeps the space).
                given = (value if isinstance(value, str) else value.decode("latin-1")).strip()
                break
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("this call needs 'authorization: Bearer <token>' metadata "
                               "(the token in http.token_file)")
        if not hmac.compare_digest(token.strip().encode(), self._token):
            raise Unauthorized("wrong bearer token")

    # ---- health and metadata ----------------------------------------------------------

    @_rpc()
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    @_rpc()
    async def ServerReady(self, request: Any, context: Any) -> Any:
        try:
            self.plane.server_ready()
        except EdgeAgentError:
            return service_pb2.ServerReadyResponse(ready=False)
        return service_pb2.ServerReadyResponse(ready=True)

    @_rpc()
    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            self.plane.model_ready(request.name, _version(request.name, request.version))
        except EdgeAgentError:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    @_rpc()
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return json_format.ParseDict(server_metadata(), service_pb2.ServerMetadataResponse())

    @_rpc()
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        meta = self.plane.model_metadata(request.name, _version(request.name, request.version))
        return json_format.ParseDict(meta, service_pb2.ModelMetadataResponse(),
                                     ignore_unknown_fields=True)

    @_rpc()
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        config = self.plane.model_config(request.name, _version(request.name, request.version))
        message = json_format.ParseDict(config, model_config_pb2.ModelConfig(),
                                        ignore_unknown_fields=True)
        return service_pb2.ModelConfigResponse(config=message)

    @_rpc()
    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        stats = self.plane.statistics(request.name or None,
                                      _version(request.name, request.version))
        return json_format.ParseDict({"model_stats": stats},
                                     service_pb2.ModelStatisticsResponse(),
                                     ignore_unknown_fields=True)

    # ---- model repository -------------------------------------------------------------

    @_rpc()
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        entries = self.plane.repository_index(request.ready)
        return json_format.ParseDict({"models": entries}, service_pb2.RepositoryIndexResponse(),
                                     ignore_unknown_fields=True)

    @_rpc(repository=True)
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        await self.plane.repository_load(request.model_name, request.parameters.keys())
        return service_pb2.RepositoryModelLoadResponse()

    @_rpc(repository=True)
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await self.plane.repository_unload(request.model_name)
        return service_pb2.RepositoryModelUnloadResponse()

    # ---- system shared memory ---------------------------------------------------------

    @_rpc()
    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        response = service_pb2.SystemSharedMemoryStatusResponse()
        for region in self.s.shm.status(request.name):
            json_format.ParseDict(region, response.regions[str(region["name"])])
        return response

    @_rpc()
    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        self.s.shm.register(request.name, request.key, request.offset, request.byte_size)
        return service_pb2.SystemSharedMemoryRegisterResponse()

    @_rpc()
    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        self.s.shm.unregister(request.name)
        return service_pb2.SystemSharedMemoryUnregisterResponse()

    # ---- CUDA shared memory -----------------------------------------------------------

    @_rpc()
    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        response = service_pb2.CudaSharedMemoryStatusResponse()
        for region in self.s.shm.status(request.name, "cuda"):
            json_format.ParseDict(region, response.regions[str(region["name"])])
        return response

    @_rpc()
    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        await asyncio.get_running_loop().run_in_executor(
            None, self.s.shm.register_cuda, request.name, request.raw_handle,
            request.device_id, request.byte_size)
        return service_pb2.CudaSharedMemoryRegisterResponse()

    @_rpc()
    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        self.s.shm.unregister(request.name, "cuda")
        return service_pb2.CudaSharedMemoryUnregisterResponse()

    # ---- inference --------------------------------------------------------------------

    async def _infer(self, request: Any) -> Any:
        name = request.model_name
        version = _version(name, request.model_version)
        self.plane.admit(name, version)
        call = decode_infer(request, self.s.config.http.max_tensor_elements)
        mv, outputs = await self.plane.infer(name, version, call)
        return encode_infer(service_pb2.ModelInferResponse, name, mv.version, request.id,
                            outputs=outputs, call=call)

    @_rpc()
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        return await self._infer(request)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[Any],
                               context: Call) -> None:
        """Requests of one stream run concurrently (up to :data:`STREAM_IN_FLIGHT`); each
        answer, or its error in ``error_message``, is written when it is ready (Triton's
        stream: a failed request does not end the stream)."""
        try:
            self.check_token(context, repository=False)
        except EdgeAgentError as exc:
            raise RpcError(grpc_code(exc), str(exc)) from None
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT)
        write_lock = asyncio.Lock()
        tasks: set[asyncio.Task[None]] = set()

        async def answer(request: Any) -> None:
            try:
                if isinstance(request, Undecodable):
                    await _write(service_pb2.ModelStreamInferResponse(
                        error_message=request.message))
                    return
                try:
                    response = service_pb2.ModelStreamInferResponse(
                        infer_response=await self._infer(request))
                except EdgeAgentError as exc:
                    response = service_pb2.ModelStreamInferResponse(
                        error_message=str(exc),
                        infer_response=service_pb2.ModelInferResponse(
                            model_name=request.model_name, id=request.id))
                except Exception as exc:
                    log.exception("gRPC stream request to model %s failed", request.model_name)
                    response = service_pb2.ModelStreamInferResponse(
                        error_message=f"internal error: {type(exc).__name__}: {exc}",
                        infer_response=service_pb2.ModelInferResponse(
                            model_name=request.model_name, id=request.id))
                await _write(response)
            finally:
                slots.release()

        async def _write(response: Any) -> None:
            async with write_lock:
                await context.write(await serialize(response))

        try:
            async for request in request_iterator:
                await slots.acquire()
                task = asyncio.create_task(answer(request), name="edgeagent-grpc-stream")
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()


class GrpcServer:
    """The gRPC listener: :meth:`start`, then :meth:`stop` (requests in flight finish)."""

    def __init__(self, services: Services, listen: str) -> None:
        self.listen = listen
        http = services.config.http
        self._server = GrpcHttp2Server(
            _methods(InferenceServicer(services)), max_message_bytes=http.max_request_bytes,
            # As each HTTP listener's: below the open-file limit, with room for the rest.
            max_connections=connection_cap(http.max_connections),
            header_timeout_s=http.header_timeout_s,
            body_timeout_s=http.body_timeout_s)

    def parties(self) -> int:
        """Connections open, counting each call of a connection with several open."""
        return self._server.parties()

    async def start(self) -> None:
        """Bind and start serving.

        Raises:
            EdgeAgentError: the address cannot be bound.
        """
        await self._server.start(self.listen)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting calls; those in flight get ``grace_s`` to finish."""
        await self._server.stop(grace_s)
