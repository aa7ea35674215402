"""A training run's records (`daemon.store.runs`): each (de)serialises one way, and the JSON
keeps the keys the result file, progress file, adapter manifests and /status always had."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.store.runs import (
    ExampleCounts,
    FinishedRun,
    GateDecision,
    HeldoutEval,
    ProgressFile,
    RunMetrics,
    RunProgress,
    TrainingResult,
    progress_file_for,
    read_progress,
    read_result,
    write_result,
)

METRIC_KEYS = {
    "run_id",
    "head_tokens",
    "costs",
    "costs_before",
    "draft_kind",
    "rehearsal",
    "synthetic",
    "heldout_before",
    "heldout_after",
    "examples",
    "epochs",
    "steps",
    "planned_steps",
    "micro_batches",
    "skipped_micro_batches",
    "skipped_nonfinite",
    "skipped_empty_batches",
    "empty_windows",
    "loss_first",
    "loss_last",
    "grad_norm_mean",
    "tokens",
    "target_tokens",
    "tokens_per_s",
    "train_seconds",
    "trainable_parameters",
    "peak_memory_bytes",
    "marked_used",
    "wall_s",
    "adapter_path",
}


def metrics(adapter_path: str = "/tmp/adapter") -> RunMetrics:
    return RunMetrics(
        run_id="r1",
        heldout_before=HeldoutEval(agreement=0.5, matches=15, positions=30, rows=3, seconds=0.1),
        heldout_after=HeldoutEval(agreement=0.6, matches=18, positions=30, rows=3, seconds=0.1),
        examples=ExampleCounts(
            failures=10,
            replay=2,
            skipped_empty=0,
            target_tokens=120,
            rejected_positions=20,
            holdout_rows=3,
        ),
        epochs=2,
        steps=12,
        planned_steps=12,
        micro_batches=12,
        skipped_micro_batches=0,
        skipped_nonfinite=0,
        skipped_empty_batches=0,
        empty_windows=0,
        loss_first=3.5,
        loss_last=1.25,
        grad_norm_mean=0.75,
        tokens=200,
        target_tokens=120,
        tokens_per_s=1000.0,
        train_seconds=0.2,
        trainable_parameters=4096,
        peak_memory_bytes=1 << 20,
        marked_used=10,
        wall_s=1.5,
        adapter_path=adapter_path,
    )


def test_result_round_trips_through_the_file(tmp_path: Path) -> None:
    ok = TrainingResult.success(metrics())
    path = tmp_path / "run" / "result.json"
    write_result(path, ok)
    on_disk = json.loads(path.read_text())
    assert list(on_disk) == ["status", "error", "metrics", "adapter_path"]  # no returncode
    assert set(on_disk["metrics"]) == METRIC_KEYS
    assert set(on_disk["metrics"]["heldout_after"]) == {
        "agreement",
        "matches",
        "positions",
        "rows",
        "seconds",
        "by_row",  # the per-row matches the speed gate walks
    }
    assert (
        on_disk["adapter_path"] == "/tmp/adapter" and on_disk["metrics"]["examples"]["replay"] == 2
    )
    assert TrainingResult.from_dict(on_disk) == ok
    back = read_result(path, returncode=0)
    assert back.returncode == 0 and back.metrics == ok.metrics and back.ok
    assert back.metrics is not None and back.metrics.heldout_after.agreement == 0.6
    # in memory the returncode goes along; the file never has one
    assert TrainingResult.from_dict(back.to_dict()) == back

    # an "ok" file from a process that exited non-zero is an error
    bad_exit = read_result(path, returncode=3)
    assert not bad_exit.ok and bad_exit.error == "exit code 3" and bad_exit.metrics == ok.metrics


def test_error_result_round_trips(tmp_path: Path) -> None:
    failed = TrainingResult.failure("cancelled by SIGTERM")
    write_result(tmp_path / "result.json", failed)
    on_disk = json.loads((tmp_path / "result.json").read_text())
    assert on_disk == {
        "status": "error",
        "error": "cancelled by SIGTERM",
        "metrics": None,
        "adapter_path": None,
    }
    assert read_result(tmp_path / "result.json") == failed
    # a result file whose metrics are not metrics is a bad file, not a crash of the reader
    (tmp_path / "bad.json").write_text(json.dumps({"status": "ok", "metrics": {"steps": 1}}))
    bad = read_result(tmp_path / "bad.json", returncode=0)
    assert not bad.ok and "bad result file" in (bad.error or "")


def test_progress_round_trips_and_keeps_only_what_was_set(tmp_path: Path) -> None:
    result_file = tmp_path / "result.json"
    assert read_progress(result_file) is None
    view = ProgressFile(progress_file_for(result_file))
    view.update(phase="loading")
    first = json.loads(progress_file_for(result_file).read_text())
    assert set(first) == {"phase", "updated"}
    view.update(phase="training", step=0, total_steps=12, heldout_before=0.5)
    view.update(step=3, epoch=1, loss=1.5, lr=1e-3)
    got = read_progress(result_file)
    assert got == view.progress
    assert got is not None and got.phase == "training" and got.step == 3
    assert RunProgress.from_dict(got.to_dict()) == got
    assert set(got.to_dict()) == {
        "phase",
        "step",
        "total_steps",
        "heldout_before",
        "epoch",
        "loss",
        "lr",
        "updated",
    }
    # a progress view without a file does nothing
    ProgressFile(None).update(phase="loading")


def test_gate_decision_and_finished_run_round_trip() -> None:
    install = GateDecision("install", "better", 0.5, 0.6, 0.1)
    assert install.to_dict() == {
        "decision": "install",
        "reason": "better",
        "heldout_before": 0.5,
        "heldout_after": 0.6,
        "improvement": 0.1,
    }
    unscored = GateDecision("reject", "no held-out positions to evaluate on")
    assert set(unscored.to_dict()) == set(install.to_dict())  # scores present, as None
    failed = GateDecision("error", "training failed")
    assert failed.to_dict() == {"decision": "error", "reason": "training failed"}
    for d in (install, unscored, failed):
        assert GateDecision.from_dict(d.to_dict()) == d

    done = FinishedRun("r1", "manual", 123.0, install, adapter_version=2)
    shown = done.to_dict()
    assert shown == {
        "run_id": "r1",
        "trigger": "manual",
        "finished": 123.0,
        **install.to_dict(),
        "adapter_version": 2,
    }
    assert FinishedRun.from_dict(json.loads(json.dumps(shown))) == done
    rejected = FinishedRun("r2", "min_failure_cases", 1.0, unscored, adapter_version=None)
    assert rejected.to_dict()["adapter_version"] is None
    assert FinishedRun.from_dict(rejected.to_dict()) == rejected
    crashed = FinishedRun("r3", "manual", 1.0, failed)
    assert set(crashed.to_dict()) == {"run_id", "trigger", "finished", "decision", "reason"}
    assert FinishedRun.from_dict(crashed.to_dict()) == crashed
    # a refused swap: an error that keeps its scores and its stored version
    refused = FinishedRun(
        "r4", "manual", 1.0, GateDecision("error", "swap refused", 0.5, 0.6, 0.1), 3
    )
    assert refused.to_dict()["adapter_version"] == 3 and refused.to_dict()["improvement"] == 0.1
    assert FinishedRun.from_dict(refused.to_dict()) == refused


def test_run_directories_follow_the_adapter_retention(tmp_path: Path) -> None:
    """A run stays while a stored version came from it, while it is among the newest, or
    while it runs; the others go, logs and all."""
    from daemon.store.runs import prune_runs

    runs = tmp_path / "training"
    names = [f"20261204-10{i:02d}00-abc{i:03d}" for i in range(10)]
    for name in names:
        (runs / name).mkdir(parents=True)
        (runs / name / "train.log").write_text("log")
    removed = prune_runs(runs, kept_runs={names[1], names[4]}, recent=3, active=names[0])
    left = sorted(p.name for p in runs.iterdir())
    assert left == sorted([names[0], names[1], names[4], *names[-3:]])
    assert sorted(removed) == sorted(set(names) - set(left))
    assert prune_runs(tmp_path / "none", set(), 3) == []
