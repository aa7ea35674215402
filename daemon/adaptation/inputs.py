"""What one training run reads: buffer rows in, examples out (`daemon.adaptation.run`).

Each run uses the train-split failure cases no run has used yet (`ReplayBuffer.pending_failures`)
plus ``training.replay_ratio`` of the run's examples drawn from older train rows
(`ReplayBuffer.sample_replay`), so the draft does not forget, and with
``training.rehearsal_tokens`` the target's own answers to those rows' prompts
(`daemon.adaptation.rehearsal`). With ``training.synthetic_per_failure`` the run first has the
target write rows like the traffic into the buffer (`daemon.adaptation.synthetic.write_rows`):
pending failures like any other, so this run trains on them and later ones replay them.
Holdout rows are only ever evaluated on. With ``models.draft_head_tokens`` set, the run's
version serves with the most frequent tokens of the target's recent train-split outputs
(`daemon.core.heads.frequent_tokens`). Log events (component ``training``):
``train_synthetic``, ``train_rehearsal``, ``train_data``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.adaptation.data import make_examples
from daemon.adaptation.rehearsal import (
    RehearsalCache,
    RehearsalReport,
    rehearsal_budget,
    rehearse,
)
from daemon.adaptation.synthetic import SynthesisReport, write_rows
from daemon.config import Settings
from daemon.core.heads import frequent_tokens
from daemon.errors import TrainingError
from daemon.logging import get_logger
from daemon.store.buffer import ReplayBuffer
from daemon.store.record import SYNTHETIC_DRAFT
from daemon.store.runs import ExampleCounts, ProgressFile

log = get_logger("training")

# recent target output tokens a pruned draft head's subset is counted from
HEAD_SAMPLE_TOKENS = 1 << 20


@dataclass
class RunInputs:
    """What a run reads from the buffer, in one transaction's view of it."""

    failures: list[Any]
    replay: list[Any]
    holdout: list[Any]
    head: list[int] | None  # the pruned head this version will serve with
    rehearsal_budget: int
    kept_ids: set[int]  # rows the rehearsal cache may keep answers for
    buffer_path: Path


def replay_count(num_failures: int, ratio: float) -> int:
    """Replay rows so that they are ``ratio`` of the run's examples."""
    if ratio <= 0 or num_failures <= 0:
        return 0
    return int(round(num_failures * ratio / (1.0 - ratio)))


def rehearsal_examples(
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


def synthetic_rows(
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


def read_inputs(
    pair: Any,
    settings: Settings,
    target: str | None = None,
    max_failures: int | None = None,
    draft_only: bool = False,
) -> RunInputs:
    """What a run trains and evaluates on: the pending failures (the oldest
    ``max_failures``), replay, holdout rows, the head its version will serve with, and the
    rehearsal budget."""
    cfg = settings.training
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
        head = (
            frequent_tokens(
                buffer.recent_outputs(HEAD_SAMPLE_TOKENS),
                pair.head_tokens,
                pair.shared_vocab,
                pair.special_ids(),
            )
            if pair.prunes_head
            else None
        )
        budget = rehearsal_budget(cfg.rehearsal_tokens, pair.learns_features)
        return RunInputs(
            failures=failures,
            replay=replay,
            holdout=buffer.holdout(cfg.eval_max_rows),
            head=head,
            rehearsal_budget=budget,
            kept_ids=buffer.ids() if budget and not draft_only else set(),
            buffer_path=buffer.path,
        )


def build_examples(
    pair: Any,
    inputs: RunInputs,
    settings: Settings,
    run_id: str,
    progress_view: ProgressFile,
    draft_only: bool = False,
) -> tuple[list[Any], ExampleCounts, RehearsalReport | None]:
    """The run's examples (failures, replay, rehearsal) and their counts; raises
    `TrainingError` when no failure case is left to train on."""
    fail_ex, skipped_f = make_examples(inputs.failures, settings.data, "failure")
    replay_ex, skipped_r = make_examples(inputs.replay, settings.data, "replay")
    progress_view.update(phase="rehearsing")
    rehearsal_ex, rehearsal = rehearsal_examples(
        pair,
        [*inputs.failures, *inputs.replay],
        inputs.rehearsal_budget,
        inputs.kept_ids,
        settings,
        draft_only,
        run_id,
    )
    examples = fail_ex + replay_ex + rehearsal_ex
    counts = ExampleCounts(
        failures=len(fail_ex),
        replay=len(replay_ex),
        rehearsal=len(rehearsal_ex),
        skipped_empty=skipped_f + skipped_r,
        target_tokens=sum(e.num_targets for e in examples),
        rejected_positions=sum(len(e.rejected) for e in examples),
        holdout_rows=len(inputs.holdout),
    )
    log.info("train_data", run_id=run_id, **counts.to_dict())
    if not fail_ex:
        raise TrainingError(
            f"nothing to train on: {len(inputs.failures)} pending failure cases "
            f"({skipped_f} empty after truncation) in {inputs.buffer_path}"
        )
    return examples, counts, rehearsal
