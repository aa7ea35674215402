"""specd's OpenAI-compatible HTTP API (FastAPI).

Endpoints
    ``POST /v1/chat/completions``, ``POST /v1/completions`` (non-streaming and SSE streaming),
    ``GET /v1/models``, ``GET /v1/models/{model}``, ``GET /health`` (no auth), ``GET /status``,
    ``GET /metrics`` (Prometheus text format), ``GET /openapi.json``.

Requests are handed to the `GenerationWorker` (one thread owning the models, a bounded FIFO);
its events are bridged into asyncio by `AsyncHandle` (``loop.call_soon_threadsafe``). A full
queue answers 429 with ``Retry-After``; a client that goes away cancels its generation (the
worker stops at the next round).

Every error, including malformed JSON and schema violations, is an OpenAI-style error object
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status; a 5xx only means a bug or
a failure of the backend itself.

`create_app` takes an `AppState`: everything the handlers need, built by
:class:`daemon.server.Server`. Optional hooks on it: ``status_providers`` (callables returning
dicts merged into ``/status``) and ``adapter_version`` (a callable).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon import __version__
from daemon.config import Settings
from daemon.core.backend import backend_info
from daemon.core.engine import GenerationChunk, GenerationError, GenerationResult, SamplingParams
from daemon.logging import get_logger
from daemon.serving.metrics import CONTENT_TYPE, SpecdMetrics
from daemon.serving.worker import (
    Done,
    Event,
    GenerationRequest,
    GenerationWorker,
    QueueFullError,
    RequestHandle,
    WorkerStoppedError,
)

log = get_logger("api")

__all__ = ["AppState", "AsyncHandle", "MAX_BODY_BYTES", "MODEL_ALIASES", "create_app"]

MAX_BODY_BYTES = 1 << 20  # request bodies above this get 413
MODEL_ALIASES = ("specd",)  # accepted in "model" besides the target id (and omitting it)
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
GENERATION_PATHS = (CHAT_PATH, COMPLETIONS_PATH)
KNOWN_PATHS = (
    *GENERATION_PATHS,
    "/v1/models",
    "/health",
    "/status",
    "/metrics",
    "/admin/adapters",
    "/admin/adapters/rollback",
    "/admin/train",
    "/openapi.json",
    "/docs",
    "/redoc",
)
NO_AUTH_PATHS = ("/health",)
DISCONNECT_POLL_S = 0.25
CLIENT_CLOSED = 499  # nginx's "client closed request", for logs and metrics only


# --------------------------------------------------------------------------------------------
# State shared with the server


@dataclass
class AppState:
    """What the HTTP handlers need; `daemon.server.Server` builds it.

    ``status_providers``: callables returning a dict merged into ``/status`` (e.g.
    ``{"buffer": {...}}``, ``{"training": {...}}``); a provider that raises is reported under
    ``provider_errors`` instead. ``adapter_version``: returns the version of the draft adapter in
    use (0: none). ``accepting`` turns False when shutdown starts: generation requests get 503.
    ``in_flight`` counts generation requests between arrival and their last byte.
    """

    settings: Settings
    worker: GenerationWorker
    tokenizer: Any
    metrics: SpecdMetrics
    model_id: str
    draft_id: str = ""
    draft_kind: str = ""
    dtype: str = ""
    max_context: int | None = None
    adapter_version: Callable[[], int] = lambda: 0
    status_providers: list[Callable[[], dict[str, Any]]] = field(default_factory=list)
    admin: Any = None  # daemon.adaptation.loop.AdaptationLoop, when adaptation runs
    started: float = field(default_factory=time.time)
    accepting: bool = True
    in_flight: int = 0


# --------------------------------------------------------------------------------------------
# Worker -> asyncio bridge


class AsyncHandle(RequestHandle):
    """A request handle whose events land in an ``asyncio.Queue`` on ``loop``."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = loop
        super().__init__(request, self._emit)

    def _emit(self, event: Event) -> None:  # runs on the worker thread
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.cancel()

    async def next_event(self, request: Request | None = None) -> Event | None:
        """The next event; None if ``request``'s client disconnected while we waited."""
        if not self.events.empty():
            return self.events.get_nowait()
        while True:
            try:
                return await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    return None


# --------------------------------------------------------------------------------------------
# Errors


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ErrorJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: error messages may quote input with lone surrogates."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(err: APIError) -> JSONResponse:
    return ErrorJSONResponse(
        {"error": err.detail.model_dump()}, status_code=err.status, headers=err.headers
    )


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    429: {"model": ErrorResponse, "description": "Request queue full; see Retry-After"},
    503: {"model": ErrorResponse, "description": "Shutting down"},
}
_SSE_DOC = {
    "text/event-stream": {
        "schema": {
            "type": "string",
            "description": "With stream=true: server-sent events, one JSON chunk per "
            "'data:' line, ending with 'data: [DONE]'.",
        }
    }
}


# --------------------------------------------------------------------------------------------
# Request and response models


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="Send a final chunk carrying usage.")


Stop = Annotated[str, Field(min_length=1)]


class _GenerationParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(
        None, description="The served target model id or 'specd'; may be omitted."
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Tokens to generate at most (up to server.max_tokens_limit)."
    )
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="Extension: top-k filter (0: off).")
    stop: Stop | list[Stop] | None = Field(
        None, max_length=16, description="Stop string(s), not included in the output."
    )
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, description="Only 1 is supported.")
    user: str | None = None


class TextContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_GenerationParams):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")
    logprobs: bool | None = Field(None, description="Not supported (must be false).")
    top_logprobs: int | None = Field(None, ge=0)


class CompletionRequest(_GenerationParams):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        ..., description="A string, or one prompt's token ids; batches are not supported."
    )
    echo: bool | None = Field(False, description="Not supported (must be false).")
    logprobs: int | None = Field(None, ge=0, description="Not supported.")
    best_of: int | None = Field(None, ge=1, description="Only 1 is supported.")
    suffix: str | None = Field(None, description="Not supported.")


class SpeculativeUsage(BaseModel):
    drafted: int = Field(description="Draft tokens proposed.")
    accepted: int = Field(description="Draft tokens the target accepted.")
    num_drafts: int = Field(description="Verification rounds that drafted tokens.")
    acceptance_rate: float = Field(description="accepted / drafted (0 if nothing drafted).")
    mean_accepted_length: float = Field(description="1 + accepted / num_drafts.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    speculative: SpeculativeUsage


FinishReason = Literal["stop", "length"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    """A completion; streamed chunks have the same shape (usage null until the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "specd"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: Literal["ok", "shutting_down"]


class ModelsStatus(BaseModel):
    target: str
    draft: str
    draft_kind: str
    dtype: str
    max_context: int | None


class AcceptanceStatus(BaseModel):
    window: int | None = Field(description="Number of most recent requests considered.")
    requests: int
    drafted: int
    accepted: int
    acceptance_rate: float | None
    mean_accepted_length: float | None


class QueueStatus(BaseModel):
    depth: int = Field(description="Requests waiting for the worker.")
    size: int = Field(description="Queue capacity (server.queue_size).")
    active: bool = Field(description="A generation is running.")
    in_flight: int = Field(description="Generation requests being served (queued included).")


class StatusResponse(BaseModel):
    """Daemon status; attached components (replay buffer, training) add their own keys."""

    model_config = ConfigDict(extra="allow")

    version: str
    pid: int
    uptime_s: float
    accepting: bool
    models: ModelsStatus
    backend: dict[str, Any]
    adapter_version: int
    acceptance: AcceptanceStatus
    queue: QueueStatus
    queue_depth: int = Field(description="Same as queue.depth.")
    rolling_acceptance: float | None = Field(description="Same as acceptance.acceptance_rate.")


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(
        None,
        ge=0,
        description="Version to put in service (0: no adapter); default: the "
        "installed version before the current one.",
    )


class RollbackResponse(BaseModel):
    previous_version: int
    adapter_version: int


class AdapterInfo(BaseModel):
    version: int
    status: str
    created: float | None = None
    parent: int | None = None
    gate: dict[str, Any] | None = None


class AdapterList(BaseModel):
    current: int
    versions: list[AdapterInfo]


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int | None = Field(None, ge=1, description="Default: training.epochs.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many updates.")


class TrainResponse(BaseModel):
    run_id: str


# --------------------------------------------------------------------------------------------
# The gate: auth, shutdown, body size, per-request metrics and logs (pure ASGI)


def _endpoint(path: str) -> str:
    if path in KNOWN_PATHS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


def _force_json(scope: Scope) -> None:
    """Read generation bodies as JSON whatever their Content-Type.

    ``curl -d '{...}'`` sends ``application/x-www-form-urlencoded``; other OpenAI-compatible
    servers accept that, and a body that is not JSON still gets a clear 400.
    """
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    ctype = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
    if b"json" not in ctype.lower():
        scope["headers"] = [*headers, (b"content-type", b"application/json")]


class _Gate:
    """Outermost middleware: runs before routing and sees every response's status and end."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        t0 = time.monotonic()
        path = scope["path"]
        endpoint = _endpoint(path)
        generation = endpoint in GENERATION_PATHS and scope["method"] == "POST"
        info: dict[str, Any] = {"t0": t0, "endpoint": endpoint, "status": None}
        scope["specd"] = info

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
            await send(message)

        if generation:
            state.in_flight += 1
            _force_json(scope)
        try:
            err = self._check(scope, path, generation)
            if err is None:
                receive, err = await self._read_body(scope, receive)
            if err is not None:
                await error_response(err)(scope, receive, send_wrapper)
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            handle: RequestHandle | None = info.get("handle")
            if handle is not None:
                handle.cancel()  # no-op once it finished; frees the worker otherwise
            if generation:  # after the cancel: a drained server has nothing left to run
                state.in_flight -= 1
            self._finished(info, generation)

    def _check(self, scope: Scope, path: str, generation: bool) -> APIError | None:
        key = self.state.settings.server.api_key
        if key is not None and path not in NO_AUTH_PATHS:
            auth = ""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    auth = value.decode("latin-1")
                    break
            scheme, _, token = auth.partition(" ")
            expected = key.get_secret_value().encode()
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode("latin-1"), expected
            ):
                msg = "Missing API key" if not auth else "Incorrect API key provided"
                return APIError(
                    401,
                    f"{msg}: pass it as 'Authorization: Bearer <key>' (server.api_key).",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        if generation and not self.state.accepting:
            return APIError(
                503,
                "The server is shutting down and accepts no new requests.",
                type="service_unavailable",
                code="shutting_down",
            )
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[Receive, APIError | None]:
        """Read the whole body (up to MAX_BODY_BYTES) and replay it to the app."""
        too_large = APIError(
            413,
            f"Request body too large (limit {MAX_BODY_BYTES} bytes).",
            code="request_too_large",
        )
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    if int(value) > MAX_BODY_BYTES:
                        return receive, too_large
                except ValueError:
                    pass
                break
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnect: let the app notice it
                pending: list[Message] = [message]
                break
            body = message.get("body", b"")
            size += len(body)
            if size > MAX_BODY_BYTES:
                return receive, too_large
            chunks.append(body)
            if not message.get("more_body", False):
                pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replay() -> Message:
            if pending:
                return pending.pop()
            return await receive()

        return replay, None

    def _finished(self, info: dict[str, Any], generation: bool) -> None:
        status = info.get("status_override") or info["status"] or 500
        endpoint = info["endpoint"]
        duration = time.monotonic() - info["t0"]
        ok = 200 <= status < 300
        self.state.metrics.observe_request(
            endpoint,
            status,
            duration=duration if generation and ok else None,
            ttft=info.get("ttft") if generation and ok else None,
        )
        if generation:
            log.info(
                "request_finished",
                endpoint=endpoint,
                status=status,
                stream=info.get("stream"),
                prompt_tokens=info.get("prompt_tokens"),
                completion_tokens=info.get("completion_tokens"),
                acceptance_rate=info.get("acceptance_rate"),
                finish_reason=info.get("finish_reason"),
                duration_s=round(duration, 4),
                ttft_s=round(info["ttft"], 4) if info.get("ttft") is not None else None,
                request_id=info.get("request_id"),
                error=info.get("error"),
            )


# --------------------------------------------------------------------------------------------
# Helpers


def _usage(result: GenerationResult) -> Usage:
    s = result.stats
    return Usage(
        prompt_tokens=s.prompt_tokens,
        completion_tokens=s.generation_tokens,
        total_tokens=s.prompt_tokens + s.generation_tokens,
        speculative=SpeculativeUsage(
            drafted=s.drafted,
            accepted=s.accepted,
            num_drafts=s.num_drafts,
            acceptance_rate=s.acceptance_rate,
            mean_accepted_length=s.mean_accepted_length,
        ),
    )


def _finish_reason(result: GenerationResult) -> FinishReason:
    return "length" if result.finish_reason == "length" else "stop"


def _sse(model: BaseModel) -> bytes:
    return b"data: " + model.model_dump_json().encode() + b"\n\n"


def _check_model(state: AppState, model: str | None) -> None:
    if model in (None, "", state.model_id, *MODEL_ALIASES):
        return
    raise APIError(
        404,
        f"The model '{model}' does not exist; this server serves '{state.model_id}'.",
        param="model",
        code="model_not_found",
    )


def _unsupported(param: str, what: str) -> APIError:
    return APIError(400, f"{what} is not supported by specd.", param=param, code="unsupported")


def _sampling(
    state: AppState, body: _GenerationParams, max_tokens: int | None, max_tokens_param: str
) -> SamplingParams:
    s = state.settings
    limit = s.server.max_tokens_limit
    if body.n is not None and body.n > 1:
        raise _unsupported("n", "n > 1 (several choices)")
    if max_tokens is None:
        max_tokens = min(s.sampling.max_tokens, limit)
        if state.max_context is not None:
            max_tokens = min(max_tokens, state.max_context)
    elif max_tokens > limit:
        raise APIError(
            400,
            f"{max_tokens_param} ({max_tokens}) exceeds this server's limit of {limit} "
            "(server.max_tokens_limit).",
            param=max_tokens_param,
            code="invalid_value",
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    params = SamplingParams(
        temperature=s.sampling.temperature if body.temperature is None else body.temperature,
        top_p=s.sampling.top_p if body.top_p is None else body.top_p,
        top_k=s.sampling.top_k if body.top_k is None else body.top_k,
        seed=body.seed,
        max_tokens=max_tokens,
        stop=stop,
    )
    try:
        params.validate(state.max_context)
    except GenerationError as e:
        raise APIError(400, str(e), code="invalid_value") from None
    return params


def _check_prompt(state: AppState, tokens: list[int], param: str) -> None:
    if not tokens:
        raise APIError(400, "The prompt is empty.", param=param, code="invalid_value")
    ctx = state.max_context
    if ctx is not None and len(tokens) >= ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens; the prompt has "
            f"{len(tokens)} tokens (at least one must remain for the completion).",
            param=param,
            code="context_length_exceeded",
        )


def _message_text(m: ChatMessage) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    return "\n".join(p.text for p in m.content)


def _encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    from daemon.core.prompts import encode_prompt

    return encode_prompt(tokenizer, messages)


# --------------------------------------------------------------------------------------------
# Running a request


class _Run:
    """One admitted generation request: submit, wait, and render events."""

    def __init__(
        self,
        state: AppState,
        request: Request,
        kind: Literal["chat", "completion"],
        prompt_tokens: list[int],
        prompt_text: str,
        params: SamplingParams,
        include_usage: bool,
    ) -> None:
        self.state = state
        self.request = request
        self.kind = kind
        self.info: dict[str, Any] = request.scope.get("specd", {})
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.include_usage = include_usage
        self.info["request_id"] = self.id
        self.info["prompt_tokens"] = len(prompt_tokens)
        gen_req = GenerationRequest(
            prompt_tokens=prompt_tokens,
            params=params,
            prompt_text=prompt_text,
            meta={"endpoint": kind, "id": self.id},
        )
        self.handle = AsyncHandle(gen_req, asyncio.get_running_loop())

    def submit(self) -> None:
        worker = self.state.worker
        try:
            worker.submit(self.handle)
        except QueueFullError as e:
            depth = max(worker.queue_depth, 1)
            mean = self.state.metrics.mean_request_seconds(
                CHAT_PATH if self.kind == "chat" else COMPLETIONS_PATH
            )
            retry = max(1, min(60, math.ceil(mean * depth)))
            raise APIError(
                429,
                f"The server is busy: {e}. Retry after {retry} s.",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(retry)},
            ) from None
        except WorkerStoppedError:
            raise APIError(
                503,
                "The server is shutting down and accepts no new requests.",
                type="service_unavailable",
                code="shutting_down",
            ) from None
        self.info["handle"] = self.handle

    def _note_chunk(self, chunk: GenerationChunk) -> None:
        if chunk.tokens and "ttft" not in self.info:
            self.info["ttft"] = time.monotonic() - self.info.get("t0", time.monotonic())

    def _note_result(self, result: GenerationResult) -> None:
        s = result.stats
        self.info.update(
            completion_tokens=s.generation_tokens,
            acceptance_rate=round(s.acceptance_rate, 4),
            finish_reason=_finish_reason(result),
        )

    def _client_gone(self) -> None:
        self.handle.cancel()
        self.info["status_override"] = CLIENT_CLOSED

    def _raise_for(self, done: Done) -> None:
        """Turn a final event without a result into an APIError."""
        err = done.error
        if isinstance(err, GenerationError):
            self.info["error"] = str(err)
            raise APIError(400, str(err), code="invalid_value")
        if err is not None:
            self.info["error"] = repr(err)
            raise APIError(
                500, f"Generation failed: {err}", type="server_error", code="generation_failed"
            )

    async def first_event(self) -> Event | None:
        ev = await self.handle.next_event(self.request)
        if ev is None:
            self._client_gone()
        return ev

    # --- non-streaming -------------------------------------------------------------------

    async def complete(self) -> Response | BaseModel:
        while True:
            ev = await self.handle.next_event(self.request)
            if ev is None:
                self._client_gone()
                return Response(status_code=CLIENT_CLOSED)
            if isinstance(ev, GenerationChunk):
                self._note_chunk(ev)
                continue
            self._raise_for(ev)
            if ev.result is None:  # cancelled before it started
                return Response(status_code=CLIENT_CLOSED)
            result = ev.result
            self._note_result(result)
            usage = _usage(result)
            if self.kind == "chat":
                return ChatCompletionResponse(
                    id=self.id,
                    created=self.created,
                    model=self.state.model_id,
                    choices=[
                        ChatChoice(
                            index=0,
                            message=AssistantMessage(content=result.text),
                            finish_reason=_finish_reason(result),
                        )
                    ],
                    usage=usage,
                )
            return CompletionResponse(
                id=self.id,
                created=self.created,
                model=self.state.model_id,
                choices=[
                    CompletionChoice(
                        index=0, text=result.text, finish_reason=_finish_reason(result)
                    )
                ],
                usage=usage,
            )

    # --- streaming -----------------------------------------------------------------------

    def _chunk(self, text: str | None, finish: FinishReason | None, role: bool = False) -> bytes:
        if self.kind == "chat":
            delta = ChatDelta(role="assistant" if role else None, content=text)
            choice = ChatChunkChoice(index=0, delta=delta, finish_reason=finish)
            return _sse(
                ChatCompletionChunk(
                    id=self.id, created=self.created, model=self.state.model_id, choices=[choice]
                )
            )
        return _sse(
            CompletionResponse(
                id=self.id,
                created=self.created,
                model=self.state.model_id,
                choices=[CompletionChoice(index=0, text=text or "", finish_reason=finish)],
            )
        )

    def _usage_chunk(self, result: GenerationResult) -> bytes:
        cls = ChatCompletionChunk if self.kind == "chat" else CompletionResponse
        return _sse(
            cls(
                id=self.id,
                created=self.created,
                model=self.state.model_id,
                choices=[],
                usage=_usage(result),
            )
        )

    async def stream(self, first: Event) -> AsyncIterator[bytes]:
        finished = False
        try:
            if self.kind == "chat":
                yield self._chunk("", None, role=True)
            ev: Event | None = first
            while True:
                if ev is None:
                    self._client_gone()
                    return
                if isinstance(ev, GenerationChunk):
                    self._note_chunk(ev)
                    if ev.text:
                        yield self._chunk(ev.text, None)
                else:
                    if ev.result is None:  # an error after the stream started (not expected)
                        msg = str(ev.error) if ev.error is not None else "generation cancelled"
                        self.info["error"] = msg
                        body = error_body(msg, "server_error", code="generation_failed")
                        yield b"data: " + json.dumps(body).encode() + b"\n\n"
                    else:
                        result = ev.result
                        self._note_result(result)
                        yield self._chunk(
                            None if self.kind == "chat" else "", _finish_reason(result)
                        )
                        if self.include_usage:
                            yield self._usage_chunk(result)
                    yield b"data: [DONE]\n\n"
                    finished = True
                    return
                ev = await self.handle.next_event(self.request)
        finally:
            if not finished:
                self._client_gone()

    async def respond(self, stream: bool) -> Response | BaseModel:
        self.info["stream"] = stream
        self.submit()
        if not stream:
            return await self.complete()
        # Wait for the first event before sending headers, so a request the engine refuses
        # still gets a proper 4xx status instead of an error inside a 200 stream.
        first = await self.first_event()
        if first is None:
            return Response(status_code=CLIENT_CLOSED)
        if isinstance(first, Done):
            self._raise_for(first)
            if first.result is None:
                return Response(status_code=CLIENT_CLOSED)
        return StreamingResponse(
            self.stream(first),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


# --------------------------------------------------------------------------------------------
# The application


def create_app(state: AppState) -> FastAPI:
    """Build the FastAPI application around ``state``."""
    app = FastAPI(
        title="specd",
        version=__version__,
        description="OpenAI-compatible speculative decoding with live acceptance metrics. "
        "When server.api_key is set, every endpoint except /health needs "
        "'Authorization: Bearer <key>'.",
    )
    app.state.specd = state
    bearer = HTTPBearer(auto_error=False, description="server.api_key, when configured")
    auth = [Depends(bearer)]  # documents the scheme; _Gate enforces it

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message = f"Invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}"
            code = "invalid_json"
            param = None
        else:
            parts = []
            for e in errors[:5]:
                where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
                parts.append(f"{where}: {e.get('msg')}")
            message = "Invalid request: " + "; ".join(parts)
            code = "invalid_value"
        return ErrorJSONResponse(error_body(message, "invalid_request_error", param, code), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else None
        return ErrorJSONResponse(
            error_body(str(exc.detail), "invalid_request_error", code=kind),
            exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled_error", path=request.url.path, error=repr(exc), exc_info=exc)
        return ErrorJSONResponse(
            error_body("Internal server error.", "server_error", code="internal_error"), 500
        )

    gen_responses: dict[int | str, dict[str, Any]] = {
        200: {"content": _SSE_DOC},
        **_ERROR_RESPONSES,
    }

    @app.post(
        CHAT_PATH,
        response_model=ChatCompletionResponse,
        responses=gen_responses,
        dependencies=auth,
        summary="Chat completion (OpenAI-compatible)",
        tags=["openai"],
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(state, body.model)
        if body.logprobs:
            raise _unsupported("logprobs", "logprobs")
        max_tokens = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
        param = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
        params = _sampling(state, body, max_tokens, param)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": _message_text(m)}
            for m in body.messages
        ]
        try:
            tokens = await run_in_threadpool(_encode_chat, state.tokenizer, messages)
        except Exception as e:  # template errors (roles, missing fields) are the request's fault
            raise APIError(400, f"Cannot apply the chat template: {e}", param="messages") from None
        _check_prompt(state, tokens, "messages")
        users = [m["content"] for m in messages if m["role"] == "user"]
        prompt_text = users[-1] if users else "\n".join(m["content"] for m in messages)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        run = _Run(state, request, "chat", tokens, prompt_text, params, include_usage)
        return await run.respond(bool(body.stream))

    @app.post(
        COMPLETIONS_PATH,
        response_model=CompletionResponse,
        responses=gen_responses,
        dependencies=auth,
        summary="Text completion (OpenAI-compatible legacy endpoint)",
        tags=["openai"],
    )
    async def completions(body: CompletionRequest, request: Request):
        _check_model(state, body.model)
        if body.echo:
            raise _unsupported("echo", "echo")
        if body.logprobs:
            raise _unsupported("logprobs", "logprobs")
        if body.best_of is not None and body.best_of > 1:
            raise _unsupported("best_of", "best_of > 1")
        if body.suffix:
            raise _unsupported("suffix", "suffix")
        params = _sampling(state, body, body.max_tokens, "max_tokens")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) > 1:
                raise APIError(
                    400,
                    "Batched prompts are not supported: send one prompt per request.",
                    param="prompt",
                    code="unsupported",
                )
            prompt = prompt[0]
        tok = state.tokenizer
        if isinstance(prompt, str):
            text = prompt
            try:
                tokens = [int(t) for t in await run_in_threadpool(tok.encode, prompt)]
            except Exception as e:  # e.g. lone surrogates the tokenizer cannot take
                raise APIError(
                    400, f"Cannot tokenize the prompt: {e}", param="prompt", code="invalid_value"
                ) from None
        else:
            tokens = [int(t) for t in prompt]
            try:
                text = tok.decode(tokens)
            except Exception:  # out-of-range ids: the engine refuses them below
                text = ""
        _check_prompt(state, tokens, "prompt")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        run = _Run(state, request, "completion", tokens, text, params, include_usage)
        return await run.respond(bool(body.stream))

    def _model_card() -> ModelCard:
        return ModelCard(id=state.model_id, created=int(state.started))

    @app.get("/v1/models", response_model=ModelList, dependencies=auth, tags=["openai"])
    async def list_models() -> ModelList:
        return ModelList(data=[_model_card()])

    @app.get(
        "/v1/models/{model:path}",
        response_model=ModelCard,
        responses={404: _ERROR_RESPONSES[404]},
        dependencies=auth,
        tags=["openai"],
    )
    async def get_model(model: str) -> ModelCard:
        _check_model(state, model or "?")
        return _model_card()

    @app.get(
        "/health",
        response_model=HealthResponse,
        responses={503: {"model": HealthResponse, "description": "Shutting down"}},
        tags=["daemon"],
    )
    async def health():
        if not state.accepting:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return HealthResponse(status="ok")

    @app.get("/status", response_model=StatusResponse, dependencies=auth, tags=["daemon"])
    async def status() -> StatusResponse:
        worker = state.worker
        extra: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for provider in list(state.status_providers):
            try:
                extra.update(provider())
            except Exception as e:  # one broken component must not hide the rest
                name = getattr(provider, "__qualname__", repr(provider))
                errors[name] = repr(e)
        for key in [k for k in extra if k in StatusResponse.model_fields]:
            errors[f"key:{key}"] = "reserved key, ignored"
            del extra[key]
        if errors:
            extra["provider_errors"] = errors
        acceptance = state.metrics.rolling_acceptance()
        depth = worker.queue_depth
        return StatusResponse(
            version=__version__,
            pid=os.getpid(),
            uptime_s=round(time.time() - state.started, 3),
            accepting=state.accepting,
            models=ModelsStatus(
                target=state.model_id,
                draft=state.draft_id,
                draft_kind=state.draft_kind,
                dtype=state.dtype,
                max_context=state.max_context,
            ),
            backend=backend_info(),
            adapter_version=int(state.adapter_version()),
            acceptance=AcceptanceStatus(**acceptance),
            queue_depth=depth,
            rolling_acceptance=acceptance["acceptance_rate"],
            queue=QueueStatus(
                depth=depth,
                size=worker.queue_size,
                active=worker.active is not None,
                in_flight=state.in_flight,
            ),
            **extra,
        )

    def _admin() -> Any:
        if state.admin is None:
            # 409, not 5xx: the server works; its configuration (training.enabled) says no.
            raise APIError(
                409,
                "The adaptation loop is not running (training.enabled is false).",
                code="adaptation_disabled",
            )
        return state.admin

    @app.get(
        "/admin/adapters",
        response_model=AdapterList,
        dependencies=auth,
        tags=["admin"],
        responses={409: {"model": ErrorResponse}},
    )
    async def list_adapters() -> AdapterList:
        """Stored adapter versions and the one in service."""
        return AdapterList(**await asyncio.to_thread(_admin().list_adapters))

    @app.post(
        "/admin/adapters/rollback",
        response_model=RollbackResponse,
        dependencies=auth,
        tags=["admin"],
        responses={
            400: {"model": ErrorResponse},
            404: {"model": ErrorResponse},
            409: {"model": ErrorResponse},
        },
    )
    async def rollback(body: RollbackRequest | None = None) -> RollbackResponse:
        """Swap the draft to another stored version between requests (live, no restart)."""
        from daemon.store.adapters import AdapterError

        admin = _admin()
        try:
            out = await asyncio.to_thread(admin.rollback, body.version if body else None)
        except AdapterError as e:
            code = 404 if "no adapter version" in str(e) else 409
            raise APIError(code, str(e), param="version", code="adapter_error") from None
        return RollbackResponse(**out)

    @app.post(
        "/admin/train",
        response_model=TrainResponse,
        dependencies=auth,
        tags=["admin"],
        responses={400: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
    )
    async def train_now(body: TrainRequest | None = None) -> TrainResponse:
        """Start a training run now (it goes through the same gate as automatic ones)."""
        admin = _admin()
        body = body or TrainRequest()
        try:
            run_id = await asyncio.to_thread(admin.train_now, body.epochs, body.max_steps)
        except RuntimeError as e:
            raise APIError(409, str(e), code="training_running") from None
        return TrainResponse(run_id=run_id)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        dependencies=auth,
        tags=["daemon"],
        responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(_Gate, state=state)
    return app
