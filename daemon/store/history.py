"""What the status page draws, from what the daemon already stores: served traffic over time
from the replay buffer (every request's statistics and time), and the training runs from their
directories (result, steps) and the adapter store (each version's gate decision).

History survives restarts because nothing here is kept in memory: each call reads the files.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.store.adapters import AdapterStore
from daemon.store.buffer import ReplayBuffer
from daemon.store.runs import RESULT_FILE, read_result, read_steps

MAX_BUCKETS = 2000  # a request for finer steps gets this many at most


@dataclass
class SourceCounts:
    drafted: int = 0
    accepted: int = 0


@dataclass
class Bucket:
    """The requests that finished in ``[start, start + step)``."""

    start: float
    requests: int = 0
    generation_tokens: int = 0
    generation_seconds: float = 0.0  # decoding time, prefill excluded
    drafted: int = 0
    accepted: int = 0
    by_source: dict[str, SourceCounts] = field(default_factory=dict)
    adapter_versions: list[int] = field(default_factory=list)  # in service for its requests

    @property
    def tokens_per_s(self) -> float | None:
        if self.generation_seconds <= 0:
            return None
        return self.generation_tokens / self.generation_seconds

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def add(self, adapter_version: int, stats: dict[str, Any]) -> None:
        self.requests += 1
        self.generation_tokens += int(stats.get("generation_tokens") or 0)
        self.generation_seconds += float(stats.get("generation_time") or 0.0)
        self.drafted += int(stats.get("drafted") or 0)
        self.accepted += int(stats.get("accepted") or 0)
        accepted = stats.get("accepted_by_source") or {}
        for source, n in (stats.get("drafted_by_source") or {}).items():
            counts = self.by_source.setdefault(source, SourceCounts())
            counts.drafted += int(n)
            counts.accepted += int(accepted.get(source, 0))
        if adapter_version not in self.adapter_versions:
            self.adapter_versions.append(adapter_version)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tokens_per_s"] = self.tokens_per_s
        out["acceptance_rate"] = self.acceptance_rate
        return out


@dataclass
class TrafficHistory:
    """Buckets of ``step`` seconds from ``since`` to ``until`` (empty ones included)."""

    since: float
    until: float
    step: float
    target: str | None
    buckets: list[Bucket]

    def to_dict(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "until": self.until,
            "step": self.step,
            "target": self.target,
            "buckets": [b.to_dict() for b in self.buckets],
        }


def traffic_history(
    buffer: ReplayBuffer, since: float, until: float | None = None, step: float | None = None
) -> TrafficHistory:
    """The buffer's records created in ``[since, until)`` (of its target, if scoped), per
    ``step`` seconds (default: about 100 buckets; never more than `MAX_BUCKETS`)."""
    until = time.time() if until is None else until
    if until <= since:
        raise ValueError(f"until ({until}) must be after since ({since})")
    span = until - since
    step = span / 100 if step is None else step
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    step = max(step, span / MAX_BUCKETS)
    buckets = [Bucket(since + i * step) for i in range(math.ceil(span / step))]
    for created, adapter_version, stats in buffer.iter_stats(since, until):
        i = min(int((created - since) // step), len(buckets) - 1)
        buckets[i].add(adapter_version, stats)
    return TrafficHistory(since, until, step, buffer.target, buckets)


@dataclass
class RunView:
    """One training run as the page shows it: when, how it went, its steps, the gate."""

    run_id: str
    started: float | None
    status: str  # ok, error, or running (no result yet)
    error: str | None
    steps: list[dict[str, Any]]
    summary: dict[str, Any]  # the result's figures (loss first/last, agreement, seconds, ...)
    gate: dict[str, Any] | None  # the stored version's gate decision, if it was stored
    version: int | None  # that version

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run_started(run_id: str) -> float | None:
    """Run ids begin with their start time (``20261204-162106-...``)."""
    try:
        return datetime.strptime(run_id[:15], "%Y%m%d-%H%M%S").timestamp()
    except ValueError:
        return None


def run_history(runs_dir: Path, store: AdapterStore, limit: int = 50) -> list[RunView]:
    """The newest ``limit`` runs in ``runs_dir`` (oldest first) with their steps, and the gate
    decision of the version each stored."""
    if not runs_dir.is_dir():
        return []
    by_run = {str(v.manifest.get("run_id")): v for v in store.versions()}
    out: list[RunView] = []
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir())[-limit:]:
        result_file = d / RESULT_FILE
        summary: dict[str, Any] = {}
        status: str
        error: str | None
        if result_file.exists():
            result = read_result(result_file)
            status, error = result.status, result.error
            m = result.metrics
            if m is not None:
                summary = {
                    "steps": m.steps,
                    "loss_first": m.loss_first,
                    "loss_last": m.loss_last,
                    "grad_norm_mean": m.grad_norm_mean,
                    "skipped_micro_batches": m.skipped_micro_batches,
                    "heldout_before": m.heldout_before.agreement,
                    "heldout_after": m.heldout_after.agreement,
                    "holdout_rows": m.examples.holdout_rows,
                    "train_seconds": m.train_seconds,
                    "wall_s": m.wall_s,
                }
        else:
            status, error = "running", None
        version = by_run.get(d.name)
        out.append(
            RunView(
                run_id=d.name,
                started=_run_started(d.name),
                status=status,
                error=error,
                steps=[s.to_dict() for s in read_steps(result_file)],
                summary=summary,
                gate=version.manifest.get("gate") if version is not None else None,
                version=version.version if version is not None else None,
            )
        )
    return out


@dataclass
class StatusHistory:
    """``GET /status/history``: one served model's traffic, training runs and adapters."""

    model: str
    traffic: TrafficHistory
    runs: list[RunView]
    current: int  # the adapter version in service (0: none)
    versions: list[dict[str, Any]]  # the store's versions (`VersionSummary`), oldest first
    admin: bool  # rollback is possible (its adaptive loop runs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "traffic": self.traffic.to_dict(),
            "runs": [r.to_dict() for r in self.runs],
            "adapters": {"current": self.current, "versions": self.versions, "admin": self.admin},
        }


def status_history(
    model: str,
    buffer: ReplayBuffer,
    state_dir: Path,
    keep_adapters: int,
    since: float,
    until: float | None = None,
    step: float | None = None,
    admin: bool = False,
) -> StatusHistory:
    """Everything the status page draws for ``model`` (``buffer`` scoped to its target; its
    adapters and runs under ``state_dir``)."""
    store = AdapterStore.for_data_dir(state_dir, keep_adapters)
    return StatusHistory(
        model=model,
        traffic=traffic_history(buffer, since, until, step),
        runs=run_history(state_dir / "training", store),
        current=store.current_version(),
        versions=[asdict(v.summary()) for v in store.versions()],
        admin=admin,
    )
