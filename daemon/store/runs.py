"""The files a training run leaves, and the records they hold: one definition each.

A run lives in ``<data_dir>/training/<run_id>/`` (made by the adaptation loop): the training
process (``python -m daemon.adaptation.process``) writes its `TrainingResult` to `RESULT_FILE`
there, atomically, as its last act, and keeps a `RunProgress` next to it
(`progress_file_for`) as it goes. The loop reads both, gates the result into a `GateDecision`
and records the outcome as a `FinishedRun`; ``/status``, ``specd train`` and the adapter
manifests show those. Every record here has one ``to_dict``/``from_dict`` pair, and that pair
is the JSON on disk and over HTTP:

- result file: ``{"status": "ok"|"error", "error", "metrics", "adapter_path"}`` (`RunMetrics`
  under ``metrics``, None on error);
- progress file: the `RunProgress` fields set so far, with ``updated``;
- ``/status`` ``training.last_run``: `FinishedRun`; an adapter manifest's ``gate``:
  `GateDecision`.

Imports base only: the training process, the loop, the CLI and the server all read these.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from daemon.durable import atomic_write_json
from daemon.logging import get_logger

log = get_logger("training")

RESULT_FILE = "result.json"  # in a run's directory
SETTINGS_FILE = "settings.json"  # the settings the run was given (`config.settings_snapshot`)

Status = Literal["ok", "error"]
Decision = Literal["install", "reject", "error"]


def _pick(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that are fields of the dataclass ``cls`` (others are ignored)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


# --------------------------------------------------------------------------------------------
# Metrics of one run


@dataclass
class HeldoutEval:
    """Teacher-forced agreement of the draft with the target on the holdout rows
    (`daemon.core.evaluation.Agreement`'s figures, and how long the pass took)."""

    agreement: float
    matches: int
    positions: int
    rows: int
    seconds: float
    # each row's matches per position, "1"/"0" (what the speed gate walks; daemon.core.speed)
    by_row: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """The figures without the per-row matches (logs, manifests)."""
        out = asdict(self)
        del out["by_row"]
        return out

    def match_rows(self) -> list[list[bool]]:
        return [[c == "1" for c in row] for row in self.by_row]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeldoutEval:
        return cls(**_pick(cls, data))


@dataclass
class ExampleCounts:
    """What a run trained on: examples by source, what was skipped, and the holdout size."""

    failures: int
    replay: int
    skipped_empty: int
    target_tokens: int
    rejected_positions: int
    holdout_rows: int
    # positions where the draft as the run started disagreed with the target and no rejection
    # was recorded (marked with training.disagreement_weight; daemon.adaptation.data)
    disagreement_positions: int = 0
    # the target's own answers to the run's train prompts (training.rehearsal_tokens)
    rehearsal: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExampleCounts:
        return cls(**_pick(cls, data))


@dataclass
class RunMetrics:
    """What `daemon.adaptation.run.run_training` measured; the result file's ``metrics``."""

    run_id: str
    heldout_before: HeldoutEval
    heldout_after: HeldoutEval
    examples: ExampleCounts
    epochs: int
    steps: int
    planned_steps: int
    micro_batches: int
    skipped_micro_batches: int
    skipped_nonfinite: int
    skipped_empty_batches: int
    empty_windows: int
    loss_first: float
    loss_last: float
    grad_norm_mean: float
    tokens: int
    target_tokens: int
    tokens_per_s: float
    train_seconds: float
    trainable_parameters: int
    peak_memory_bytes: int
    marked_used: int
    wall_s: float
    adapter_path: str
    head_tokens: int = 0  # the draft head's subset size (the ids are in the adapter); 0: full
    # the pair's step costs timed in the training process (daemon.core.speed.StepCosts): what
    # the speed gate uses when no live engine has measured them
    costs: dict[str, Any] | None = None
    # the candidate is a draft of another kind than the one in service (a first feature
    # draft after the layer-skip one): the served draft's costs, timed beside ``costs``
    costs_before: dict[str, Any] | None = None
    draft_kind: str = "lora"  # "lora" (an adapter on the draft) or "feature" (a whole draft)
    # what rehearsal cached and generated (daemon.adaptation.rehearsal.RehearsalReport)
    rehearsal: dict[str, Any] | None = None
    # the synthetic rows it wrote before training, training.synthetic_per_failure
    # (daemon.adaptation.synthetic.SynthesisReport)
    synthetic: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # nested dataclasses become dicts too

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunMetrics:
        values = _pick(cls, data)
        values["heldout_before"] = HeldoutEval.from_dict(data["heldout_before"])
        values["heldout_after"] = HeldoutEval.from_dict(data["heldout_after"])
        values["examples"] = ExampleCounts.from_dict(data["examples"])
        return cls(**values)


# --------------------------------------------------------------------------------------------
# The result file


@dataclass
class TrainingResult:
    """How a training process ended: ``ok`` with its metrics and adapter, or ``error`` with a
    message. ``returncode`` is the process's exit status, known to the reader only (it is not
    in the file)."""

    status: Status
    error: str | None = None
    metrics: RunMetrics | None = None
    adapter_path: str | None = None
    returncode: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def success(cls, metrics: RunMetrics) -> TrainingResult:
        return cls("ok", metrics=metrics, adapter_path=metrics.adapter_path)

    @classmethod
    def failure(cls, error: str, returncode: int | None = None) -> TrainingResult:
        return cls("error", error=error, returncode=returncode)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status,
            "error": self.error,
            "metrics": self.metrics.to_dict() if self.metrics is not None else None,
            "adapter_path": self.adapter_path,
        }
        if self.returncode is not None:
            out["returncode"] = self.returncode
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingResult:
        """The result in ``data``; `ValueError` if it is not a training result."""
        if not isinstance(data, dict) or data.get("status") not in ("ok", "error"):
            raise ValueError("not a training result")
        try:
            metrics = data.get("metrics")
            return cls(
                status=data["status"],
                error=data.get("error"),
                metrics=RunMetrics.from_dict(metrics) if metrics is not None else None,
                adapter_path=data.get("adapter_path"),
                returncode=data.get("returncode"),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a training result: {e!r}") from e


def write_result(path: str | os.PathLike[str], result: TrainingResult) -> None:
    """Write the result file atomically (readers see the old file or the whole new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = replace(result, returncode=None)  # the writer does not know its exit status yet
    atomic_write_json(path, result.to_dict())


def _how_it_ended(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        how = f"; the process was killed by {name}"
        if -returncode == signal.SIGKILL:
            how += " (out of memory?)"
        return how
    if returncode is not None:
        return f"; the process exited with code {returncode}"
    return ""


def read_result(path: str | os.PathLike[str], returncode: int | None = None) -> TrainingResult:
    """The child's result; a missing or unreadable file (a hard crash, a kill) gives an error
    result that says how the process ended. An ``ok`` file from a process that exited non-zero
    is an error too."""
    path = Path(path)
    try:
        result = TrainingResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        reason = "no result file" if isinstance(e, FileNotFoundError) else f"bad result file: {e}"
        return TrainingResult.failure(
            f"training process wrote {reason} ({path}){_how_it_ended(returncode)}", returncode
        )
    if returncode is not None:
        result.returncode = returncode
        if returncode != 0 and result.ok:
            result = replace(result, status="error", error=f"exit code {returncode}")
    return result


# --------------------------------------------------------------------------------------------
# The progress file


@dataclass
class RunProgress:
    """A running run's phase and latest step, as ``/status`` shows it. Only the fields set so
    far are in the file (a run starts with just its ``phase``)."""

    phase: str | None = None
    holdout_rows: int | None = None
    step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    loss: float | None = None
    lr: float | None = None
    heldout_before: float | None = None
    heldout_after: float | None = None
    updated: float | None = None  # time.time() of the last update

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunProgress:
        return cls(**_pick(cls, data))


@dataclass
class ProgressFile:
    """Keeps a run's `RunProgress` in a small JSON file. Replaced atomically but not fsynced:
    it is only a view, and the result file stays the record. Does nothing without a path."""

    path: Path | None
    progress: RunProgress = field(default_factory=RunProgress)

    def update(self, **values: Any) -> None:
        """Set these `RunProgress` fields (and ``updated``) and rewrite the file."""
        if self.path is None:
            return
        self.progress = replace(self.progress, **values, updated=time.time())
        try:
            atomic_write_json(self.path, self.progress.to_dict(), fsync=False)
        except OSError as e:  # a view must never fail the run
            log.warning("train_progress_unwritable", path=str(self.path), error=str(e))
            self.path = None


def progress_file_for(result_file: str | os.PathLike[str]) -> Path:
    """Where the run writing ``result_file`` keeps its `RunProgress`."""
    result_file = Path(result_file)
    return result_file.with_name(f"{result_file.stem}.progress.json")


def read_progress(result_file: str | os.PathLike[str]) -> RunProgress | None:
    """The latest progress of the run writing ``result_file``; None before its first update
    (or if the file cannot be read)."""
    try:
        data = json.loads(progress_file_for(result_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return RunProgress.from_dict(data) if isinstance(data, dict) else None


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step of a run, as its steps file keeps it (the curves the status page
    draws: loss and gradient norm per step)."""

    step: int
    epoch: int
    loss: float
    grad_norm: float
    lr: float
    skipped_micro_batches: int = 0
    t: float = 0.0  # time.time() of the step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepRecord:
        return cls(**_pick(cls, data))


def steps_file_for(result_file: str | os.PathLike[str]) -> Path:
    """Where the run writing ``result_file`` appends its `StepRecord` lines."""
    result_file = Path(result_file)
    return result_file.with_name(f"{result_file.stem}.steps.jsonl")


@dataclass
class StepLog:
    """Appends a run's steps to its steps file, a JSON line each (not fsynced: a view, like
    the progress file). Does nothing without a path; a write error stops it, never the run."""

    path: Path | None

    def append(self, record: StepRecord) -> None:
        if self.path is None:
            return
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record.to_dict()) + "\n")
        except OSError as e:
            log.warning("train_steps_unwritable", path=str(self.path), error=str(e))
            self.path = None


def read_steps(result_file: str | os.PathLike[str]) -> list[StepRecord]:
    """The steps the run writing ``result_file`` recorded (none if it kept no file); a line
    cut short by a crash is skipped."""
    try:
        text = steps_file_for(result_file).read_text(encoding="utf-8")
    except OSError:
        return []
    out: list[StepRecord] = []
    for line in text.splitlines():
        try:
            data = json.loads(line)
            out.append(StepRecord.from_dict(data))
        except (ValueError, TypeError):
            continue
    return out


# --------------------------------------------------------------------------------------------
# The gate, and a finished run


@dataclass
class GateDecision:
    """What the gate made of a finished run: install the candidate, keep it as rejected, or
    error (the run failed; nothing to store). The scores are held-out agreement before and
    after; None when there was nothing to score on."""

    decision: Decision
    reason: str
    heldout_before: float | None = None
    heldout_after: float | None = None
    improvement: float | None = None
    # gate: speed: the paired comparison (daemon.core.speed.Comparison.to_dict): expected
    # speedup over the target before and after, the gain and its lower bound
    speed: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"decision": self.decision, "reason": self.reason}
        if self.speed is not None:
            out["speed"] = self.speed
        # A run that failed before it was scored has no score keys at all, as it always had.
        if self.decision != "error" or self.heldout_after is not None:
            out.update(
                heldout_before=self.heldout_before,
                heldout_after=self.heldout_after,
                improvement=self.improvement,
            )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateDecision:
        return cls(**_pick(cls, data))


@dataclass
class FinishedRun:
    """The last run the loop finished, as ``/status`` shows it (``training.last_run``).
    ``adapter_version`` is the stored candidate (None when nothing was stored)."""

    run_id: str
    trigger: str
    finished: float
    gate: GateDecision
    adapter_version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "run_id": self.run_id,
            "trigger": self.trigger,
            "finished": self.finished,
            **self.gate.to_dict(),
        }
        # A failed run never reached the store: no version key (a refused swap keeps its own).
        if self.gate.decision != "error" or self.adapter_version is not None:
            out["adapter_version"] = self.adapter_version
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinishedRun:
        return cls(
            run_id=data["run_id"],
            trigger=data["trigger"],
            finished=data["finished"],
            gate=GateDecision.from_dict(data),
            adapter_version=data.get("adapter_version"),
        )


def prune_runs(
    runs_dir: Path, kept_runs: set[str], recent: int, active: str | None = None
) -> list[str]:
    """Delete run directories the data dir no longer needs: a run stays while a stored adapter
    version came from it (``kept_runs``: their manifests' ``run_id``; the version's files are a
    copy, the run keeps its logs), while it is among the ``recent`` newest (the last rejected
    or failed runs, to read why) or while it runs (``active``). Returns what was deleted."""
    if not runs_dir.is_dir():
        return []
    # run ids start with their start time (YYYYmmdd-HHMMSS-...): name order is age order
    runs = sorted(p for p in runs_dir.iterdir() if p.is_dir())
    keep = {p.name for p in runs[-recent:]} if recent > 0 else set()
    removed = []
    for p in runs:
        if p.name in keep or p.name in kept_runs or p.name == active:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    if removed:
        log.info("training_runs_pruned", removed=len(removed), kept=len(runs) - len(removed))
    return removed
