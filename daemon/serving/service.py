"""The generation service without HTTP: models, engine, worker thread and replay buffer.

The HTTP server and in-process ``specd collect`` both serve through it, so a request is encoded,
generated and recorded the same way whoever sent it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from daemon.config import Settings
from daemon.core.distributed import MirroredPromptCache, MirroredTarget
from daemon.core.drafting import SuffixIndex
from daemon.core.engine import (
    GenerationResult,
    SamplingParams,
    SpeculativeConfig,
    SpeculativeEngine,
)
from daemon.core.models import ModelPair
from daemon.core.prompt_cache import PromptCache
from daemon.core.prompts import encode_prompt, prompt_text
from daemon.core.speed import StepCosts
from daemon.logging import get_logger
from daemon.serving.requests import BlockingHandle, FinishedHook, GenerationRequest, RequestHandle
from daemon.serving.runtime import ModelRuntime
from daemon.serving.worker import GenerationWorker
from daemon.store.adapters import AdapterVersion
from daemon.store.buffer import BufferRecord, BufferWriter, ReplayBuffer

log = get_logger("service")


class Service:
    """Owns the served models (`ModelRuntime`, ``models.target`` first), the generation
    worker and the buffer writer."""

    def __init__(self, settings: Settings, pair: ModelPair | None = None) -> None:
        self.settings = settings
        first, *others = settings.models.names()
        # models.target: the model a request naming none gets, the one that records and adapts;
        # named as its pair names it (a pair given ready-made may carry its own id)
        self.primary = ModelRuntime(pair.target_id if pair else first, settings, pair)
        self.runtimes = {self.primary.name: self.primary}
        for name in others:
            entry = settings.models.targets[name]
            self.runtimes[name] = ModelRuntime(name, settings.for_model(name), entry=entry)
        self.worker: GenerationWorker | None = None
        self.writer: BufferWriter | None = None
        self.buffer: ReplayBuffer | None = None  # reader for /status and CLI stats
        self.last_activity = time.monotonic()
        self.finished_hooks: list[FinishedHook] = []
        self.commit_hooks: list[Callable[[list[BufferRecord]], None]] = [self._index_outputs]
        # run by the idle worker every so often (rank 0 of a group: the heartbeat)
        self.idle_tick: tuple[float, Callable[[], None]] | None = None

    # the primary model's parts, by their old names (the adaptation loop, the server)
    @property
    def pair(self) -> ModelPair | None:
        return self.primary.pair

    @property
    def engine(self) -> SpeculativeEngine | None:
        return self.primary.engine

    @property
    def suffix(self) -> SuffixIndex:
        return self.primary.suffix

    @property
    def adapter_version(self) -> int:
        return self.primary.adapter_version

    @property
    def target_id(self) -> str:
        return self.primary.target_id

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Load models.target (unless given), open the buffer, start the worker."""
        s = self.settings
        # Open the buffer first: a corrupt file stops start-up, untouched, before a slow load.
        self.writer = BufferWriter(s.paths.data_dir, s.buffer, on_commit=self._committed)
        self.writer.start()
        self.buffer = ReplayBuffer(s.paths.data_dir, s.buffer).open()
        self._fill_suffix(self.primary)
        engine = self.primary.load(self._prompt_cache)
        self.worker = GenerationWorker(
            engine,
            s.server.queue_size,
            self._finished,
            record=self._record,
            adapter_version=self._adapter_version,
            batch_size=s.server.batch_size,
            idle_unload=self,
            idle_tick=self.idle_tick,
            switch=self._switch,  # models.targets may grow live
            model=self.primary.name,
        )
        shutil.rmtree(self._offload_dir, ignore_errors=True)  # a previous run's, if it died
        self.worker.start()

    def _fill_suffix(self, runtime: ModelRuntime) -> None:
        """Its suffix index from its own recorded outputs (the buffer names each target)."""
        assert self.buffer is not None
        mine = self.buffer.for_target(runtime.target_id)
        for output in mine.recent_outputs(runtime.suffix.budget):
            runtime.suffix.add(output)

    def _prompt_cache(self, pair: ModelPair) -> PromptCache:
        """A model's prompt cache; with a target split across ranks, one they all keep in
        step."""
        size, nbytes = (
            self.settings.server.prompt_cache_size,
            self.settings.server.prompt_cache_bytes,
        )
        if isinstance(pair.target, MirroredTarget):
            return MirroredPromptCache(size, nbytes, pair.target)
        return PromptCache(size, nbytes)

    # --- idle unload (models.keep_alive_seconds, per model); on the worker thread ------------

    @property
    def _offload_dir(self) -> Path:
        return self.settings.paths.data_dir / "offloaded"

    def used(self, model: str | None, keep_alive: float | None) -> None:
        """A request for ``model`` finished: its idle time starts now, for its keep_alive
        (None: the configured one)."""
        runtime = self.runtimes.get(model or self.primary.name)
        if runtime is not None:
            runtime.last_used = time.monotonic()
            runtime.request_keep_alive = keep_alive

    def set_keep_alive(self, model: str, keep_alive: float) -> None:
        """A request that only sets ``model``'s keep_alive (Ollama's empty prompt)."""
        self.used(model, keep_alive)
        if self.worker is not None:
            self.worker.wake()  # an idle worker sets its unload timer anew

    def unload_in(self, busy: str | None) -> float | None:
        """Seconds until a model other than ``busy`` is due to be freed; None: none is."""
        due = [
            t for r in self.runtimes.values() if r.name != busy and (t := r.unload_at()) is not None
        ]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def unload_due(self, busy: str | None) -> list[str]:
        """Free every model but ``busy`` whose keep_alive has passed; their names."""
        now, freed = time.monotonic(), []
        for runtime in list(self.runtimes.values()):
            at = runtime.unload_at()
            if runtime.name == busy or at is None or at > now:
                continue
            self._free(runtime, "keep_alive", idle_s=round(now - runtime.last_used, 1))
            freed.append(runtime.name)
        return freed

    def _free(self, runtime: ModelRuntime, reason: str, **fields: Any) -> None:
        """Write ``runtime``'s weights to the data dir and free them; logged with why."""
        t0 = time.perf_counter()
        runtime.offload(self._offload_path(runtime))
        log.info(
            "model_unloaded",
            model=runtime.name,
            reason=reason,
            duration_s=round(time.perf_counter() - t0, 3),
            **fields,
        )

    def _offload_path(self, runtime: ModelRuntime) -> Path:
        return self._offload_dir / f"{runtime.file_key}.safetensors"

    def _switch(self, name: str) -> SpeculativeEngine:
        """The worker's ``switch`` (on its thread, idle): ``name``'s engine, loaded or put back
        if need be, after freeing the least recently used models beyond models.max_loaded."""
        return self._ready(self.runtimes[name], None)

    def prepare(self, name: str) -> Future[ModelRuntime]:
        """Load model ``name`` for its first request (on the worker thread, between requests;
        the model in service keeps its weights however many are loaded)."""
        assert self.worker is not None, "service not started"
        runtime, worker = self.runtimes[name], self.worker
        in_service = self.runtimes.get(worker.model or "")

        def ready() -> ModelRuntime:
            self._ready(runtime, in_service)
            return runtime

        return worker.call_between_requests(ready)

    def _ready(self, runtime: ModelRuntime, keep: ModelRuntime | None) -> SpeculativeEngine:
        self._make_room(runtime, keep, runtime.expected_bytes())
        first = not runtime.started
        engine = runtime.load(self._prompt_cache)
        if first:
            self._fill_suffix(runtime)
        self._make_room(runtime, keep, runtime.weight_bytes)  # as it really came out
        return engine

    def _make_room(self, runtime: ModelRuntime, keep: ModelRuntime | None, needs: int) -> None:
        """Free the least recently used models (not ``runtime`` nor ``keep``) until
        ``runtime``, taking ``needs`` bytes, fits models.max_loaded and
        models.memory_budget_gb."""
        models = self.settings.models
        budget = None if models.memory_budget_gb is None else models.memory_budget_gb * 1e9
        others = sorted(
            (
                r
                for r in self.runtimes.values()
                if r.resident and r is not runtime and r is not keep
            ),
            key=lambda r: r.last_used,
        )
        kept = [keep] if keep is not None and keep.resident and keep is not runtime else []

        def over() -> str | None:
            if len(others) + len(kept) + 1 > models.max_loaded:
                return "models.max_loaded"
            total = needs + sum(r.weight_bytes for r in others + kept)
            return "models.memory_budget_gb" if budget is not None and total > budget else None

        while others and (reason := over()) is not None:
            self._free(others.pop(0), reason)
        if over() == "models.memory_budget_gb":
            log.warning(
                "model_over_memory_budget",
                model=runtime.name,
                needs_gb=round(needs / 1e9, 3),
                kept=[r.name for r in kept],
                budget_gb=models.memory_budget_gb,
            )

    def stop(self, timeout: float | None = None) -> bool:
        """Finish queued and in-flight requests (bounded), then flush and close the buffer."""
        finished = True
        if self.worker is not None:
            finished = self.worker.stop(timeout)
            if not finished:
                log.warning("requests_unfinished_at_shutdown", timeout_s=timeout)
        if self.writer is not None:
            self.writer.close(timeout=30)
        if self.buffer is not None:
            self.buffer.close()
        return finished

    # --- requests --------------------------------------------------------------------------

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        assert self.pair is not None
        return encode_prompt(self.pair.tokenizer, messages)

    def sampling_params(self, **overrides: Any) -> SamplingParams:
        """Request parameters, with the configured defaults where the caller gave none."""
        d = self.settings.sampling
        limit = self.settings.server.max_tokens_limit
        max_tokens = limit if d.max_tokens is None else min(d.max_tokens, limit)
        if self.pair is not None and self.pair.max_context is not None:
            max_tokens = min(max_tokens, self.pair.max_context)
        values: dict[str, Any] = {
            "temperature": d.temperature,
            "top_p": d.top_p,
            "top_k": d.top_k,
            "max_tokens": max_tokens,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**values)

    def submit(self, handle: RequestHandle) -> RequestHandle:
        assert self.worker is not None, "service not started"
        self.last_activity = time.monotonic()
        return self.worker.submit(handle)

    @property
    def draft(self) -> Any:
        """The draft in service (with its adapter, if any)."""
        assert self.engine is not None, "service not started"
        return self.engine.draft

    def buffer_status(self) -> dict[str, Any]:
        """``/status``'s ``buffer``: the replay buffer's counts and what the writer holds."""
        assert self.buffer is not None
        st = self.buffer.stats(trend_window=200, trend_buckets=4)
        out: dict[str, Any] = {
            "records": st.records,
            "train": st.train,
            "holdout": st.holdout,
            "failures": st.failures,
            "pending_failures": st.pending_failures,
            "used_for_training": st.used_for_training,
            "size_bytes": st.size_bytes,
            "max_records": st.max_records,
            "acceptance_trend": [asdict(b) for b in st.acceptance_trend],
        }
        writer = self.writer
        if writer is not None:  # records a full disk kept out: waiting in memory, or lost
            out["unsaved_records"] = writer.retry_backlog
            out["dropped_records"] = writer.dropped
            out["commit_failures"] = writer.commit_failures
        return {"buffer": out}

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted so far is committed; False on timeout."""
        return self.writer.flush(timeout) if self.writer is not None else True

    def idle_for(self) -> float:
        """Seconds since the last request finished; 0 while one is queued or running."""
        assert self.worker is not None
        if self.worker.queue_depth or self.worker.active is not None:
            return 0.0
        return time.monotonic() - self.last_activity

    @property
    def target_split(self) -> bool:
        """Whether the target is split across ranks (`daemon.core.distributed`)."""
        return bool(self.pair is not None and self.pair.split)

    def step_costs(self) -> StepCosts | None:
        """The live engine's measured step costs (`daemon.core.speed`), for the gate."""
        return StepCosts.from_policy(self.engine.policy) if self.engine is not None else None

    def swap_adapter(self, version: AdapterVersion | None, model: str | None = None) -> Future:
        """Put ``version`` (None: no adapter) into service for ``model`` (default:
        models.target) between requests.

        Runs on the worker thread, so in-flight requests finish on the old draft and the next
        one uses the new. The future raises `AdapterError` (old draft kept) if it does not fit.
        A model not loaded yet gets it when it loads.
        """
        assert self.worker is not None
        runtime = self.runtimes[model or self.primary.name]

        def swap() -> float:
            t0 = time.perf_counter()
            runtime.use_adapter(version)
            seconds = time.perf_counter() - t0
            log.info(
                "adapter_swapped",
                model=runtime.name,
                adapter_version=runtime.adapter_version,
                duration_s=round(seconds, 4),
            )
            return seconds

        return self.worker.call_between_requests(swap)

    def add_model(self, name: str, settings: Settings) -> ModelRuntime:
        """Serve models.targets entry ``name`` of ``settings`` (the reloaded ones, before
        `apply_settings` makes them current) from now on; it loads on its first request."""
        entry = settings.models.targets[name]
        runtime = ModelRuntime(name, settings.for_model(name), entry=entry)
        self.runtimes = {**self.runtimes, name: runtime}  # readers keep a whole dict
        return runtime

    def remove_model(self, name: str) -> None:
        """Stop serving ``name``: new requests for it are refused; its memory is freed
        between requests (one running for it finishes first)."""
        runtime = self.runtimes[name]
        if runtime is self.primary:
            raise ValueError("models.target cannot be removed while serving")
        self.runtimes = {k: v for k, v in self.runtimes.items() if k != name}
        if self.worker is not None:
            self.worker.call_between_requests(runtime.release)

    def apply_settings(self, new: Settings, live_keys: list[str]) -> None:
        """Make reloaded settings take effect in the worker and each model loaded so far
        (after models.targets changes were applied: `add_model`, `remove_model`); what must
        not overlap a speculative request runs between requests."""
        worker = self.worker
        assert worker is not None
        self.settings = new  # sampling defaults; the adaptation loop reads training.*
        if self.writer is not None:
            self.writer.settings = new.buffer  # failure threshold for new records
        changed = partial(_changed, live_keys)
        if changed("server.queue_size"):
            worker.queue_size = new.server.queue_size
        if changed("server.batch_size"):
            size = new.server.batch_size
            worker.call_between_requests(lambda: setattr(worker, "batch_size", size))
        resize = changed("server.prompt_cache_")
        # the main keys, or a models.targets entry's own
        respeculate = changed("speculative.") or any(".speculative." in k for k in live_keys)
        for runtime in self.runtimes.values():
            runtime.settings = new if runtime is self.primary else new.for_model(runtime.name)
            engine, pair = runtime.engine, runtime.pair
            if engine is None or pair is None:
                continue  # one loaded later reads its settings then
            if resize:
                size, nbytes = new.server.prompt_cache_size, new.server.prompt_cache_bytes
                worker.call_between_requests(partial(engine.prompt_cache.resize, size, nbytes))
            if respeculate:
                spec = runtime.settings.speculative  # an entry's own keys over the new ones
                config = SpeculativeConfig.from_settings(spec, pair.max_context)
                runtime.suffix.budget = spec.suffix_tokens  # from the next add
                worker.call_between_requests(partial(setattr, engine, "config", config))
        if "models.keep_alive_seconds" in live_keys or changed("models.targets."):
            worker.wake()  # an idle worker sets its unload timers anew

    def port(self, name: str) -> ModelPort:
        """Model ``name`` as its adaptive loop sees it (`daemon.adaptation.loop.ServingPort`)."""
        return ModelPort(self, self.runtimes[name])

    @property
    def name(self) -> str:
        return self.primary.name

    @property
    def state_dir(self) -> Path:
        """Where models.target's adapters and training runs live: the data dir itself."""
        return self.state_dir_of(self.primary)

    def state_dir_of(self, runtime: ModelRuntime) -> Path:
        """Where a served model's adapters and training runs live: models.target's in the data
        dir itself, another's under ``targets/<its file key>/``."""
        data_dir = self.settings.paths.data_dir
        return data_dir if runtime is self.primary else data_dir / "targets" / runtime.file_key

    def generate(
        self, messages: list[dict[str, str]], record: bool = True, **params: Any
    ) -> GenerationResult:
        """Blocking convenience: one chat request through the worker, recorded like any other
        unless ``record`` is False (evaluation traffic)."""
        req = GenerationRequest(
            prompt_tokens=self.encode_messages(messages),
            params=self.sampling_params(**params),
            prompt_text=prompt_text(messages),
            record=record,
            model=self.primary.name,
        )
        handle = BlockingHandle(req)
        self.submit(handle)
        return handle.result()

    # --- bookkeeping -----------------------------------------------------------------------

    def _adapter_version(self, model: str | None) -> int:
        return self.runtimes[model].adapter_version if model else self.primary.adapter_version

    def _record(self, req: GenerationRequest, result: GenerationResult) -> Future[int] | None:
        runtime = self.runtimes.get(req.model or self.primary.name, self.primary)
        writer, pair = self.writer, runtime.pair
        if not (req.record and result.tokens) or writer is None or pair is None:
            return None
        return writer.submit(
            BufferRecord.from_result(
                req.prompt_text,
                req.prompt_tokens,
                result,
                pair.target_id,  # each model's rows are its own (ReplayBuffer.for_target)
                pair.draft_id,
                req.adapter_version,  # fixed at its start, as its response says (worker)
            )
        )

    def _finished(
        self, req: GenerationRequest, result: GenerationResult, queue_s: float, total_s: float
    ) -> None:
        self.last_activity = time.monotonic()
        for hook in self.finished_hooks:
            hook(req, result, queue_s, total_s)

    def _index_outputs(self, records: list[BufferRecord]) -> None:
        """Train outputs become draftable, by the model that wrote them, as soon as they
        commit; holdout rows never do."""
        by_target = {r.target_id: r for r in self.runtimes.values()}
        for rec in records:
            runtime = by_target.get(rec.target_id)
            if rec.split == "train" and runtime is not None:
                runtime.suffix.add(rec.output_tokens)

    def _committed(self, records: list[BufferRecord]) -> None:
        for hook in self.commit_hooks:
            hook(records)


def _changed(live_keys: list[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in live_keys)


class ModelPort:
    """One of the other served models (models.targets) as its adaptive loop sees it: its
    settings, its rows of the buffer, its adapter; adapters and runs under
    ``<data dir>/targets/<digest of its name>/``."""

    def __init__(self, service: Service, runtime: ModelRuntime) -> None:
        self._service, self._runtime = service, runtime

    @property
    def name(self) -> str:
        return self._runtime.name

    @property
    def settings(self) -> Settings:
        return self._service.settings.for_model(self._runtime.name)  # follows a live reload

    @property
    def buffer(self) -> ReplayBuffer | None:
        return self._service.buffer

    @property
    def target_id(self) -> str:
        return self._runtime.target_id

    @property
    def adapter_version(self) -> int:
        return self._runtime.adapter_version

    @property
    def commit_hooks(self) -> list[Callable[[list[BufferRecord]], None]]:
        return self._service.commit_hooks

    @property
    def target_split(self) -> bool:
        return False  # a group serves models.target alone

    @property
    def state_dir(self) -> Path:
        return self._service.state_dir_of(self._runtime)

    def swap_adapter(self, version: AdapterVersion | None) -> Future:
        return self._service.swap_adapter(version, self._runtime.name)

    def idle_for(self) -> float:
        return self._service.idle_for()

    def step_costs(self) -> StepCosts | None:
        engine = self._runtime.engine
        return StepCosts.from_policy(engine.policy) if engine is not None else None
