"""Serving as a group of ranks (``mlx.launch ... -- specd serve``): rank 0's side and the
other ranks' loop.

Rank 0 is a normal daemon whose target is a `MirroredTarget`: HTTP, buffer, scheduler, logs,
draft and adapters live there alone. Its idle worker sends a heartbeat every quarter of
``server.rank_timeout_seconds`` so the others notice a silent rank 0. The others run
`run_follower`: load their share, then compute the forwards rank 0 asks for until it stops;
they write nothing into the data directory and log to stderr only.

Two settings are fixed while serving as a group (`fit_settings`): ``server.batch_size`` 1
(a batch holds several live KV caches; the other ranks mirror one at a time) and
``models.keep_alive_seconds`` unset. The prompt cache works: every rank keeps its share of
each entry (`daemon.core.distributed.MirroredPromptCache`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mlx_lm.models.cache import LRUPromptCache

from daemon.config import Settings
from daemon.core.distributed import (
    Channel,
    Group,
    GroupLost,
    MirroredTarget,
    Watchdog,
    follow,
)
from daemon.core.models import ModelPair, load_sharded_target
from daemon.errors import SpecdError
from daemon.logging import get_logger
from daemon.serving import notify

log = get_logger("distributed")

# What serving as a group fixes, and why (logged when a config asks for something else).
FIXED = {
    "server.batch_size": (1, "a batch holds several KV caches; the other ranks mirror one"),
    "models.keep_alive_seconds": (None, "the other ranks cannot unload in step"),
}


def fit_settings(settings: Settings) -> Settings:
    """``settings`` with the keys in `FIXED` at their group values; each one a config asked
    otherwise is logged (``fixed_in_distributed_mode``), never silently changed."""
    server: dict[str, Any] = {}
    models: dict[str, Any] = {}
    for key, (value, why) in FIXED.items():
        section, name = key.split(".")
        current = getattr(getattr(settings, section), name)
        if current != value:
            log.warning("fixed_in_distributed_mode", key=key, asked=current, used=value, why=why)
            (server if section == "server" else models)[name] = value
    return settings.model_copy(
        update={
            "server": settings.server.model_copy(update=server),
            "models": settings.models.model_copy(update=models),
        }
    )


class RankZero:
    """Rank 0's end of the group: wraps the loaded pair's target, sends heartbeats, reports
    the group, tells the others to stop."""

    def __init__(
        self,
        group: Group,
        settings: Settings,
        on_lost: Callable[[GroupLost], None],
        on_timeout: Callable[[str, float], None],
    ) -> None:
        self.group = group
        self.channel = Channel(group)
        self.watchdog = Watchdog(settings.server.rank_timeout_seconds, on_timeout)
        self.mirror: MirroredTarget | None = None
        self._on_lost = on_lost
        self.started = time.monotonic()

    @property
    def heartbeat_every(self) -> float:
        return max(0.1, self.watchdog.timeout / 4)

    def wrap(self, pair: ModelPair) -> None:
        """From now on every target forward runs on all ranks."""
        self.group.info.split = pair.split
        self.mirror = MirroredTarget(pair.target, self.channel, self.watchdog)
        self.mirror.on_lost = self._on_lost
        pair.target = self.mirror

    def heartbeat(self) -> None:
        """The idle worker's tick; a lost group was already reported through ``on_lost``."""
        if self.mirror is None or self.mirror.lost is not None:
            return
        try:
            self.mirror.heartbeat()
        except GroupLost:
            pass

    def set_timeout(self, seconds: float) -> None:
        self.watchdog.timeout = seconds

    def status(self) -> dict[str, Any]:
        out = self.group.info.to_dict()
        ch = self.channel
        out.update(
            messages=ch.messages,
            message_bytes=ch.bytes,
            message_seconds=round(ch.seconds, 4),
            rank_timeout_seconds=self.watchdog.timeout,
            lost=str(self.mirror.lost) if self.mirror is not None and self.mirror.lost else None,
        )
        return {"distributed": out}

    def stop(self) -> None:
        """Tell the other ranks to exit (they would otherwise wait for the timeout)."""
        try:
            if self.mirror is not None:
                self.mirror.stop_followers()
        except (GroupLost, RuntimeError) as e:
            log.warning("group_stop_failed", error=str(e))
        finally:
            self.watchdog.stop()


def run_follower(settings: Settings, group: Group) -> int:
    """A rank other than 0: load this rank's share of the target, then run the forwards
    rank 0 sends until it says stop. Exit status 1 (and an error naming rank 0) when rank 0
    dies or stops answering."""
    info = group.info
    log.info(
        "starting",
        rank=info.rank,
        size=info.size,
        backend=info.backend,
        hosts=info.hosts,
        target=settings.models.target,
    )
    t0 = time.perf_counter()
    try:
        loaded = load_sharded_target(settings, group)
    except SpecdError as e:
        log.error("failed", rank=info.rank, error=str(e))
        raise
    notify.ready(f"rank {info.rank} of {info.size}, following rank 0")
    log.info(
        "follower_ready",
        rank=info.rank,
        split=loaded.split,
        load_s=round(time.perf_counter() - t0, 2),
    )

    def expired(what: str, seconds: float) -> None:
        log.error(
            "rank_timeout",
            rank=info.rank,
            error=f"{info.describe_rank(0)} did not answer for {seconds:.1f} s ({what}); "
            "exiting so the service manager restarts the group",
        )

    watchdog = Watchdog(settings.server.rank_timeout_seconds, expired)
    channel = Channel(group)
    size, nbytes = settings.server.prompt_cache_size, settings.server.prompt_cache_bytes
    kept = LRUPromptCache(size, nbytes) if size > 0 else None  # this rank's KV of it
    try:
        forwards = follow(loaded.model, channel, watchdog, kept)
    except GroupLost as e:
        log.error("rank_lost", rank=info.rank, error=str(e))
        return 1
    finally:
        watchdog.stop()
        notify.stopping()
    log.info("stopped", rank=info.rank, forwards=forwards, messages=channel.messages)
    return 0
