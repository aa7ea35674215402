"""One training run, in this process: buffer rows in, a saved adapter and its metrics out.

What goes in is read by `daemon.adaptation.inputs` (pending failure cases, replay, rehearsal,
synthetic rows, holdout rows). Holdout rows are only ever evaluated on: teacher-forced
agreement with the target's outputs before the run (with the adapter it continues) and after
it (`heldout_agreement`), which the loop's gate compares.

What comes out
--------------
The adapter in mlx-lm's format (`daemon.store.adapters.save_adapter`), with the token subset
of the draft's pruned head when ``models.draft_head_tokens`` is set (the loss is taken over
it), and `RunMetrics` (`daemon.store.runs`). A run that takes no update at all, or ends with a
non-finite adapter weight, raises `TrainingError`, saves nothing and marks nothing used (guard
5 in `daemon.adaptation`). Log events (component ``training``): ``train_start``,
``train_synthetic``, ``train_rehearsal``, ``train_data``, ``train_plan``, ``heldout_eval``
before and after, ``train_run``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from daemon.adaptation.data import mark_disagreements
from daemon.adaptation.inputs import (
    RunInputs,
    build_examples,
    read_inputs,
    synthetic_rows,
)
from daemon.adaptation.lora import apply_lora
from daemon.adaptation.rehearsal import RehearsalReport
from daemon.adaptation.synthetic import SynthesisReport
from daemon.adaptation.trainer import StepInfo, Trainer, TrainStats, planned_steps
from daemon.config import DataSettings, Settings
from daemon.core.evaluation import teacher_forced_agreement
from daemon.core.feature_draft import is_feature_draft
from daemon.core.heads import prune_head
from daemon.core.models import flat_parameters, load_pair
from daemon.core.speed import StepCosts, measure_costs
from daemon.errors import TrainingError
from daemon.logging import get_logger
from daemon.store.adapters import (
    adapter_head,
    feature_adapter_config,
    fuse_adapter,
    load_adapter_dir,
    save_adapter,
)
from daemon.store.buffer import ReplayBuffer
from daemon.store.runs import (
    ExampleCounts,
    HeldoutEval,
    ProgressFile,
    RunMetrics,
    StepLog,
    StepRecord,
)

log = get_logger("training")


def heldout_agreement(
    model: nn.Module,
    records: Sequence[Any],
    data: DataSettings,
    vocab_limit: int | None = None,
) -> HeldoutEval:
    """Teacher-forced agreement of ``model`` with the records' target outputs."""
    model.eval()
    t0 = time.perf_counter()
    by_row: list[list[bool]] = []
    result = teacher_forced_agreement(
        model,
        [(r.prompt_tokens, r.output_tokens) for r in records],
        max_prompt=data.max_prompt_length,
        max_output=data.max_output_length,
        vocab_limit=vocab_limit,
        by_row=by_row,
    )
    return HeldoutEval(
        agreement=result.rate,
        matches=result.matches,
        positions=result.total,
        rows=result.rows,
        seconds=round(time.perf_counter() - t0, 2),
        by_row=["".join("1" if m else "0" for m in row) for row in by_row],
    )


def _feature_draft_to_train(
    pair: Any, init_adapter: Any, holdout: Sequence[Any], settings: Settings
) -> tuple[nn.Module, nn.Module | None, HeldoutEval, dict[str, Any]]:
    """The feature draft a run trains (the init adapter's, when it is one, else a fresh one),
    the draft in service when it is of another kind (None otherwise) and held-out agreement
    of the draft in service before the run: the init adapter (a feature or LoRA version), or
    the plain layer-skip draft that serves until the first version."""
    vocab_limit = pair.shared_vocab
    served = pair.draft
    if init_adapter is not None:
        served = load_adapter_dir(pair.fresh_draft, Path(init_adapter))
    before = heldout_agreement(served, holdout, settings.data, vocab_limit)
    if is_feature_draft(served):
        served.unfreeze()
        draft, served = served, None
    else:
        draft = pair.fresh_feature_draft()
    if settings.training.feature_layer_lr == 0:
        draft.layers[0].freeze()  # the projections learn to feed the target's own last layer
    return draft, served, before, feature_adapter_config(draft)


def default_run_id() -> str:
    return time.strftime("train-%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"


@dataclass
class RunOptions:
    """The caller's choices for one run, resolved (`run_training`'s arguments)."""

    run_id: str
    out_dir: Path
    epochs: int
    max_steps: int | None = None
    init_adapter: str | os.PathLike[str] | None = None
    progress: bool = False
    mark_used: bool = True
    steps_file: Path | None = None
    target: str | None = None  # only that target's rows are read and marked


@dataclass
class DraftToTrain:
    """The draft a run trains, as it stands before the first step."""

    draft: nn.Module
    served: nn.Module | None  # the draft in service, when of another kind
    before: HeldoutEval
    adapter_config: dict[str, Any]
    trainable: int


def _check_args(
    settings: Settings, epochs: int | None, max_steps: int | None, draft_only: bool
) -> None:
    if epochs is not None and int(epochs) < 1:
        raise TrainingError(f"epochs must be >= 1, got {epochs}")
    if max_steps is not None and max_steps < 1:
        raise TrainingError(f"max_steps must be >= 1, got {max_steps}")
    if draft_only and settings.training.loss != "ce":
        raise TrainingError(
            f"training.loss {settings.training.loss!r} distils from the target's full "
            "distribution, which rank 0 of a group does not hold (the target is split across "
            "ranks); use ce"
        )


def _draft_to_train(
    pair: Any, inputs: RunInputs, settings: Settings, run: RunOptions
) -> DraftToTrain:
    """The draft set up to train, with held-out agreement of the one in service before the
    run, and the head it will serve with."""
    vocab_limit = pair.shared_vocab
    served: nn.Module | None = None
    if pair.learns_features:
        draft, served, before, adapter_config = _feature_draft_to_train(
            pair, run.init_adapter, inputs.holdout, settings
        )
    else:
        draft = pair.draft
        adapter_config = apply_lora(draft, settings.training.lora, run.init_adapter)
        if inputs.head is not None and run.init_adapter is not None:
            # "before" is the draft in service: the init adapter with its own head
            init_head = adapter_head(run.init_adapter)
            prune_head(draft, init_head or cast(list[int], pair.default_head()), vocab_limit)
        before = heldout_agreement(draft, inputs.holdout, settings.data, vocab_limit)
    trainable = sum(v.size for _, v in flat_parameters(draft, trainable=True))
    log.info("heldout_eval", run_id=run.run_id, when="before", **before.summary())
    if inputs.head is not None:
        # the head this version will serve with, from the target's recent outputs; the loss
        # is taken over it (daemon.adaptation.loss)
        prune_head(draft, inputs.head, vocab_limit)
        log.info("train_head", run_id=run.run_id, tokens=len(inputs.head))
    return DraftToTrain(draft, served, before, adapter_config, trainable)


def _fit(
    pair: Any,
    setup: DraftToTrain,
    examples: list[Any],
    counts: ExampleCounts,
    settings: Settings,
    run: RunOptions,
    progress_view: ProgressFile,
) -> tuple[TrainStats, int]:
    """The optimizer steps, each logged to the progress and steps files; raises
    `TrainingError` when no step was taken or a weight became non-finite."""
    cfg = settings.training
    draft = setup.draft
    if cfg.disagreement_weight:
        # weight toward where *this* draft is wrong, not only where the one that served was
        counts.disagreement_positions = mark_disagreements(draft, examples, pair.shared_vocab)
        log.info(
            "train_disagreements",
            run_id=run.run_id,
            recorded=counts.rejected_positions,
            added=counts.disagreement_positions,
        )
    total = planned_steps(len(examples), cfg, run.epochs, run.max_steps)
    trainer = Trainer(draft, cfg, total, vocab_limit=pair.shared_vocab, teacher=pair.target)
    log.info(
        "train_plan",
        run_id=run.run_id,
        examples=len(examples),
        steps=total,
        warmup_steps=trainer.warmup,
        trainable_parameters=setup.trainable,
        learning_rate=cfg.learning_rate,
        loss=cfg.loss,
        adapter=setup.adapter_config.get("lora_parameters")
        or setup.adapter_config["fine_tune_type"],
    )
    progress_view.update(
        phase="training", step=0, total_steps=total, heldout_before=setup.before.agreement
    )
    steps_log = StepLog(run.steps_file)

    def on_step(info: StepInfo, epoch: int) -> None:
        progress_view.update(step=info.step, epoch=epoch, loss=round(info.loss, 5), lr=info.lr)
        steps_log.append(
            StepRecord(
                step=info.step,
                epoch=epoch,
                loss=round(info.loss, 5),
                grad_norm=round(info.grad_norm, 5),
                lr=info.lr,
                skipped_micro_batches=trainer.stats.skipped_micro_batches,
                t=time.time(),
            )
        )

    stats = trainer.fit(
        examples,
        run.epochs,
        max_steps=run.max_steps,
        seed=cfg.seed,
        progress=run.progress,
        on_step=on_step,
    )
    if stats.steps == 0:
        raise TrainingError(
            f"no optimizer step was taken: {stats.micro_batches} micro-batches, "
            f"{stats.skipped_nonfinite} non-finite, {stats.skipped_empty_batches} without targets"
        )
    bad = [k for k, v in flat_parameters(draft, trainable=True) if not mx.isfinite(v).all()]
    if bad:
        raise TrainingError(f"adapter weights became non-finite: {bad[:3]}")
    return stats, total


def _costs(
    pair: Any, setup: DraftToTrain, head: list[int] | None, draft_only: bool
) -> tuple[StepCosts | None, StepCosts | None]:
    """The pair's step costs with the trained draft and with the one in service (when of
    another kind), timed as they will serve (an adapter fused: the bare draft's cost), which
    the gate prices rounds with; not with a split target, whose costs only the live engine
    can measure."""
    draft, served = setup.draft, setup.served
    timed = draft if is_feature_draft(draft) else pair.fresh_draft(head)
    costs = None if draft_only else measure_costs(pair.target, timed)
    if served is not None:
        fuse_adapter(served)  # as it serves; it is not trained, only timed from here
    return costs, measure_costs(pair.target, served) if served is not None else None


def _log_run(metrics: RunMetrics) -> None:
    nested = ("heldout_before", "heldout_after", "costs", "costs_before", "rehearsal", "synthetic")
    log.info(
        "train_run",
        **{k: v for k, v in metrics.to_dict().items() if k not in nested},
        heldout_before=metrics.heldout_before.agreement,
        heldout_after=metrics.heldout_after.agreement,
    )


def _metrics(
    run: RunOptions,
    setup: DraftToTrain,
    inputs: RunInputs,
    counts: ExampleCounts,
    stats: TrainStats,
    total: int,
    after: HeldoutEval,
    saved: Path,
    marked: int,
    costs: tuple[StepCosts | None, StepCosts | None],
    rehearsal: RehearsalReport | None,
    synthetic: SynthesisReport | None,
    wall_s: float,
) -> RunMetrics:
    n = max(1, min(5, len(stats.losses) // 4 or 1))
    costs_after, costs_before = costs
    return RunMetrics(
        run_id=run.run_id,
        heldout_before=setup.before,
        heldout_after=after,
        examples=counts,
        epochs=run.epochs,
        steps=stats.steps,
        planned_steps=total,
        micro_batches=stats.micro_batches,
        skipped_micro_batches=stats.skipped_micro_batches,
        skipped_nonfinite=stats.skipped_nonfinite,
        skipped_empty_batches=stats.skipped_empty_batches,
        empty_windows=stats.empty_windows,
        loss_first=sum(stats.losses[:n]) / n,
        loss_last=sum(stats.losses[-n:]) / n,
        grad_norm_mean=sum(stats.grad_norms) / len(stats.grad_norms),
        tokens=stats.tokens,
        target_tokens=stats.target_tokens,
        tokens_per_s=stats.tokens / max(stats.train_seconds, 1e-9),
        train_seconds=stats.train_seconds,
        trainable_parameters=setup.trainable,
        peak_memory_bytes=int(mx.get_peak_memory()),
        marked_used=marked,
        wall_s=wall_s,
        adapter_path=str(saved),
        head_tokens=len(inputs.head) if inputs.head is not None else 0,
        costs=costs_after.to_dict() if costs_after is not None else None,
        costs_before=costs_before.to_dict() if costs_before is not None else None,
        draft_kind="feature" if is_feature_draft(setup.draft) else "lora",
        rehearsal=rehearsal.to_dict() if rehearsal is not None else None,
        synthetic=synthetic.to_dict() if synthetic is not None else None,
    )


def _save(
    pair: Any,
    setup: DraftToTrain,
    inputs: RunInputs,
    after: HeldoutEval,
    settings: Settings,
    run: RunOptions,
) -> tuple[Path, int]:
    """Save the adapter; with ``run.mark_used`` mark every pending failure this run consumed
    (the ones skipped as empty too: they would only be skipped again). Returns the adapter's
    path and the rows marked."""
    metadata = {
        "run_id": run.run_id,
        "created": time.time(),
        "target": pair.target_id,
        "draft": pair.draft_id,
        "init_adapter": str(run.init_adapter) if run.init_adapter else None,
        "heldout_before": setup.before.agreement,
        "heldout_after": after.agreement,
        **({"head_tokens": inputs.head} if inputs.head is not None else {}),
    }
    path = save_adapter(setup.draft, run.out_dir, setup.adapter_config, metadata)
    if not run.mark_used:
        return path, 0
    used = [r.id for r in inputs.failures if r.id is not None]
    with ReplayBuffer(
        settings.paths.data_dir, settings.buffer, create=False, target=run.target
    ) as buffer:
        return path, buffer.mark_used(used, run.run_id)


def run_training(
    settings: Settings,
    *,
    out_dir: str | os.PathLike[str],
    epochs: int | None = None,
    max_steps: int | None = None,
    init_adapter: str | os.PathLike[str] | None = None,
    run_id: str | None = None,
    progress: bool = False,
    mark_used: bool = True,
    pair: Any = None,
    progress_file: str | os.PathLike[str] | None = None,
    steps_file: str | os.PathLike[str] | None = None,
    draft_only: bool = False,
    target: str | None = None,
    max_failures: int | None = None,
) -> RunMetrics:
    """One training run of the configured draft on the buffer; returns its metrics.

    Loads the pair (or uses ``pair``), builds examples from the pending failures plus replay,
    evaluates held-out agreement before (with ``init_adapter``) and after, saves the adapter to
    ``out_dir`` and, with ``mark_used``, marks the failures used by ``run_id``. Raises
    `TrainingError` (and marks nothing) when there is nothing to train on or no update was
    made. With ``steps_file`` every optimizer step is appended there (`StepRecord`). With
    ``progress_file`` the run's phase and latest step are kept there
    (`daemon.store.runs.RunProgress`). ``target``: only that target's rows are read (a
    daemon serving several models keeps them in one buffer). ``max_failures``: only the oldest
    that many pending failures, with replay from the rows before them: the buffer as it stood
    after that much traffic (`specd bench train --rows`).
    """
    t0 = time.perf_counter()
    mx.reset_peak_memory()
    cfg = settings.training
    _check_args(settings, epochs, max_steps, draft_only)
    progress_view = ProgressFile(Path(progress_file) if progress_file else None)
    progress_view.update(phase="loading")
    if pair is None:
        pair = load_pair(settings, lazy_target=draft_only)
    if epochs is None:
        # a whole feature layer gains from more passes over a small buffer than LoRA does
        feature_epochs = cfg.feature_epochs if pair.learns_features else None
        epochs = feature_epochs or cfg.epochs
    run = RunOptions(
        run_id=run_id or default_run_id(),
        out_dir=Path(out_dir),
        epochs=int(epochs),
        max_steps=max_steps,
        init_adapter=init_adapter,
        progress=progress,
        mark_used=mark_used,
        steps_file=Path(steps_file) if steps_file else None,
        target=target,
    )
    log.info(
        "train_start",
        run_id=run.run_id,
        out_dir=str(out_dir),
        epochs=run.epochs,
        max_steps=max_steps,
        init_adapter=str(init_adapter) if init_adapter else None,
    )
    synthetic = None
    if mark_used and not draft_only:
        # a run that leaves the buffer as it found it (a benchmark) writes nothing to it
        # either; rank 0 of a split target cannot run the target alone
        synthetic = synthetic_rows(pair, settings, target, run.run_id, progress_view)
    inputs = read_inputs(pair, settings, target, max_failures, draft_only)
    examples, counts, rehearsal = build_examples(
        pair, inputs, settings, run.run_id, progress_view, draft_only
    )

    mx.random.seed(cfg.seed)
    progress_view.update(phase="eval_before", holdout_rows=len(inputs.holdout))
    setup = _draft_to_train(pair, inputs, settings, run)
    stats, total = _fit(pair, setup, examples, counts, settings, run, progress_view)

    progress_view.update(phase="eval_after")
    after = heldout_agreement(setup.draft, inputs.holdout, settings.data, pair.shared_vocab)
    log.info("heldout_eval", run_id=run.run_id, when="after", **after.summary())
    progress_view.update(phase="saving", heldout_after=after.agreement)
    costs = _costs(pair, setup, inputs.head, draft_only)
    saved, marked = _save(pair, setup, inputs, after, settings, run)
    metrics = _metrics(
        run,
        setup,
        inputs,
        counts,
        stats,
        total,
        after,
        saved,
        marked,
        costs,
        rehearsal,
        synthetic,
        time.perf_counter() - t0,
    )
    _log_run(metrics)
    return metrics
