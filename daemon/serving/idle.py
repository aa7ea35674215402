"""What an idle generation worker waits for: its models' keep-alive and a periodic tick.

`IdleUnload` (`daemon.serving.service.Service`) frees each model after its own keep-alive
without requests, never the one being decoded; the tick is the heartbeat rank 0 of a group
sends (`daemon.core.distributed`). `IdleClock` is the worker's view of both: how long it may
block, and what is due when it wakes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from daemon.logging import get_logger

log = get_logger("worker")


class IdleUnload(Protocol):
    """Frees idle models (`daemon.serving.service.Service`); called on the worker thread."""

    def used(self, model: str | None, keep_alive: float | None) -> None:
        """A request for ``model`` finished, asking to keep it ``keep_alive`` seconds."""

    def unload_in(self, busy: str | None) -> float | None:
        """Seconds until a model other than ``busy`` is due to be freed; None: none is."""

    def unload_due(self, busy: str | None) -> list[str]:
        """Free the models (not ``busy``) that are due; their names."""


class IdleClock:
    """The unload timers and the tick of one worker; ``busy`` is the model that must stay
    loaded (None when all is idle)."""

    def __init__(
        self,
        unload: IdleUnload | None = None,
        tick: tuple[float, Callable[[], None]] | None = None,
    ) -> None:
        self.unload = unload
        self.tick = tick  # (seconds, fn): fn runs after that long idle, again and again
        self._last_tick = time.monotonic()

    def used(self, model: str | None, keep_alive: float | None) -> None:
        """A request for ``model`` finished: as Ollama, each request sets its model's timer."""
        if self.unload is not None:
            self.unload.used(model, keep_alive)

    def unload_in(self, busy: str | None) -> float | None:
        """Seconds until a model is due to be freed; None: none is (now)."""
        return None if self.unload is None else self.unload.unload_in(busy)

    def wait_for(self, busy: str | None) -> float | None:
        """How long an idle worker may block: until a model unloads or the next tick."""
        waits = [self.unload_in(busy)]
        if self.tick is not None:
            waits.append(max(0.0, self._last_tick + self.tick[0] - time.monotonic()))
        known = [w for w in waits if w is not None]
        return min(known) if known else None

    def tick_if_due(self) -> None:
        if self.tick is None:
            return
        every, tick = self.tick
        if time.monotonic() - self._last_tick >= every:
            self._last_tick = time.monotonic()
            tick()

    def free_due(self, busy: str | None) -> list[str]:
        """Free the models that are due (none when nothing is); their names."""
        if self.unload is None or self.unload_in(busy) != 0:
            return []
        try:
            return self.unload.unload_due(busy)
        except Exception:  # the models stay as they were: serving is unaffected
            log.exception("models_unload_failed")
            return []
