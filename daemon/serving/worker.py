"""The generation worker: one thread owns the MLX models, requests wait in a bounded FIFO.

Callers (HTTP handlers, ``specd collect``) submit a `GenerationRequest` and read its events from
the returned `RequestHandle`.

A lone request is decoded speculatively (`SpeculativeEngine`). When more requests are ready,
they are decoded together by continuous batching (`daemon.core.batch.BatchDecoder`, up to
``batch_size`` at once, speculation off): a request that arrives while one runs joins it at
the next round boundary, the running one included (handed over with its caches and text), so
nobody waits for another's whole answer. Requests beyond ``batch_size`` wait in the queue
(``queue_size`` of them; more get `QueueFullError`).

Idle models are freed (``idle_unload``, `daemon.serving.idle`): each model after its own
keep-alive without requests, never the one being decoded; the next request for it loads it
again.

Several models (``switch``): the worker decodes one model at a time. Requests are taken in
order; the consecutive ones for the model in service are served (alone or batched) and a
request for another model waits until they are done, then ``switch`` gives that model's engine
(loading it if need be) and its batch starts empty. A request never waits behind one that came
after it.

Work that must not overlap a speculative request (swapping the draft's adapter, replacing the
engine's configuration) is queued with `call_between_requests`; it runs on the worker thread
when no request is being decoded speculatively (between batch steps too: a batch never uses
the draft). A request's adapter version is fixed when it starts (``adapter_version``): a
batched one that started before a swap is not handed back to the speculative path, so it is
never drafted by a version other than the one its response and its buffer record name.
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from daemon.core.batch import BatchDecoder, Joining
from daemon.core.engine import (
    GenerationError,
    GenerationResult,
    Handoff,
    HandoffState,
    SpeculativeEngine,
)
from daemon.logging import get_logger
from daemon.serving.idle import IdleClock, IdleUnload
from daemon.serving.requests import (
    Done,
    FinishedHook,
    GenerationRequest,
    QueueFullError,
    RecordHook,
    RequestHandle,
    WorkerStoppedError,
)

log = get_logger("worker")


class GenerationWorker:
    """Runs requests on a dedicated thread: alone speculatively, together in a batch.

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
        adapter_version: Callable[[str | None], int] | None = None,
        batch_size: int = 1,
        idle_unload: IdleUnload | None = None,
        idle_tick: tuple[float, Callable[[], None]] | None = None,
        switch: Callable[[str], SpeculativeEngine] | None = None,
        model: str | None = None,
    ) -> None:
        self.engine = engine
        # the model in service (a request naming none means ``model``) and how to change it
        self.model = model
        self._default_model = model
        self.switch = switch
        self.on_finished = on_finished
        self.record = record
        self.adapter_version = adapter_version
        self._queue: queue.Queue[RequestHandle | Callable[[], None] | None] = queue.Queue()
        self._queue_size = queue_size
        self._pending = 0  # requests queued, not yet started
        self._lock = threading.Lock()
        self._accepting = True
        self._live: set[RequestHandle] = set()  # submitted and not yet finished (for abort)
        self._thread = threading.Thread(target=self._run, name="specd-generation", daemon=True)
        self.batch = BatchDecoder(engine, max(1, batch_size))
        # the worker thread's own state
        self._waiting: deque[RequestHandle] = deque()  # taken off the queue, not started
        self._jobs: deque[Callable[[], None]] = deque()
        self._lone: _Lone | None = None
        self._batched: dict[int, _Started] = {}
        # reading their prompts, a chunk per turn, before they join the batch
        self._joining: deque[tuple[_Started, Joining]] = deque()
        # every started request until its final event, by request id: what a failure ends
        self._running: dict[int, _Started] = {}
        self._stopping = False
        # frees each model after its keep-alive (needs ``switch``: a freed model in service
        # is put back by switching to it) and runs the tick on this thread
        self.idle = IdleClock(idle_unload if switch is not None else None, idle_tick)

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

    def wake(self) -> None:
        """Make an idle worker look at its state again (e.g. a new ``keep_alive``)."""
        self._queue.put(_nothing)

    def abort(self) -> None:
        """Stop accepting and cancel every queued and running request (a forced shutdown):
        each ends at its next round with finish_reason "cancelled"."""
        with self._lock:
            self._accepting = False
            live = list(self._live)
        for handle in live:
            handle.cancel()

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

    @property
    def batch_size(self) -> int:
        return self.batch.max_batch

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.batch.max_batch = max(1, value)  # members beyond it finish; none join meanwhile

    @property
    def active(self) -> GenerationRequest | None:
        """A request being decoded now (None when idle)."""
        lone = self._lone
        if lone is not None:
            return lone.started.handle.request
        batched = list(self._batched.values())
        return batched[0].handle.request if batched else None

    @property
    def batched(self) -> int:
        """Requests being decoded together in the batch now (or reading their prompts to
        join it)."""
        return len(self._batched) + len(self._joining)

    # --- submitting ------------------------------------------------------------------------

    def submit(self, handle: RequestHandle) -> RequestHandle:
        """Queue a request; raises `QueueFullError` or `WorkerStoppedError`."""
        with self._lock:
            if not self._accepting:
                raise WorkerStoppedError("the server is shutting down")
            if self._pending >= self._queue_size:
                raise QueueFullError(f"request queue is full ({self._queue_size} waiting)")
            self._pending += 1
            self._live.add(handle)
        self._queue.put(handle)
        return handle

    def call_between_requests(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the worker thread when no request is decoded speculatively."""
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
            try:
                if self._turn():
                    return
            except Exception as e:  # a bug must not kill the thread (and with it, serving)
                log.exception("worker_failed")
                self._fail_running(e)

    def _turn(self) -> bool:
        """One turn of the loop: take what arrived, start and step requests; True: stop."""
        block = self._idle and not self._stopping
        self._take(block, self.idle.wait_for(self._busy_model) if block else None)
        if self._idle and not self._stopping:
            self.idle.tick_if_due()
        if not self._stopping and self.model in self.idle.free_due(self._busy_model):
            self.model = None  # its next request puts it back (``switch``)
        if self._lone is None:
            while self._jobs:
                self._jobs.popleft()()
        if self._stopping and self._idle:
            return True
        self._drop_cancelled()
        self._admit()
        if self._lone is not None:
            self._step_lone()
        else:
            self._read_joinings()  # a chunk of each joining prompt, then a member step
            if self._batched:
                self._step_batch()
                self._release_lone_member()
        return False

    def _fail_running(self, error: Exception) -> None:
        """End every started request with ``error`` and start over with an empty batch.

        ``_running`` holds every request from its start to its final event, wherever it is
        (alone, in the batch, or between the two in a hand-over that raised), so none is left
        without an answer."""
        lone, self._lone = self._lone, None
        self._batched.clear()
        self._joining.clear()
        if lone is not None:
            try:
                lone.gen.close()
            except Exception:  # its own failure: the request still gets the error below
                log.exception(
                    "generation_close_failed", request_id=lone.started.handle.request.log_id
                )
        try:
            self.batch = BatchDecoder(self.engine, self.batch.max_batch)
        except Exception:  # noqa: BLE001 - the next batch is made when one is needed
            log.exception("batch_reset_failed")
        for started in list(self._running.values()):
            self._end(started.handle, Done(None, error=error, queue_s=started.queue_s))

    @property
    def _busy_model(self) -> str | None:
        """The model that must stay loaded now: the one in service unless all is idle."""
        return None if self._idle else self.model

    @property
    def _idle(self) -> bool:
        return (
            self._lone is None
            and not self._batched
            and not self._joining
            and not self._waiting
            and not self._jobs
        )

    @property
    def _batch_full(self) -> bool:
        return len(self.batch) + len(self._joining) >= self.batch.max_batch

    def _take(self, block: bool, timeout: float | None = None) -> None:
        """Move what arrived on the queue into the worker's own lists (wait for it if
        ``block``, at most ``timeout`` seconds)."""
        while True:
            try:
                item = self._queue.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                return
            block = False
            if item is None:
                self._stopping = True
            elif isinstance(item, RequestHandle):
                self._waiting.append(item)
            elif item is not _nothing:
                self._jobs.append(item)

    def _drop_cancelled(self) -> None:
        for handle in [h for h in self._waiting if h.cancelled]:
            self._waiting.remove(handle)
            self._start(handle)  # counts it as started, then ends it unstarted
        for uid, started in list(self._batched.items()):
            if started.handle.cancelled:
                del self._batched[uid]
                self._finish(started, self.batch.cancel(uid))

    def _admit(self) -> None:
        """Start waiting requests for the model in service: alone when nothing else runs,
        else into the batch; a request for another model first waits for them to finish."""
        if self._waiting and not self._in_service(self._waiting[0]):
            if self._lone is not None or self._batched or self._joining:
                return
            self._switch_to(self._waiting.popleft())
            return  # the next turn starts it (or the next one, if the switch failed)
        batching = self.batch.max_batch > 1
        if self._waiting and batching and self._lone is not None and not self._batch_full:
            self._hand_over()
        while self._waiting and self._in_service(self._waiting[0]):
            if (
                self._lone is None
                and not self._batched
                and not self._joining
                and (self._next_for_model() == 1 or not batching)
            ):
                self._start_lone(self._waiting.popleft())
                return
            if self._lone is not None or self._batch_full:
                return
            self._start_batched(self._waiting.popleft())

    def _model_of(self, handle: RequestHandle) -> str | None:
        return handle.request.model or self._default_model

    def _in_service(self, handle: RequestHandle) -> bool:
        return self.switch is None or self._model_of(handle) == self.model

    def _next_for_model(self) -> int:
        """How many requests at the front of the line are for the model in service."""
        n = 0
        for handle in self._waiting:
            if not self._in_service(handle):
                break
            n += 1
        return n

    def _switch_to(self, handle: RequestHandle) -> None:
        """Put ``handle``'s model in service (the worker is idle); it goes back to the front
        of the line. If the model cannot be loaded, the request ends with the error."""
        assert self.switch is not None
        name = self._model_of(handle)
        assert name is not None
        try:
            engine = self.switch(name)
            batch = BatchDecoder(engine, self.batch.max_batch)
        except Exception as e:  # a model that will not load fails its request, not the worker
            log.exception("model_switch_failed", model=name, request_id=handle.request.log_id)
            with self._lock:
                self._pending -= 1
            self._end(handle, Done(None, error=e))
            return
        self.engine, self.batch, self.model = engine, batch, name
        self._waiting.appendleft(handle)

    def _start(self, handle: RequestHandle) -> _Started | None:
        """Count a request as started; None (after its final event) if it was cancelled."""
        with self._lock:
            self._pending -= 1
        req = handle.request
        started = _Started(handle, time.monotonic(), GenerationResult())
        if handle.cancelled:
            self._end(handle, Done(None, error=None, queue_s=started.queue_s))
            return None
        try:
            if self.adapter_version is not None:
                req.adapter_version = self.adapter_version(req.model)
        except Exception as e:  # a bug here must end this request, not leave it waiting
            log.exception("generation_failed", request_id=req.log_id)
            self._end(handle, Done(None, error=e, queue_s=started.queue_s))
            return None
        self._running[req.id] = started
        return started

    def _start_lone(self, handle: RequestHandle) -> None:
        started = self._start(handle)
        if started is None:
            return
        req = handle.request
        try:
            gen = self.engine.generate(
                req.prompt_tokens, req.params, started.result, req.constraint
            )
        except GenerationError as e:
            self._end(handle, Done(None, error=e, queue_s=started.queue_s))
            return
        except Exception as e:  # a bug or an MLX failure: this request's error, not a hang
            log.exception("generation_failed", request_id=req.log_id)
            self._end(handle, Done(None, error=e, queue_s=started.queue_s))
            return
        self._lone = _Lone(started, gen)

    def _start_batched(self, handle: RequestHandle) -> None:
        started = self._start(handle)
        if started is not None:
            self._add_to_batch(started)

    def _add_to_batch(self, started: _Started) -> None:
        """Start reading its prompt; it joins once read (`_read_joining`)."""
        handle = started.handle
        req = handle.request
        try:
            joining = self.batch.join(req.prompt_tokens, req.params, started.result, req.constraint)
        except Exception as e:  # invalid (GenerationError) or an MLX failure: this one's error
            if not isinstance(e, GenerationError):
                log.exception("generation_failed", request_id=req.log_id)
            self._end(handle, Done(None, error=e, queue_s=started.queue_s))
            return
        self._joining.append((started, joining))

    def _read_joinings(self) -> None:
        for started, joining in list(self._joining):
            self._read_joining(started, joining)

    def _read_joining(self, started: _Started, joining: Joining) -> None:
        """One chunk of a joining prompt (a long prompt neither stalls the batch nor outlives
        its client); once read, its first token, and it is a member."""
        handle = started.handle
        try:
            if not handle.cancelled and not self.batch.read(joining):
                return  # more chunks to read
            self._joining.remove((started, joining))
            if handle.cancelled:
                self._finish(started, self.batch.drop(joining))
                return
            uid, first = self.batch.admit(joining)
        except Exception as e:  # a bug or an MLX failure must not kill the worker thread
            if (started, joining) in self._joining:
                self._joining.remove((started, joining))
            log.exception("generation_failed", request_id=handle.request.log_id)
            self._end(handle, Done(None, error=e, queue_s=started.queue_s))
            return
        handle.emit(first)
        if uid is None:  # its first token ended it
            self._finish(started, started.result)
        else:
            self._batched[uid] = started

    def _hand_over(self) -> None:
        """Move the speculative request into the batch, from where it stands."""
        lone = self._lone
        assert lone is not None
        self._lone = None
        req = lone.started.handle.request
        if inspect.getgeneratorstate(lone.gen) == inspect.GEN_CREATED:
            # not started yet (nothing to throw into): it joins as it stood when it was made
            lone.gen.close()
            if lone.resumed is None:
                self._add_to_batch(lone.started)
            else:
                uid = self.batch.adopt(
                    lone.resumed, req.params, lone.started.result, req.constraint
                )
                self._batched[uid] = lone.started
            return
        try:
            lone.gen.throw(Handoff())
        except StopIteration:
            pass
        state = self.engine.handed_off
        self.engine.handed_off = None
        assert state is not None, "the engine ends a handed-off generation with its state"
        uid = self.batch.adopt(state, req.params, lone.started.result, req.constraint)
        self._batched[uid] = lone.started

    def _release_lone_member(self) -> None:
        """A batch down to one member with nobody waiting: it goes on speculatively (a lone
        request keeps the speculative path, whether it started alone or not)."""
        if len(self._batched) != 1 or self._waiting or self._joining or self._stopping:
            return
        ((uid, started),) = self._batched.items()
        req = started.handle.request
        if started.handle.cancelled or not self.batch.releasable(uid, req.params):
            return
        if (
            self.adapter_version is not None
            and self.adapter_version(req.model) != req.adapter_version
        ):
            # the draft was swapped since it started: it ends in the batch (target only), so
            # that every request is drafted by the version it reports and is recorded under
            return
        del self._batched[uid]
        state = self.batch.release(uid)
        gen = self.engine.resume(state, req.params, started.result, req.constraint)
        self._lone = _Lone(started, gen, state)

    def _step_lone(self) -> None:
        lone = self._lone
        assert lone is not None
        handle = lone.started.handle
        try:
            if handle.cancelled:
                lone.gen.close()  # ends it as "cancelled"
                result = lone.started.result
                # a generator closed before its first step never ran its own bookkeeping
                result.finish_reason = result.finish_reason or "cancelled"
                result.stats.generation_tokens = len(result.tokens)
                chunk = None
            else:
                chunk = next(lone.gen, None)
                if chunk is not None:
                    handle.emit(chunk)
            if chunk is not None and chunk.result is None:
                return  # more to come
            lone.gen.close()
        except GenerationError as e:
            self._lone = None
            self._end(handle, Done(None, error=e, queue_s=lone.started.queue_s))
            return
        except Exception as e:  # a bug or an MLX failure must not kill the worker thread
            self._lone = None
            log.exception("generation_failed", request_id=handle.request.log_id)
            self._end(handle, Done(None, error=e, queue_s=lone.started.queue_s))
            return
        self._lone = None
        self._finish(lone.started, lone.started.result)

    def _step_batch(self) -> None:
        try:
            chunks = self.batch.step()
        except Exception as e:  # every member fails with it; the worker goes on
            log.exception(
                "batch_step_failed",
                requests=[s.handle.request.log_id for s in self._batched.values()],
            )
            self._fail_running(e)
            return
        for uid, chunk in chunks:
            member = self._batched.get(uid)
            if member is None:
                continue
            member.handle.emit(chunk)
            if chunk.result is not None:
                del self._batched[uid]
                self._finish(member, chunk.result)

    def _finish(self, started: _Started, result: GenerationResult) -> None:
        """A request that produced a result: record it, then its final event and hooks."""
        req = started.handle.request
        self.idle.used(self._model_of(started.handle), req.keep_alive)
        total_s = time.monotonic() - req.enqueued
        recorded = None
        if self.record is not None and result.finish_reason != "error":
            try:
                recorded = self.record(req, result)
            except Exception:  # a full or closed buffer must not fail the response
                log.exception("record_failed", request_id=req.log_id)
        self._end(
            started.handle,
            Done(result, queue_s=started.queue_s, total_s=total_s, recorded=recorded),
        )
        if self.on_finished is not None:
            try:
                self.on_finished(req, result, started.queue_s, total_s)
            except Exception:
                log.exception("on_finished_failed", request_id=req.log_id)

    def _end(self, handle: RequestHandle, done: Done) -> None:
        self._running.pop(handle.request.id, None)
        handle.emit(done)
        with self._lock:
            self._live.discard(handle)


def _nothing() -> None:
    """Queued by `GenerationWorker.wake`: no work, only a look at the state."""


@dataclass
class _Started:
    handle: RequestHandle
    started: float
    result: GenerationResult

    @property
    def queue_s(self) -> float:
        return self.started - self.handle.request.enqueued


@dataclass
class _Lone:
    """The request decoded speculatively now, and its engine generator."""

    started: _Started
    gen: Any  # Generator[GenerationChunk, None, None]
    resumed: HandoffState | None = None  # where a resumed generation started from
