"""One served model in memory: its pair, engine, suffix index, prompt cache and adapter.

A daemon serves ``models.target`` and the ``models.targets`` entries (`Settings.for_model`),
each a `ModelRuntime` the service owns. The worker decodes one model at a time and asks the
service for the engine of the next request's model (`daemon.serving.service.Service`), which
loads it on first use and frees the least recently used ones beyond ``models.max_loaded``
(`offload`: the weights go to the data dir, the module objects stay, so the engine, its
adapter and the prompt cache's owner keep working after `ModelRuntime.restore`).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path

from daemon.config import ModelEntry, Settings
from daemon.core.backend import release_freed_memory
from daemon.core.drafting import SuffixIndex
from daemon.core.engine import SpeculativeConfig, SpeculativeEngine
from daemon.core.models import (
    ModelPair,
    Offloaded,
    files_bytes,
    flat_parameters,
    load_pair,
    offload,
)
from daemon.core.prompt_cache import PromptCache
from daemon.logging import get_logger
from daemon.store.adapters import AdapterVersion, apply_adapter

log = get_logger("service")


class ModelRuntime:
    """A served model, by the name requests give; ``settings`` are the daemon's with
    ``models.*`` as they apply to it. Loaded by `load` (on the worker thread)."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        pair: ModelPair | None = None,
        entry: ModelEntry | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        # its models.targets entry as configured when it was added (None: models.target)
        self.entry = entry
        self.pair = pair
        self.engine: SpeculativeEngine | None = None
        # past outputs to draft from (filled from the buffer, then as records commit)
        self.suffix = SuffixIndex(settings.speculative.suffix_tokens)
        # the adapter in service, applied when the model loads if it is not loaded yet
        self.adapter: AdapterVersion | None = None
        self.offloaded: Offloaded | None = None
        self.last_used = 0.0
        # the last request's own keep_alive (Ollama's: each request sets it); None: configured
        self.request_keep_alive: float | None = None
        # its weights' bytes in memory, measured when they were last loaded (0: not yet)
        self.weight_bytes = 0

    @property
    def file_key(self) -> str:
        """A file-name-safe key for its name (its offloaded weights, its adapters and runs)."""
        return hashlib.sha256(self.name.encode()).hexdigest()[:16]

    @property
    def target_id(self) -> str:
        """The target as its buffer records name it (known before it is loaded)."""
        return self.pair.target_id if self.pair is not None else self.settings.models.target

    @property
    def adapter_version(self) -> int:
        """The version of the adapter in service (0: none)."""
        return self.adapter.version if self.adapter is not None else 0

    @property
    def started(self) -> bool:
        """Loaded once: its engine exists (its weights may be offloaded)."""
        return self.engine is not None

    @property
    def resident(self) -> bool:
        """Its weights are in memory."""
        return self.engine is not None and self.offloaded is None

    @property
    def keep_alive(self) -> float | None:
        """Seconds it stays in memory unused: the last request's keep_alive, else its
        configured models.keep_alive_seconds (None or inf: always)."""
        if self.request_keep_alive is not None:
            return self.request_keep_alive
        return self.settings.models.keep_alive_seconds

    def unload_at(self) -> float | None:
        """When (`time.monotonic`) it is freed for idleness if nothing uses it; None: never."""
        keep = self.keep_alive
        if not self.resident or keep is None or math.isinf(keep):
            return None
        return self.last_used + keep

    def expected_bytes(self) -> int:
        """Its weights' bytes in memory: as measured once loaded, else its files' size."""
        if self.weight_bytes:
            return self.weight_bytes
        return files_bytes(self.settings.models.target)

    def load(self, prompt_cache: Callable[[ModelPair], PromptCache]) -> SpeculativeEngine:
        """Load the pair (unless given) and make its engine; put offloaded weights back."""
        if self.engine is None:
            if self.pair is None:
                t0 = time.perf_counter()
                self.pair = load_pair(self.settings)
                log.info("model_loaded", model=self.name, load_s=round(time.perf_counter() - t0, 2))
            pair = self.pair
            self.engine = SpeculativeEngine(
                pair.target,
                pair.draft,
                pair.tokenizer,
                SpeculativeConfig.from_settings(self.settings.speculative, pair.max_context),
                suffix=self.suffix,
                prompt_cache=prompt_cache(pair),
            )
            if self.adapter is not None:  # put in service before it was first loaded
                self.engine.draft = apply_adapter(pair.fresh_draft, self.adapter)
        elif self.offloaded is not None:
            t0 = time.perf_counter()
            self.restore()
            log.info(
                "model_loaded_again", model=self.name, duration_s=round(time.perf_counter() - t0, 3)
            )
        self.weight_bytes = self._measure()
        self.last_used = time.monotonic()
        return self.engine

    def _measure(self) -> int:
        """The bytes of its weights in memory now (arrays shared by its models counted once)."""
        assert self.pair is not None and self.engine is not None
        models = [self.pair.target, self.pair.draft, self.engine.draft, self.pair.base_draft]
        arrays = {id(a): a for m in models if m is not None for _, a in flat_parameters(m)}
        return sum(int(a.nbytes) for a in arrays.values())

    def offload(self, path: Path) -> None:
        """Write its weights to ``path`` and free them (and its prompt cache)."""
        assert self.pair is not None and self.engine is not None
        pair, engine = self.pair, self.engine
        engine.prompt_cache.clear()
        models = [pair.target, pair.draft, engine.draft]
        if pair.base_draft is not None:
            models.append(pair.base_draft)
        self.offloaded = offload(models, path)

    def restore(self) -> None:
        if self.offloaded is not None:
            self.offloaded.restore()
            self.offloaded = None

    def release(self) -> None:
        """Drop its models (no longer served): their memory goes once nothing holds them."""
        if self.offloaded is not None:
            self.offloaded.path.unlink(missing_ok=True)
        if self.engine is not None:
            self.engine.prompt_cache.clear()
        self.pair = self.engine = self.offloaded = None
        release_freed_memory()

    def use_adapter(self, version: AdapterVersion | None) -> None:
        """Put ``version`` (None: none) in service; on the worker thread, between requests.
        Raises `AdapterError` (the old draft kept) if it does not fit."""
        if self.engine is not None:
            assert self.pair is not None
            self.restore()  # offloaded (another model in service): its weights come back
            self.engine.draft = apply_adapter(self.pair.fresh_draft, version)
        self.adapter = version
