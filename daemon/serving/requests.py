"""A generation request and the caller's side of it: what the worker takes and what comes back.

`GenerationRequest` is one job; a `RequestHandle` carries its events (`GenerationChunk`s, then
one `Done`) to the caller through a thread-safe ``emit``; `BlockingHandle` is the handle a
plain thread reads. The worker (`daemon.serving.worker`) owns everything else.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from daemon.core.constraints import Constraint
from daemon.core.engine import GenerationChunk, GenerationResult, SamplingParams

_ids = itertools.count(1)


class QueueFullError(Exception):
    """The request queue is full; try again later."""


class WorkerStoppedError(Exception):
    """The worker is shutting down and accepts no new requests."""


@dataclass
class GenerationRequest:
    """One generation job. ``prompt_text`` is what the buffer stores and hashes for holdout."""

    prompt_tokens: list[int]
    params: SamplingParams
    prompt_text: str = ""
    record: bool = True  # store the outcome in the replay buffer
    constraint: Constraint | None = None  # the grammar the output follows (response_format)
    meta: dict[str, Any] = field(default_factory=dict)
    # The draft adapter in service when the request started (set by the worker); swaps run
    # between requests, so it is the one that served every round of it.
    adapter_version: int = 0
    # Seconds the models stay loaded once idle after this request (Ollama's per-request
    # keep_alive; inf: never unloaded); None: models.keep_alive_seconds.
    keep_alive: float | None = None
    # The served model it names (models.targets); None: models.target.
    model: str | None = None
    id: int = field(default_factory=lambda: next(_ids))
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def log_id(self) -> str | int:
        """The id log lines carry: the API's (``chatcmpl-...``) when it came by HTTP, so a
        request can be followed from the gate through the worker; the worker's own else."""
        api_id = self.meta.get("id")
        return api_id if isinstance(api_id, str) and api_id else self.id


@dataclass
class Done:
    """Final event of a request: the full result, or the error that ended it."""

    result: GenerationResult | None
    error: BaseException | None = None
    queue_s: float = 0.0
    total_s: float = 0.0
    # Resolves (to the buffer row id) once the request's record is committed; None when the
    # request is not recorded. The HTTP API waits for it before the response's last byte.
    recorded: Future[int] | None = None


Event = GenerationChunk | Done

# Runs on the worker thread after each request with a result: (request, result, queue_s, total_s).
FinishedHook = Callable[[GenerationRequest, GenerationResult, float, float], None]
# Hands a finished request's record to the buffer writer: the future of its commit, or None.
RecordHook = Callable[[GenerationRequest, GenerationResult], "Future[int] | None"]


class RequestHandle:
    """The caller's side of a request: events arrive through ``emit`` (a thread-safe callback)."""

    def __init__(self, request: GenerationRequest, emit: Callable[[Event], None]) -> None:
        self.request = request
        self.emit = emit
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop the generation at the next round (e.g. the client disconnected)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class BlockingHandle(RequestHandle):
    """A handle read by a plain (non-async) thread."""

    def __init__(self, request: GenerationRequest) -> None:
        self._events: queue.Queue[Event] = queue.Queue()
        super().__init__(request, self._events.put)

    def events(self, timeout: float | None = None):
        """Yield chunks, then the final `Done`."""
        while True:
            ev = self._events.get(timeout=timeout)
            yield ev
            if isinstance(ev, Done):
                return

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the request to finish; re-raise its error."""
        for ev in self.events(timeout):
            if isinstance(ev, Done):
                if ev.error is not None:
                    raise ev.error
                assert ev.result is not None
                return ev.result
        raise RuntimeError("unreachable")
