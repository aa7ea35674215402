"""The generation worker: one thread owns the MLX models, requests wait in a bounded FIFO.

Callers (HTTP handlers, ``specd collect``) submit a `GenerationRequest` and read its events from
the returned `RequestHandle`. Work that must not overlap a request (swapping the draft's
adapter) is queued with `call_between_requests` and runs on the worker thread between requests.
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
from daemon.core.engine import (
    GenerationChunk,
    GenerationError,
    GenerationResult,
    SamplingParams,
    SpeculativeEngine,
)
from daemon.logging import get_logger

log = get_logger("worker")

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
    id: int = field(default_factory=lambda: next(_ids))
    enqueued: float = field(default_factory=time.monotonic)


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


class GenerationWorker:
    """Runs requests one at a time on a dedicated thread.

    ``record(request, result)`` runs on the worker thread when a request produced a result,
    before its final event: the future it returns travels in `Done.recorded`.
    ``on_finished(request, result, queue_s, total_s)`` runs after the final event (metrics,
    hooks). Both must be quick.
    """

    def __init__(
        self,
        engine: SpeculativeEngine,
        queue_size: int = 16,
        on_finished: FinishedHook | None = None,
        record: RecordHook | None = None,
        adapter_version: Callable[[], int] | None = None,
    ) -> None:
        self.engine = engine
        self.on_finished = on_finished
        self.record = record
        self.adapter_version = adapter_version
        self._queue: queue.Queue[RequestHandle | Callable[[], None] | None] = queue.Queue()
        self._queue_size = queue_size
        self._pending = 0  # requests queued, not yet started
        self._lock = threading.Lock()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="specd-generation", daemon=True)
        self.active: GenerationRequest | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop accepting, let queued and in-flight requests finish, then end the thread.

        Returns False if they did not finish within ``timeout`` (the thread is a daemon).
        """
        with self._lock:
            self._accepting = False
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return self._pending

    @property
    def queue_size(self) -> int:
        return self._queue_size

    @queue_size.setter
    def queue_size(self, value: int) -> None:
        self._queue_size = value  # takes effect for the next submit

    # --- submitting ------------------------------------------------------------------------

    def submit(self, handle: RequestHandle) -> RequestHandle:
        """Queue a request; raises `QueueFullError` or `WorkerStoppedError`."""
        with self._lock:
            if not self._accepting:
                raise WorkerStoppedError("the server is shutting down")
            if self._pending >= self._queue_size:
                raise QueueFullError(f"request queue is full ({self._queue_size} waiting)")
            self._pending += 1
        self._queue.put(handle)
        return handle

    def call_between_requests(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the worker thread once the current request (if any) has finished."""
        fut: Future = Future()

        def job() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn())
            except BaseException as e:  # delivered to the caller through the future
                fut.set_exception(e)

        self._queue.put(job)
        return fut

    # --- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, RequestHandle):
                with self._lock:
                    self._pending -= 1
                self._serve(item)
            else:
                item()

    def _serve(self, handle: RequestHandle) -> None:
        req = handle.request
        started = time.monotonic()
        queue_s = started - req.enqueued
        if handle.cancelled:
            handle.emit(Done(None, error=None, queue_s=queue_s))
            return
        result = GenerationResult()
        if self.adapter_version is not None:
            req.adapter_version = self.adapter_version()
        self.active = req
        try:
            gen = self.engine.generate(req.prompt_tokens, req.params, result, req.constraint)
            try:
                for chunk in gen:
                    handle.emit(chunk)
                    if handle.cancelled:
                        break
            finally:
                gen.close()
        except GenerationError as e:
            handle.emit(Done(None, error=e, queue_s=queue_s))
            return
        except Exception as e:  # a bug or an MLX failure must not kill the worker thread
            log.exception("generation_failed", request_id=req.id)
            handle.emit(Done(None, error=e, queue_s=queue_s))
            return
        finally:
            self.active = None
        total_s = time.monotonic() - req.enqueued
        recorded = None
        if self.record is not None:
            try:
                recorded = self.record(req, result)
            except Exception:  # a full or closed buffer must not fail the response
                log.exception("record_failed", request_id=req.id)
        handle.emit(Done(result, queue_s=queue_s, total_s=total_s, recorded=recorded))
        if self.on_finished is not None:
            try:
                self.on_finished(req, result, queue_s, total_s)
            except Exception:
                log.exception("on_finished_failed", request_id=req.id)
