"""Running one admitted generation request: worker -> asyncio bridge, and the two renderings.

Requests are handed to the `GenerationWorker` (one thread owning the models, a bounded FIFO);
its events are bridged into asyncio by `AsyncHandle` (``loop.call_soon_threadsafe``).
`GenerationRun` submits the request (a full queue answers 429 with a ``Retry-After`` estimated
from the queue depth and the mean request time), then renders the events as one JSON response
or as server-sent events. A client that goes away cancels its generation (the worker stops at
the next round) and is counted as 499.

A response ends only after the request's record is committed to the replay buffer (the last
bytes wait for `Done.recorded`): a client that received a complete response knows the record
is durable. A buffer that fails or stalls (more than ``RECORD_WAIT_S``) is logged and the
response is sent anyway: serving comes before recording.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from typing import Any, Literal

import structlog
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from daemon.core.constraints import Constraint
from daemon.core.engine import (
    GenerationChunk,
    GenerationError,
    GenerationResult,
    SamplingParams,
    TokenLogprob,
)
from daemon.logging import get_logger
from daemon.serving.api.errors import APIError
from daemon.serving.api.reasoning import reasoning_stream
from daemon.serving.api.render import (
    LogprobRenderer,
    OpenAIRenderer,
    Renderer,
    Reply,
    finish_reason,
)
from daemon.serving.api.schemas import FinishReason
from daemon.serving.api.state import (
    CHAT_PATH,
    CLIENT_CLOSED,
    COMPLETIONS_PATH,
    AppState,
    RequestInfo,
)
from daemon.serving.api.tools import ParsedCall, ToolStream, split_tool_calls
from daemon.serving.requests import (
    Done,
    Event,
    GenerationRequest,
    QueueFullError,
    RequestHandle,
    WorkerStoppedError,
)

log = get_logger("api")

RECORD_WAIT_S = 30.0  # longest a response waits for its buffer record to commit

__all__ = ["AsyncHandle", "GenerationRun"]

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
# A stream whose first event takes longer than this (queued behind other requests, or a long
# prefill) starts at once: headers, then an SSE comment every KEEPALIVE_S, so that clients and
# proxies with idle timeouts keep the connection.
FIRST_EVENT_WAIT_S = 0.5
STOPPED = "The generation was stopped before it finished: the server is shutting down."
KEEPALIVE_S = 5.0
# no caching, and no buffering by a proxy (nginx) in front: each event goes out as it comes
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class RequestTimeoutError(Exception):
    """No event for ``server.request_timeout_seconds``: the request is ended."""

    def __init__(self, seconds: float | None) -> None:
        super().__init__(
            f"The request heard nothing from the generation worker for {seconds} s "
            "(server.request_timeout_seconds) and was stopped."
        )


def _until(deadline: float | None) -> float:
    """The next keep-alive wait, cut short by the request's deadline (a limit shorter than
    the keep-alive interval must still end the request on time)."""
    if deadline is None:
        return KEEPALIVE_S
    return max(0.0, min(KEEPALIVE_S, deadline - time.monotonic()))


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

    async def next_event(
        self, request: Request | None = None, within: float | None = None
    ) -> Event | None | Literal["waiting"]:
        """The next event; None if ``request``'s client disconnected while we waited;
        "waiting" when none came ``within`` seconds."""
        if not self.events.empty():
            return self.events.get_nowait()
        deadline = None if within is None else time.monotonic() + within
        while True:
            wait = DISCONNECT_POLL_S
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that
                # lands as an event arrives, and a cancelled handler must stop.
                async with asyncio.timeout(wait):
                    return await self.events.get()
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    return None
                if deadline is not None and time.monotonic() >= deadline:
                    return "waiting"


class GenerationRun:
    """One admitted generation request: submit, wait, and render events (OpenAI's shape
    unless another API's `Renderer` factory is given)."""

    def __init__(
        self,
        state: AppState,
        request: Request,
        kind: Literal["chat", "completion"],
        prompt_tokens: list[int],
        prompt_text: str,
        params: SamplingParams,
        include_usage: bool,
        constraint: Constraint | None = None,
        tools: list[dict[str, Any]] | None = None,
        renderer: Callable[[Reply], Renderer] = OpenAIRenderer,
        keep_alive: float | None = None,
    ) -> None:
        self.state = state
        self.tools = tools  # given: the answer's tool calls are parsed (daemon.serving.api.tools)
        self.calls = 0  # tool calls streamed so far
        self.request = request
        self.kind = kind
        info = request.scope.get("specd")
        # The gate opened it; an app mounted without the gate still runs (nothing is counted).
        self.info = info if isinstance(info, RequestInfo) else RequestInfo(time.monotonic(), "")
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.info.request_id = self.id
        # every log line of this request's task carries its id (structlog's contextvars)
        structlog.contextvars.bind_contextvars(request_id=self.id)
        self.info.prompt_tokens = len(prompt_tokens)
        gen_req = GenerationRequest(
            prompt_tokens=prompt_tokens,
            params=params,
            prompt_text=prompt_text,
            meta={"endpoint": kind, "id": self.id},
            constraint=constraint,
            keep_alive=keep_alive,
            model=state.model_id,
        )
        self.handle = AsyncHandle(gen_req, asyncio.get_running_loop())
        self.logprobs = LogprobRenderer(state.tokenizer) if params.logprobs is not None else None
        # a reasoning model's thinking is split from the answer (chat only)
        self.reasoning = (
            reasoning_stream(state.tokenizer, prompt_tokens) if kind == "chat" else None
        )
        self.renderer = renderer(
            Reply(
                id=self.id,
                created=int(time.time()),
                model=state.model_id,
                kind=kind,
                include_usage=include_usage,
                adapter_version=lambda: self.handle.request.adapter_version,
                logprobs=self.logprobs,
                prompt_tokens=len(prompt_tokens),
            )
        )

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
        self.info.handle = self.handle

    def _note_chunk(self, chunk: GenerationChunk) -> None:
        if chunk.tokens and self.info.ttft is None:
            self.info.ttft = time.monotonic() - self.info.t0

    def _note_result(self, result: GenerationResult) -> None:
        s = result.stats
        self.info.completion_tokens = s.generation_tokens
        self.info.acceptance_rate = round(s.acceptance_rate, 4)
        self.info.batched_tokens = s.batched_tokens
        self.info.finish_reason = finish_reason(result)

    def _client_gone(self) -> None:
        self.handle.cancel()
        self.info.status_override = CLIENT_CLOSED

    def _raise_for(self, done: Done) -> None:
        """Turn a final event without a result into an APIError."""
        err = done.error
        if isinstance(err, GenerationError):
            self.info.error = str(err)
            raise APIError(400, str(err), code="invalid_value")
        if isinstance(err, RequestTimeoutError):
            self.info.error = str(err)
            raise APIError(504, str(err), type="server_error", code="request_timeout")
        if err is not None:
            self.info.error = repr(err)
            raise APIError(
                500, f"Generation failed: {err}", type="server_error", code="generation_failed"
            )

    async def _recorded(self, done: Done) -> None:
        """Wait until the request's record is committed (see the module docstring)."""
        if done.recorded is None:
            return
        try:
            await asyncio.wait_for(asyncio.wrap_future(done.recorded), RECORD_WAIT_S)
        except Exception as e:  # TimeoutError or the writer's error: log, answer anyway
            log.error("record_not_committed", request_id=self.id, error=repr(e))

    async def first_event(self, within: float | None = None) -> Event | None | Literal["waiting"]:
        ev = await self.handle.next_event(self.request, within)
        if ev is None:
            self._client_gone()
        return ev

    async def _event(self) -> Event | None:
        """The next event; a `Done` with `RequestTimeoutError` (the request cancelled) when
        none came within ``server.request_timeout_seconds`` of the last."""
        limit = self.state.settings.server.request_timeout_seconds
        ev = await self.handle.next_event(self.request, limit)
        if ev == "waiting":
            return self._timed_out(limit)
        return ev

    def _timed_out(self, limit: float | None) -> Done:
        """The last line of defence: a request that hears nothing for so long is ended, so
        that no client waits forever whatever went wrong inside."""
        self.handle.cancel()
        log.error("request_timeout", request_id=self.id, seconds=limit)
        return Done(None, error=RequestTimeoutError(limit))

    # --- non-streaming -------------------------------------------------------------------

    async def complete(self) -> Response | BaseModel:
        while True:
            ev = await self._event()
            if ev is None:
                self._client_gone()
                return Response(status_code=CLIENT_CLOSED)
            if isinstance(ev, GenerationChunk):
                self._note_chunk(ev)
                continue
            self._raise_for(ev)
            if ev.result is None:  # cancelled before it started
                return Response(status_code=CLIENT_CLOSED)
            if ev.result.finish_reason == "cancelled":  # stopped under it: no complete answer
                self.info.error = STOPPED
                raise APIError(503, STOPPED, type="service_unavailable", code="shutting_down")
            result = ev.result
            self._note_result(result)
            await self._recorded(ev)
            lps: list[TokenLogprob] = []
            if self.logprobs is not None:
                lps = self.logprobs.content(result.logprobs, len(result.text))
            content: str | None = result.text
            reasoning = None
            if self.reasoning is not None:
                reasoning, content = self.reasoning.split(result.text)
            finish = finish_reason(result)
            calls: list[ParsedCall] = []
            if self.tools is not None:
                content, calls = split_tool_calls(self.state.tokenizer, content or "", self.tools)
                if calls:
                    content = content or None
                    finish = "tool_calls" if finish == "stop" else finish
            return self.renderer.complete(result, content, calls, finish, lps, reasoning or None)

    # --- streaming -----------------------------------------------------------------------

    def _logprobs_of(self, chunk: GenerationChunk) -> list[TokenLogprob]:
        """A streamed chunk's entries (no EOS; a stop string's tokens may show: the stream
        cannot take back what it sent)."""
        if self.logprobs is None:
            return []
        return self.logprobs.content(chunk.logprobs)

    def _pieces(
        self,
        text: str,
        tools: ToolStream | None,
        lps: list[TokenLogprob],
        final: bool = False,
    ) -> list[bytes]:
        """A streamed piece of text through the splitters (thinking, then tool calls), as the
        renderer's deltas; ``final``: what they held back."""
        reasoning = ""
        if self.reasoning is not None:
            r, text = self.reasoning.finish() if final else self.reasoning.feed(text)
            reasoning += r
        calls: list[ParsedCall] = []
        if tools is not None:
            text, calls = tools.feed(text) if text else ("", [])
            if final:
                more, last = tools.finish()
                text, calls = text + more, calls + last
        if not (text or calls or reasoning or lps):
            return []
        self.calls += len(calls)
        return self.renderer.delta(text or None, calls, lps, reasoning or None)

    async def stream(self, first: Event | Literal["waiting"]) -> AsyncIterator[bytes]:
        finished = False
        renderer = self.renderer
        try:
            ev: Event | None
            if first == "waiting":  # queued or prefilling: keep the connection alive
                keepalive = renderer.keepalive
                limit = self.state.settings.server.request_timeout_seconds
                deadline = None if limit is None else time.monotonic() + limit
                if keepalive is not None:
                    yield keepalive
                waited = await self.handle.next_event(self.request, _until(deadline))
                while waited == "waiting":
                    if deadline is not None and time.monotonic() >= deadline:
                        waited = self._timed_out(limit)
                        break
                    if keepalive is not None:
                        yield keepalive
                    waited = await self.handle.next_event(self.request, _until(deadline))
                ev = waited
                if isinstance(ev, Done) and ev.result is None and ev.error is not None:
                    # refused after the stream started: the error as an event, then the end
                    self.info.error = str(ev.error)
                    for part in renderer.error(str(ev.error), "invalid_request_error"):
                        yield part
                    finished = True
                    return
            else:
                ev = first
            if ev is not None:
                for part in renderer.start():
                    yield part
            tools = ToolStream(self.state.tokenizer, self.tools) if self.tools is not None else None
            while True:
                if ev is None:
                    self._client_gone()
                    return
                if isinstance(ev, GenerationChunk):
                    self._note_chunk(ev)
                    for part in self._pieces(ev.text, tools, self._logprobs_of(ev)):
                        yield part
                else:
                    if ev.result is not None:  # what the splitters held back
                        for part in self._pieces("", tools, [], final=True):
                            yield part
                    if ev.result is None or ev.result.finish_reason == "cancelled":
                        # an error after the stream started, or the server stopped it
                        msg = str(ev.error) if ev.error is not None else STOPPED
                        self.info.error = msg
                        for part in renderer.error(msg, "server_error"):
                            yield part
                    else:
                        result = ev.result
                        self._note_result(result)
                        await self._recorded(ev)
                        finish: FinishReason = finish_reason(result)
                        if self.calls and finish == "stop":
                            finish = "tool_calls"
                        for part in renderer.end(result, finish):
                            yield part
                    finished = True
                    return
                ev = await self._event()
        finally:
            if not finished:
                self._client_gone()

    async def respond(self, stream: bool) -> Response | BaseModel:
        self.info.stream = stream
        self.submit()
        if not stream:
            return await self.complete()
        # Wait briefly for the first event before sending headers, so a request the engine
        # refuses still gets a proper 4xx status instead of an error inside a 200 stream; one
        # that waits longer (queue, long prefill) streams keep-alive comments meanwhile.
        first = await self.first_event(FIRST_EVENT_WAIT_S)
        if first is None:
            return Response(status_code=CLIENT_CLOSED)
        if isinstance(first, Done):
            self._raise_for(first)
            if first.result is None:
                return Response(status_code=CLIENT_CLOSED)
        return StreamingResponse(
            self.stream(first),
            media_type=self.renderer.media_type,
            headers=STREAM_HEADERS,
        )


def stream_after_load(
    request: Request,
    load: Future[Any],
    renderer: Renderer,
    serve: Callable[[], Awaitable[Response | BaseModel]],
) -> StreamingResponse:
    """A stream for a model that loads first (its first request): headers at once and the
    renderer's keep-alives every `KEEPALIVE_S` while it loads, then what ``serve`` streams;
    a refusal or a failed load after the headers went is an error event of the stream."""

    async def body() -> AsyncIterator[bytes]:
        waiting = asyncio.wrap_future(load)
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=KEEPALIVE_S)
            if not waiting.done() and renderer.keepalive is not None:
                yield renderer.keepalive
        try:
            waiting.result()
            out = await serve()
        except APIError as e:
            message, kind = e.detail.message, "invalid_request_error"
        except Exception as e:  # noqa: BLE001 - a model that would not load: this request's
            log.warning("model_load_failed_for_stream", error=str(e))
            message, kind = f"The model could not be loaded: {e}", "server_error"
        else:
            if isinstance(out, StreamingResponse):
                async for chunk in out.body_iterator:
                    yield chunk if isinstance(chunk, bytes) else str(chunk).encode()
            return  # else the client went away (an empty response)
        info = request.scope.get("specd")
        if isinstance(info, RequestInfo):
            info.error = message
        for part in renderer.error(message, kind):
            yield part

    return StreamingResponse(
        body(),
        media_type=renderer.media_type,
        headers=STREAM_HEADERS,
    )
