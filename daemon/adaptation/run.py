"""One training run, in this process: buffer rows in, a saved adapter and its metrics out.

What goes in
------------
Each run uses the train-split failure cases no run has used yet (`ReplayBuffer.pending_failures`)
plus ``training.replay_ratio`` of the run's examples drawn from older train rows
(`ReplayBuffer.sample_replay`), so the draft does not forget, and with
``training.rehearsal_tokens`` the target's own answers to those rows' prompts
(`daemon.adaptation.rehearsal`). With ``training.synthetic_per_failure`` the run first has the
target write rows like the traffic into the buffer (`daemon.adaptation.synthetic.write_rows`):
pending failures like any other, so this run trains on them and later ones replay them.
Holdout rows are only ever
evaluated on: teacher-forced agreement with the target's outputs before the run (with the
adapter it continues) and after it (`heldout_agreement`), which the loop's gate compares.

What comes out
--------------
The adapter in mlx-lm's format (`daemon.store.adapters.save_adapter`), with the token subset
of the draft's pruned head when ``models.draft_head_tokens`` is set (the most frequent tokens of
the target's recent train-split outputs, `daemon.core.heads.frequent_tokens`; the loss is taken
over it), and `RunMetrics`
(`daemon.store.runs`). A run that takes no update at all, or ends with a non-finite adapter
weight, raises `TrainingError`, saves nothing and marks nothing used (guard 5 in
`daemon.adaptation`). Log events (component ``training``): ``train_start``,
``train_synthetic``, ``train_rehearsal``,
``train_data``, ``train_plan``, ``heldout_eval`` before and after, ``train_run``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from daemon.adaptation.data import make_examples, mark_disagreements
from daemon.adaptation.lora import apply_lora
from daemon.adaptation.rehearsal import (
    RehearsalCache,
    RehearsalReport,
    rehearsal_budget,
    rehearse,
)
from daemon.adaptation.synthetic import SynthesisReport, write_rows
from daemon.adaptation.trainer import StepInfo, Trainer, planned_steps
from daemon.config import DataSettings, Settings
from daemon.core.evaluation import teacher_forced_agreement
from daemon.core.feature_draft import is_feature_draft
from daemon.core.heads import frequent_tokens, prune_head
from daemon.core.models import flat_parameters, load_pair
from daemon.core.speed import measure_costs
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
from daemon.store.record import SYNTHETIC_DRAFT
from daemon.store.runs import (
    ExampleCounts,
    HeldoutEval,
    ProgressFile,
    RunMetrics,
    StepLog,
    StepRecord,
)

log = get_logger("training")

# recent target output tokens a pruned draft head's subset is counted from
HEAD_SAMPLE_TOKENS = 1 << 20


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


def _rehearsal_examples(
    pair: Any,
    records: Sequence[Any],
    budget: int,
    kept_ids: set[int],
    settings: Settings,
    draft_only: bool,
    run_id: str,
) -> tuple[list[Any], RehearsalReport | None]:
    """Examples of the target's own answers to ``records`` (train rows), from the cache or
    generated within ``budget`` tokens (`daemon.adaptation.rehearsal`); none when rehearsal
    is off or the target is split across ranks (rank 0 cannot run it alone)."""
    cfg = settings.training
    if not budget or not records:
        return [], None
    if draft_only:
        log.info("train_rehearsal", run_id=run_id, skipped="the target is split across ranks")
        return [], RehearsalReport(skipped="the target is split across ranks")
    cache = RehearsalCache(settings.paths.data_dir, pair.target_id).load()
    rows, report = rehearse(
        pair.target,
        records,
        cache,
        budget_tokens=budget,
        variants=cfg.rehearsal_variants,
        requests=cfg.rehearsal_requests,
        max_output=settings.data.max_output_length,
        stop_tokens=list(pair.tokenizer.eos_token_ids or ()),
        seed=cfg.seed,
    )
    if report.generated:
        try:
            cache.save(kept_ids)
        except OSError as e:  # derived data: the run trains on its answers all the same
            log.warning("rehearsal_cache_not_saved", path=str(cache.path), error=str(e))
    examples, _ = make_examples(rows, settings.data, "rehearsal")
    log.info("train_rehearsal", run_id=run_id, examples=len(examples), **report.to_dict())
    return examples, report


def _synthetic_rows(
    pair: Any, settings: Settings, target: str | None, run_id: str, progress: ProgressFile
) -> SynthesisReport | None:
    """Write `training.synthetic_per_failure` synthetic rows like the traffic per pending
    failure case of real traffic, less the synthetic rows already pending (a failed run's,
    or `specd warmup`'s), into the buffer before the run reads it; None when off or nothing
    is due. A target that writes nothing usable is logged and the run trains without."""
    ratio = settings.training.synthetic_per_failure
    if not ratio:
        return None
    with ReplayBuffer(
        settings.paths.data_dir, settings.buffer, create=False, target=target
    ) as buffer:
        pending = buffer.pending_failures()
        real = sum(r.draft_id != SYNTHETIC_DRAFT for r in pending)
        due = round(real * ratio) - (len(pending) - real)
        if due <= 0:
            return None
        progress.update(phase="synthesizing")
        try:
            report = write_rows(
                buffer,
                pair.target,
                pair.tokenizer,
                pair.target_id,
                due,
                max_output=settings.data.max_output_length,
                max_prompt=settings.data.max_prompt_length,
            )
        except ValueError as e:
            log.warning("train_synthetic_failed", run_id=run_id, rows=due, error=str(e))
            return None
    log.info("train_synthetic", run_id=run_id, **report.to_dict())
    return report


def replay_count(num_failures: int, ratio: float) -> int:
    """Replay rows so that they are ``ratio`` of the run's examples."""
    if ratio <= 0 or num_failures <= 0:
        return 0
    return int(round(num_failures * ratio / (1.0 - ratio)))


def default_run_id() -> str:
    return time.strftime("train-%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"


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
    run_id = run_id or default_run_id()
    if epochs is not None and int(epochs) < 1:
        raise TrainingError(f"epochs must be >= 1, got {epochs}")
    if max_steps is not None and max_steps < 1:
        raise TrainingError(f"max_steps must be >= 1, got {max_steps}")
    if draft_only and cfg.loss != "ce":
        raise TrainingError(
            f"training.loss {cfg.loss!r} distils from the target's full distribution, which "
            "rank 0 of a group does not hold (the target is split across ranks); use ce"
        )
    progress_view = ProgressFile(Path(progress_file) if progress_file else None)
    progress_view.update(phase="loading")
    if pair is None:
        pair = load_pair(settings, lazy_target=draft_only)
    if epochs is None:
        # a whole feature layer gains from more passes over a small buffer than LoRA does
        feature_epochs = cfg.feature_epochs if pair.learns_features else None
        epochs = feature_epochs or cfg.epochs
    epochs = int(epochs)
    log.info(
        "train_start",
        run_id=run_id,
        out_dir=str(out_dir),
        epochs=epochs,
        max_steps=max_steps,
        init_adapter=str(init_adapter) if init_adapter else None,
    )
    draft = pair.draft
    vocab_limit = pair.shared_vocab
    synthetic = None
    if mark_used and not draft_only:
        # a run that leaves the buffer as it found it (a benchmark) writes nothing to it
        # either; rank 0 of a split target cannot run the target alone
        synthetic = _synthetic_rows(pair, settings, target, run_id, progress_view)

    with ReplayBuffer(
        settings.paths.data_dir, settings.buffer, create=False, target=target
    ) as buffer:
        failures = buffer.pending_failures(max_failures)
        replay = buffer.sample_replay(
            replay_count(len(failures), cfg.replay_ratio),
            exclude_ids=[r.id for r in failures if r.id is not None],
            seed=cfg.seed,
            before=failures[-1].created if max_failures is not None and failures else None,
        )
        holdout = buffer.holdout(cfg.eval_max_rows)
        head = (
            frequent_tokens(
                buffer.recent_outputs(HEAD_SAMPLE_TOKENS),
                pair.head_tokens,
                vocab_limit,
                pair.special_ids(),
            )
            if pair.prunes_head
            else None
        )
        budget = rehearsal_budget(cfg.rehearsal_tokens, pair.learns_features)
        kept_ids = buffer.ids() if budget and not draft_only else set()
    fail_ex, skipped_f = make_examples(failures, settings.data, "failure")
    replay_ex, skipped_r = make_examples(replay, settings.data, "replay")
    progress_view.update(phase="rehearsing")
    rehearsal_ex, rehearsal = _rehearsal_examples(
        pair, [*failures, *replay], budget, kept_ids, settings, draft_only, run_id
    )
    examples = fail_ex + replay_ex + rehearsal_ex
    counts = ExampleCounts(
        failures=len(fail_ex),
        replay=len(replay_ex),
        rehearsal=len(rehearsal_ex),
        skipped_empty=skipped_f + skipped_r,
        target_tokens=sum(e.num_targets for e in examples),
        rejected_positions=sum(len(e.rejected) for e in examples),
        holdout_rows=len(holdout),
    )
    log.info("train_data", run_id=run_id, **counts.to_dict())
    if not fail_ex:
        raise TrainingError(
            f"nothing to train on: {len(failures)} pending failure cases "
            f"({skipped_f} empty after truncation) in {buffer.path}"
        )

    mx.random.seed(cfg.seed)
    progress_view.update(phase="eval_before", holdout_rows=len(holdout))
    served: nn.Module | None = None  # the draft in service, when of another kind
    if pair.learns_features:
        draft, served, before, adapter_config = _feature_draft_to_train(
            pair, init_adapter, holdout, settings
        )
    else:
        adapter_config = apply_lora(draft, cfg.lora, init_adapter)
        if head is not None and init_adapter is not None:
            # "before" is the draft in service: the init adapter with its own head
            init_head = adapter_head(init_adapter)
            prune_head(draft, init_head or cast(list[int], pair.default_head()), vocab_limit)
        before = heldout_agreement(draft, holdout, settings.data, vocab_limit)
    trainable = sum(v.size for _, v in flat_parameters(draft, trainable=True))
    log.info("heldout_eval", run_id=run_id, when="before", **before.summary())
    if head is not None:
        # the head this version will serve with, from the target's recent outputs; the loss
        # is taken over it (daemon.adaptation.loss)
        prune_head(draft, head, vocab_limit)
        log.info("train_head", run_id=run_id, tokens=len(head))

    if cfg.disagreement_weight:
        # weight toward where *this* draft is wrong, not only where the one that served was
        counts.disagreement_positions = mark_disagreements(draft, examples, vocab_limit)
        log.info(
            "train_disagreements",
            run_id=run_id,
            recorded=counts.rejected_positions,
            added=counts.disagreement_positions,
        )

    total = planned_steps(len(examples), cfg, epochs, max_steps)
    trainer = Trainer(draft, cfg, total, vocab_limit=vocab_limit, teacher=pair.target)
    log.info(
        "train_plan",
        run_id=run_id,
        examples=len(examples),
        steps=total,
        warmup_steps=trainer.warmup,
        trainable_parameters=trainable,
        learning_rate=cfg.learning_rate,
        loss=cfg.loss,
        adapter=adapter_config.get("lora_parameters") or adapter_config["fine_tune_type"],
    )
    progress_view.update(
        phase="training", step=0, total_steps=total, heldout_before=before.agreement
    )

    steps_log = StepLog(Path(steps_file) if steps_file else None)

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
        examples, epochs, max_steps=max_steps, seed=cfg.seed, progress=progress, on_step=on_step
    )
    if stats.steps == 0:
        raise TrainingError(
            f"no optimizer step was taken: {stats.micro_batches} micro-batches, "
            f"{stats.skipped_nonfinite} non-finite, {stats.skipped_empty_batches} without targets"
        )
    bad = [k for k, v in flat_parameters(draft, trainable=True) if not mx.isfinite(v).all()]
    if bad:
        raise TrainingError(f"adapter weights became non-finite: {bad[:3]}")

    progress_view.update(phase="eval_after")
    after = heldout_agreement(draft, holdout, settings.data, vocab_limit)
    log.info("heldout_eval", run_id=run_id, when="after", **after.summary())
    progress_view.update(phase="saving", heldout_after=after.agreement)
    # the pair's step costs, timed as it will serve (an adapter fused: the bare draft's
    # cost), which the gate prices rounds with; not with a split target, whose costs only
    # the live engine can measure
    timed = draft if is_feature_draft(draft) else pair.fresh_draft(head)
    costs = None if draft_only else measure_costs(pair.target, timed)
    if served is not None:
        fuse_adapter(served)  # as it serves; it is not trained, only timed from here
    costs_before = measure_costs(pair.target, served) if served is not None else None

    metadata = {
        "run_id": run_id,
        "created": time.time(),
        "target": pair.target_id,
        "draft": pair.draft_id,
        "init_adapter": str(init_adapter) if init_adapter else None,
        "heldout_before": before.agreement,
        "heldout_after": after.agreement,
        **({"head_tokens": head} if head is not None else {}),
    }
    path = save_adapter(draft, out_dir, adapter_config, metadata)
    # every pending failure this run consumed, the ones skipped as empty too (they would only
    # be skipped again)
    used = [r.id for r in failures if r.id is not None]
    marked = buffer.mark_used(used, run_id) if mark_used else 0
    buffer.close()

    n = max(1, min(5, len(stats.losses) // 4 or 1))
    metrics = RunMetrics(
        run_id=run_id,
        heldout_before=before,
        heldout_after=after,
        examples=counts,
        epochs=epochs,
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
        trainable_parameters=trainable,
        peak_memory_bytes=int(mx.get_peak_memory()),
        marked_used=marked,
        wall_s=time.perf_counter() - t0,
        adapter_path=str(path),
        head_tokens=len(head) if head is not None else 0,
        costs=costs.to_dict() if costs is not None else None,
        costs_before=costs_before.to_dict() if costs_before is not None else None,
        draft_kind="feature" if is_feature_draft(draft) else "lora",
        rehearsal=rehearsal.to_dict() if rehearsal is not None else None,
        synthetic=synthetic.to_dict() if synthetic is not None else None,
    )
    log.info(
        "train_run",
        **{
            k: v
            for k, v in metrics.to_dict().items()
            if k
            not in (
                "heldout_before",
                "heldout_after",
                "costs",
                "costs_before",
                "rehearsal",
                "synthetic",
            )
        },
        heldout_before=before.agreement,
        heldout_after=after.agreement,
    )
    return metrics
