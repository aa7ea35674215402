"""The adaptive loop as ``/status`` shows it (``training``): its state, counts, the adapter in
service and the run going on, as dataclasses with their one serialisation."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from daemon.store.runs import FinishedRun


@dataclass
class ActiveRun:
    """The run in progress, as ``/status`` shows it (``training.run``)."""

    run_id: str
    trigger: str
    pid: int
    started: float
    pending_failures: int
    parent_version: int
    dir: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunCounts:
    """Runs finished since the loop started, by outcome."""

    runs: int = 0
    installed: int = 0
    rejected: int = 0
    failed: int = 0


@dataclass
class LoopSummary:
    """What the loop has done: its counts and the last run it finished."""

    counts: RunCounts
    last_run: FinishedRun | None


@dataclass
class InService:
    """The adapter serving now (0: the draft without one) and its gate figures."""

    version: int
    heldout_agreement: float | None = None
    expected_speedup: float | None = None


@dataclass
class TrainingStatus:
    """The loop as ``/status`` shows it (``training``): its state, what a run waits for, the
    runs so far, the last one, the adapter in service and the run going on (with the
    progress its process reports)."""

    state: str
    pending_failures: int
    min_failure_cases: int
    policy: str
    waiting_for: str | None
    counts: RunCounts
    last_run: FinishedRun | None
    in_service: InService
    run: ActiveRun | None = None
    elapsed_s: float | None = None
    progress: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "state": self.state,
            "pending_failures": self.pending_failures,
            "min_failure_cases": self.min_failure_cases,
            "policy": self.policy,
            "waiting_for": self.waiting_for,
            **asdict(self.counts),
            "last_run": self.last_run.to_dict() if self.last_run else None,
            "in_service": asdict(self.in_service),
        }
        if self.run is not None:
            out["run"] = {
                **self.run.to_dict(),
                "elapsed_s": self.elapsed_s,
                # phase, step / total_steps, loss: written by the training process as it goes
                "progress": self.progress,
            }
        return out
