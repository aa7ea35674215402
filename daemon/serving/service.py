"""The generation service without HTTP: models, engine, worker thread and replay buffer.

The HTTP server and in-process ``specd collect`` both serve through it, so a request is encoded,
generated and recorded the same way whoever sent it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
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
from daemon.core.models import ModelPair, Offloaded, load_pair, offload
from daemon.core.prompt_cache import PromptCache
from daemon.core.prompts import encode_prompt, prompt_text
from daemon.core.speed import StepCosts
from daemon.logging import get_logger
from daemon.serving.requests import BlockingHandle, FinishedHook, GenerationRequest, RequestHandle
from daemon.serving.worker import GenerationWorker
from daemon.store.adapters import AdapterVersion, apply_adapter
from daemon.store.buffer import BufferRecord, BufferWriter, ReplayBuffer

log = get_logger("service")


class Service:
    """Owns the loaded pair, the generation worker and the buffer writer."""

    def __init__(self, settings: Settings, pair: ModelPair | None = None) -> None:
        self.settings = settings
        self.pair = pair
        self.engine: SpeculativeEngine | None = None
        self.worker: GenerationWorker | None = None
        self.writer: BufferWriter | None = None
        self.buffer: ReplayBuffer | None = None  # reader for /status and CLI stats
        self.adapter_version = 0
        self.adapter_path: str | None = None
        self.last_activity = time.monotonic()
        self.finished_hooks: list[FinishedHook] = []
        self.commit_hooks: list[Callable[[list[BufferRecord]], None]] = [self._index_outputs]
        # Past outputs to draft from; filled from the buffer at start, then as records commit.
        self.suffix = SuffixIndex(settings.speculative.suffix_tokens)
        self._offloaded: Offloaded | None = None  # models.keep_alive_seconds
        # run by the idle worker every so often (rank 0 of a group: the heartbeat)
        self.idle_tick: tuple[float, Callable[[], None]] | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Load models (unless given), open the buffer, start the worker."""
        s = self.settings
        # Open the buffer first: a corrupt file stops start-up, untouched, before a slow load.
        self.writer = BufferWriter(s.paths.data_dir, s.buffer, on_commit=self._committed)
        self.writer.start()
        self.buffer = ReplayBuffer(s.paths.data_dir, s.buffer).open()
        for output in self.buffer.recent_outputs(self.suffix.budget):
            self.suffix.add(output)
        if self.pair is None:
            self.pair = load_pair(s)
        self.engine = SpeculativeEngine(
            self.pair.target,
            self.pair.draft,
            self.pair.tokenizer,
            SpeculativeConfig.from_settings(s.speculative, self.pair.max_context),
            suffix=self.suffix,
            prompt_cache=self._prompt_cache(),
        )
        self.worker = GenerationWorker(
            self.engine,
            s.server.queue_size,
            self._finished,
            record=self._record,
            adapter_version=lambda: self.adapter_version,
            batch_size=s.server.batch_size,
            keep_alive=s.models.keep_alive_seconds,
            unload=self._unload_models,
            load=self._load_models,
            idle_tick=self.idle_tick,
        )
        shutil.rmtree(self._offload_dir, ignore_errors=True)  # a previous run's, if it died
        self.worker.start()

    def _prompt_cache(self) -> PromptCache:
        """The prompt cache; with a target split across ranks, one they all keep in step."""
        size, nbytes = (
            self.settings.server.prompt_cache_size,
            self.settings.server.prompt_cache_bytes,
        )
        assert self.pair is not None
        if isinstance(self.pair.target, MirroredTarget):
            return MirroredPromptCache(size, nbytes, self.pair.target)
        return PromptCache(size, nbytes)

    # --- idle unload (models.keep_alive_seconds); both run on the worker thread -------------

    @property
    def _offload_dir(self) -> Path:
        return self.settings.paths.data_dir / "offloaded"

    def _unload_models(self) -> None:
        """Write the weights to the data dir and free them (and the prompt cache)."""
        assert self.pair is not None and self.engine is not None
        t0 = time.perf_counter()
        pair, engine = self.pair, self.engine
        engine.prompt_cache.clear()
        models = [pair.target, pair.draft, engine.draft]
        if pair.base_draft is not None:
            models.append(pair.base_draft)
        self._offloaded = offload(models, self._offload_dir / "weights.safetensors")
        log.info(
            "models_unloaded",
            idle_s=round(time.monotonic() - self.last_activity, 1),
            duration_s=round(time.perf_counter() - t0, 3),
        )

    def _load_models(self) -> None:
        if self._offloaded is None:
            return
        t0 = time.perf_counter()
        self._offloaded.restore()
        self._offloaded = None
        log.info("models_loaded_again", duration_s=round(time.perf_counter() - t0, 3))

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

    def swap_adapter(self, version: AdapterVersion | None) -> Future:
        """Put ``version`` (None: no adapter) into service between requests.

        Runs on the worker thread, so in-flight requests finish on the old draft and the next
        one uses the new. The future raises `AdapterError` (old draft kept) if it does not fit.
        """
        assert self.worker is not None and self.pair is not None and self.engine is not None
        pair, engine = self.pair, self.engine

        def swap() -> float:
            t0 = time.perf_counter()
            draft = apply_adapter(pair.fresh_draft, version)  # raises before anything changes
            engine.draft = draft
            self.adapter_version = version.version if version else 0
            self.adapter_path = str(version.path) if version else None
            seconds = time.perf_counter() - t0
            log.info(
                "adapter_swapped",
                adapter_version=self.adapter_version,
                duration_s=round(seconds, 4),
            )
            return seconds

        return self.worker.call_between_requests(swap)

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
        )
        handle = BlockingHandle(req)
        self.submit(handle)
        return handle.result()

    # --- bookkeeping -----------------------------------------------------------------------

    def _record(self, req: GenerationRequest, result: GenerationResult) -> Future[int] | None:
        writer, pair = self.writer, self.pair
        if not (req.record and result.tokens) or writer is None or pair is None:
            return None
        return writer.submit(
            BufferRecord.from_result(
                req.prompt_text,
                req.prompt_tokens,
                result,
                pair.target_id,
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
        """Train outputs become draftable as soon as they commit; holdout rows never do."""
        for r in records:
            if r.split == "train":
                self.suffix.add(r.output_tokens)

    def _committed(self, records: list[BufferRecord]) -> None:
        for hook in self.commit_hooks:
            hook(records)
