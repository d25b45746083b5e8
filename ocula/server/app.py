"""The OpenAI-compatible HTTP server: FastAPI routes over the engine's asyncio API.

    app = create_app(AsyncLLMEngine(engine), processor, ServerConfig(served_model_name="tiny"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: `POST /v1/chat/completions` (JSON or SSE stream), `GET /v1/models`, `GET /health`, `GET /metrics`.

Notable features:
- errors always use OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with the right status
  (400 malformed request / unreadable media, 401 bad key, 404 unknown model or route, 413 too large, 503
  overloaded); an unexpected failure is a 500 with a generic message (the traceback goes to the log only);
- the request body is read under a byte cap before any parsing; media follow the `MediaPolicy`;
- a stream starts only after the engine accepted the request and produced its first output, so a
  request that can never fit gets a real status code instead of a broken stream;
- a client that disconnects (while waiting, while streaming or while a non-streamed answer is being
  generated) aborts its request: the engine frees its KV blocks at the next step;
- more than `max_pending_requests` requests in flight -> 503, so a burst queues boundedly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ocula.errors import (
    ConfigError,
    MediaError,
    MediaTooLargeError,
    OculaError,
    PlaceholderMismatchError,
    RequestTooLargeError,
    UnsupportedFeatureError,
)
from ocula.server.chat import ChatPreparer, MediaLimits, to_engine_media
from ocula.server.metrics import ServerMetrics
from ocula.server.protocol import ChatCompletionRequest, ErrorInfo, ErrorResponse, ModelCard, ModelList
from ocula.server.responses import CompletionStream, build_completion
from ocula.server.security import MediaPolicy

logger = logging.getLogger("ocula.server")


@dataclass
class ServerConfig:
    served_model_name: str = "ocula"
    api_key: str | None = None                 # None: no authentication
    max_request_bytes: int = 32 * 1024 * 1024  # whole JSON body (data: URIs included)
    max_pending_requests: int = 256            # in-flight chat requests before 503
    default_max_tokens: int | None = None      # None: up to max_model_len
    max_model_len: int | None = None           # reported by /v1/models
    policy: MediaPolicy = field(default_factory=MediaPolicy)
    limits: MediaLimits = field(default_factory=MediaLimits)
    processor_kwargs: dict[str, Any] = field(default_factory=dict)  # call-time processor options


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def api_error(exc: BaseException) -> APIError:
    """The HTTP error a failure becomes (user mistakes: 4xx with the typed message)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (RequestTooLargeError, MediaTooLargeError)):
        return APIError(413, str(exc), code="request_too_large")
    if isinstance(exc, MediaError):
        return APIError(400, str(exc), code="invalid_media")
    if isinstance(exc, UnsupportedFeatureError):
        return APIError(400, str(exc), code="unsupported_parameter")
    if isinstance(exc, (ConfigError, PlaceholderMismatchError, OculaError, jinja2.TemplateError)):
        return APIError(400, str(exc), code="invalid_request")
    if isinstance(exc, ValidationError):
        return APIError(400, _validation_message(exc), code="invalid_request")
    logger.exception("unexpected error while serving a request", exc_info=exc)
    return APIError(500, "The server failed to handle this request; see the server log.", "server_error")


def _validation_message(exc: ValidationError) -> str:
    problems = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]]
    return "Invalid request: " + "; ".join(problems)


class Server:
    """Request handling shared by the routes: auth, admission, preparation, generation."""

    def __init__(self, engine: Any, processor: Any, config: ServerConfig):
        self.engine = engine                    # AsyncLLMEngine
        self.processor = processor
        self.config = config
        self.preparer = ChatPreparer(processor, config.policy, config.limits, config.processor_kwargs)
        self.metrics = ServerMetrics()

    def check_key(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.config.api_key.encode()):
            raise APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    async def read_body(self, request: Request) -> ChatCompletionRequest:
        cap = self.config.max_request_bytes
        if int(request.headers.get("content-length") or 0) > cap:
            raise APIError(413, f"The request body is larger than the server's limit of {cap} bytes.",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise APIError(413, f"The request body is larger than the server's limit of {cap} bytes.",
                               code="request_too_large")
            chunks.append(chunk)
        try:
            return ChatCompletionRequest.model_validate_json(b"".join(chunks))
        except ValidationError as exc:
            raise api_error(exc) from None

    def check_model(self, name: str) -> None:
        if name != self.config.served_model_name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves "
                                f"{self.config.served_model_name!r} (see GET /v1/models).",
                           code="model_not_found", param="model")

    def check_context(self, prompt_tokens: int, max_tokens: int | None) -> None:
        """An explicit max_tokens the context cannot hold is the client's mistake: 400, as OpenAI answers.
        Without one, the answer may use whatever room the prompt leaves (or --default-max-tokens); a prompt
        that alone fills the context is the engine's 413."""
        context = self.engine.engine.config.max_model_len
        if max_tokens is not None and prompt_tokens < context < prompt_tokens + max_tokens:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you "
                                f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
                                f"{max_tokens} in the completion). Please reduce the length of the messages or "
                                "completion.", code="context_length_exceeded", param="max_tokens")

    async def chat(self, request: Request) -> Response:
        self.check_key(request)
        body = await self.read_body(request)
        self.check_model(body.model)
        if self.metrics.in_flight >= self.config.max_pending_requests:
            raise APIError(503, "The server is overloaded; retry later.", "server_error", "overloaded")
        self.metrics.in_flight += 1
        stream, owned = None, True  # until a streaming response takes the request over
        try:
            params = body.to_sampling_params(self.config.default_max_tokens)
            prepared = await cancel_on_disconnect(request, self.preparer.prepare_async(body.messages))
            self.check_context(len(prepared.prompt_token_ids), body.max_completion_tokens or body.max_tokens)
            stream = CompletionStream(self.engine, body, self.processor.tokenizer, prepared.prompt_token_ids,
                                      params, to_engine_media(prepared.processed))
            first = await cancel_on_disconnect(request, stream.start())
            if body.stream:
                owned = False
                return EventStream(self._events(stream, first), on_close=lambda: self._finish(stream),
                                   media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            final = await cancel_on_disconnect(request, stream.final(first))
            return JSONResponse(build_completion(stream, final).model_dump(exclude_none=True))
        finally:
            if owned:
                await self._finish(stream)

    async def _events(self, stream: CompletionStream, first: Any) -> AsyncIterator[str]:
        try:
            async for event in stream.events(first):
                yield event
        except Exception as exc:  # noqa: BLE001 - the status line is already sent: report in the stream
            error = api_error(exc)
            yield _sse({"error": {"message": error.message, "type": error.kind, "code": error.code}})
        yield "data: [DONE]\n\n"

    async def _finish(self, stream: CompletionStream | None) -> None:
        """Once per request: close the engine stream (aborting it if unfinished) and account it."""
        self.metrics.in_flight -= 1
        if stream is None:
            return
        await stream.close()
        if stream.final_output is not None:
            self.metrics.record_output(stream.final_output)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """An SSE response whose `on_close` always runs, even when the client left before the first byte."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self.on_close()


async def cancel_on_disconnect(request: Request, awaitable: Awaitable[Any], poll_s: float = 0.2) -> Any:
    """Await `awaitable`, cancelling it if the client goes away meanwhile."""
    task = asyncio.ensure_future(awaitable)
    while True:
        done, _ = await asyncio.wait({task}, timeout=poll_s)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise APIError(499, "The client closed the request.", code="client_closed_request")


# ---- the application -----------------------------------------------------------------------------------


def create_app(engine: Any, processor: Any, config: ServerConfig | None = None) -> FastAPI:
    """A FastAPI app serving `engine` (an `AsyncLLMEngine`) with `processor`'s chat template."""
    server = Server(engine, processor, config or ServerConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await engine.shutdown()

    app = FastAPI(title="ocula", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    _add_error_handlers(app, server)
    _add_routes(app, server)
    return app


def _add_routes(app: FastAPI, server: Server) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            response = await server.chat(request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
            response = to_response(api_error(exc))
        server.metrics.record_status(response.status_code)
        return response

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        try:
            server.check_key(request)
        except APIError as error:
            return to_response(error)
        card = ModelCard(id=server.config.served_model_name, max_model_len=server.config.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = server.metrics.render(server.engine.engine)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def to_response(error: APIError) -> JSONResponse:
    return error_response(error.status, error.message, error.kind, error.code, error.param)


def _add_error_handlers(app: FastAPI, server: Server) -> None:
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return to_response(api_error(exc))

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, f"Invalid request: {exc.errors()[:5]}", code="invalid_request")

    app.add_exception_handler(Exception, on_error)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
