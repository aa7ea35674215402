"""``specd bench train``: one training run of the configured draft, measured (throughput, peak
memory, held-out agreement before -> after), optionally on traffic it first generates."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from daemon.adaptation.run import run_training
from daemon.bench.report import print_table, provenance, write_json
from daemon.config import ConfigSources, Settings, TrainingSettings
from daemon.core.speed import StepCosts, estimate
from daemon.store.adapters import load_adapter_dir
from daemon.store.runs import RunMetrics


def generate_traffic(
    pair: Any,
    prompts: Iterable[str | list[dict[str, Any]]],
    buffer: Any,
    *,
    max_tokens: int = 64,
    split: str | None = None,
    speculative: Any = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Serve ``prompts`` greedily with the engine (chat template applied) and store each
    request in ``buffer`` (a `daemon.store.buffer.ReplayBuffer`) as the daemon would; ``split``
    forces the split (else the buffer's hash of the prompt text decides, keyed as the daemon
    keys it: `daemon.core.prompts.prompt_text`)."""
    from tqdm import tqdm

    from daemon.core.engine import SamplingParams, SpeculativeConfig, SpeculativeEngine
    from daemon.core.prompts import encode_prompt, prompt_text
    from daemon.store.buffer import BufferRecord

    config = (
        SpeculativeConfig.from_settings(speculative, pair.max_context)
        if speculative is not None
        else SpeculativeConfig(max_context=pair.max_context)
    )
    engine = SpeculativeEngine(pair.target, pair.draft, pair.tokenizer, config)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    t0 = time.perf_counter()
    rows = tokens = 0
    for prompt in tqdm(list(prompts), disable=not progress, file=sys.stderr, unit="prompt"):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = encode_prompt(pair.tokenizer, messages)
        result = engine.run(ids, params)
        record = BufferRecord.from_result(
            prompt_text(messages), ids, result, pair.target_id, pair.draft_id
        )
        if split is not None:
            record.split = split
        buffer.add([record])
        rows += 1
        tokens += len(result.tokens)
    dt = time.perf_counter() - t0
    return {"records": rows, "tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt}


def bench_train(
    settings: Settings,
    *,
    prompts: Sequence[str | list[dict[str, Any]]] | None = None,
    holdout_prompts: Sequence[str | list[dict[str, Any]]] | None = None,
    max_tokens: int = 64,
    epochs: int | None = None,
    max_steps: int | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    pair: Any = None,
    max_failures: int | None = None,
) -> dict[str, Any]:
    """Training throughput (tokens/s), peak memory and held-out agreement before -> after for
    the configured draft.

    Without ``prompts`` it trains on the buffer in ``settings.paths.data_dir`` (its pending
    failures + replay; holdout rows for evaluation) and marks nothing used. With ``prompts``
    it first builds traffic in a scratch buffer: each prompt served greedily (``max_tokens``)
    by the untrained pair, split by the buffer's hash, and ``holdout_prompts`` (if given) all
    stored as holdout rows. The adapter goes to ``out_dir`` (default: a temporary directory,
    deleted). CPU note: generation runs at ~5-10 tokens/s for the default pair, so 100 prompts x
    64 tokens take ~15 minutes. ``max_failures``: train on the oldest that many pending
    failures only (`run_training`), for a learning curve.
    """
    from daemon.core.models import load_pair

    if pair is None:
        pair = load_pair(settings)
    traffic: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="specd-bench-train-") as tmp:
        run_settings = settings
        if prompts is not None:
            run_settings = settings.model_copy(deep=True)
            run_settings.paths.data_dir = Path(tmp) / "data"
            traffic = _scratch_traffic(
                run_settings, pair, prompts, holdout_prompts, max_tokens, progress
            )
        chain_before = holdout_chain(run_settings, pair, pair.draft)
        adapter_dir = Path(out_dir) if out_dir else Path(tmp) / "adapter"
        m = run_training(
            run_settings,
            out_dir=adapter_dir,
            epochs=epochs,
            max_steps=max_steps,
            run_id="bench-train",
            progress=progress,
            mark_used=False,
            pair=pair,
            max_failures=max_failures,
        )
        trained = load_adapter_dir(pair.fresh_draft, adapter_dir)
        chains = (
            chain_before,
            holdout_chain(run_settings, pair, trained),
            holdout_chain(run_settings, pair, trained, trained_on=True),
        )
    out = _report(m, pair, settings.training, chains)
    out["traffic"] = traffic
    out["adapter_path"] = m.adapter_path if out_dir else None
    return out


def _scratch_traffic(
    settings: Settings,
    pair: Any,
    prompts: Sequence[str | list[dict[str, Any]]],
    holdout_prompts: Sequence[str | list[dict[str, Any]]] | None,
    max_tokens: int,
    progress: bool,
) -> dict[str, Any]:
    """Each prompt served by the untrained pair into a new buffer in ``settings``' data
    directory, split by the buffer's hash; ``holdout_prompts`` all stored as holdout rows."""
    from daemon.store.buffer import ReplayBuffer

    with ReplayBuffer(settings.paths.data_dir, settings.buffer) as buf:
        traffic = generate_traffic(
            pair,
            prompts,
            buf,
            max_tokens=max_tokens,
            speculative=settings.speculative,
            progress=progress,
        )
        if holdout_prompts:
            generate_traffic(
                pair,
                holdout_prompts,
                buf,
                max_tokens=max_tokens,
                split="holdout",
                speculative=settings.speculative,
                progress=progress,
            )
        traffic["train_records"] = buf.count("train")
        traffic["holdout_records"] = buf.count("holdout")
    return traffic


def _report(
    m: RunMetrics,
    pair: Any,
    cfg: TrainingSettings,
    chains: tuple[dict[str, Any], dict[str, Any], dict[str, Any]],
) -> dict[str, Any]:
    """A run's row: agreement before -> after, the gate's estimate, costs, the training's
    own figures and the settings it ran with."""
    chain_before, chain_after, chain_trained_on = chains
    # what the speed gate would score: the pair's expected speedup over the target alone on
    # the holdout, with the step costs the run measured (daemon.core.speed)
    costs = StepCosts.from_dict(m.costs) if m.costs else None
    # a draft of another kind than the one it replaces (a first feature draft) has its own
    costs_before = StepCosts.from_dict(m.costs_before) if m.costs_before else costs
    speed = {
        f"expected_speedup_{when}": estimate(ev.match_rows(), c).speedup if c else None
        for when, ev, c in (
            ("before", m.heldout_before, costs_before),
            ("after", m.heldout_after, costs),
        )
    }
    return {
        "draft": pair.draft_id,
        "heldout_before": m.heldout_before.agreement,
        "heldout_after": m.heldout_after.agreement,
        # the first two tokens of a round: first right, both right (the second drafted from
        # the draft's own state, as served)
        "chain_before": chain_before,
        "chain_after": chain_after,
        "both_right_before": chain_before["both"],
        "both_right_after": chain_after["both"],
        # the same measure on rows it was trained on: far above the holdout's, it memorised
        "chain_trained_on": chain_trained_on,
        "trained_on_after": chain_trained_on["first"],
        **speed,
        "draft_token_ms": costs.draft * 1000 if costs else None,
        # a drafted token's cost as a share of a target step (one row), both timed by the run
        "draft_token_vs_target": costs.draft / costs.target if costs else None,
        # a round's later draft tokens, where they cost less (a feature draft's own features)
        "draft_next_token_vs_target": (
            costs.draft_next / costs.target if costs and costs.draft_next is not None else None
        ),
        "costs": m.costs,
        "costs_before": m.costs_before,
        "heldout_positions": m.heldout_after.positions,
        "heldout_rows": m.heldout_after.rows,
        "examples": m.examples.failures + m.examples.replay,
        "failures": m.examples.failures,
        # the target's own answers to those rows' prompts (training.rehearsal_tokens)
        "rehearsal_examples": m.examples.rehearsal,
        "rehearsal": m.rehearsal,
        "target_tokens": m.examples.target_tokens,
        "epochs": m.epochs,
        "steps": m.steps,
        "tokens_per_s": m.tokens_per_s,
        "peak_memory_bytes": m.peak_memory_bytes,
        "train_seconds": m.train_seconds,
        "loss_first": m.loss_first,
        "loss_last": m.loss_last,
        "learning_rate": cfg.learning_rate,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "lora_rank": cfg.lora.rank,
        "kd_weight": cfg.kd_weight,
        "disagreement_weight": cfg.disagreement_weight,
        "loss": cfg.loss,
        # a feature draft: the target layers it reads besides the final ones, its second step
        "feature_layers": list(pair.feature_taps) if pair.learns_features else None,
        "feature_second_step": cfg.feature_second_step if pair.learns_features else None,
        "feature_noise": cfg.feature_noise if pair.learns_features else None,
        "feature_prompt_weight": cfg.feature_prompt_weight if pair.learns_features else None,
        "feature_layer_lr": cfg.feature_layer_lr if pair.learns_features else None,
    }


def holdout_chain(
    settings: Settings, pair: Any, draft: Any, trained_on: bool = False
) -> dict[str, Any]:
    """`chain_agreement` of ``draft`` on the buffer's holdout rows; ``trained_on``: on as many
    of the oldest pending failure cases instead (rows every run of the bench trains on), so
    the gap between the two is what the draft memorised rather than learned."""
    from daemon.core.evaluation import chain_agreement
    from daemon.store.buffer import ReplayBuffer

    with ReplayBuffer(settings.paths.data_dir, settings.buffer, create=False) as buf:
        records = buf.holdout(settings.training.eval_max_rows)
        if trained_on:
            records = buf.pending_failures(len(records))
    rows = [(r.prompt_tokens, r.output_tokens) for r in records]
    return chain_agreement(
        draft,
        rows,
        max_prompt=settings.data.max_prompt_length,
        max_output=settings.data.max_output_length,
        vocab_limit=pair.shared_vocab,
    ).to_dict()


def holdout_acceptance(settings: Settings, pair: Any, temperature: float) -> dict[str, Any]:
    """Teacher-forced expected acceptance of ``pair``'s draft as it is now on the buffer's
    holdout rows, at ``temperature`` and greedy (`teacher_forced_acceptance`)."""
    from daemon.core.evaluation import teacher_forced_acceptance
    from daemon.store.buffer import ReplayBuffer

    with ReplayBuffer(settings.paths.data_dir, settings.buffer, create=False) as buf:
        holdout = buf.holdout(settings.training.eval_max_rows)
    rows = [(r.prompt_tokens, r.output_tokens) for r in holdout]
    kw: dict[str, Any] = {
        "max_prompt": settings.data.max_prompt_length,
        "max_output": settings.data.max_output_length,
        "vocab_limit": pair.shared_vocab,
    }
    sampled = teacher_forced_acceptance(pair.target, pair.draft, rows, temperature, **kw)
    greedy = teacher_forced_acceptance(pair.target, pair.draft, rows, 0.0, **kw)
    return {"acceptance_greedy": greedy.rate, "acceptance_sampled": sampled.rate}


def bench_losses(
    settings: Settings,
    losses: Sequence[str],
    *,
    temperature: float,
    epochs: int | None = None,
    max_steps: int | None = None,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """One `bench_train` row per ``training.loss`` on the same buffer, each from a freshly
    loaded pair, with the holdout's expected acceptance greedy and at ``temperature`` before
    (the untrained draft, row ``untrained``) and after each run."""
    from daemon.core.models import load_pair

    pair = load_pair(settings)
    rows: dict[str, dict[str, Any]] = {"untrained": holdout_acceptance(settings, pair, temperature)}
    for loss in losses:
        run_settings = settings.model_copy(deep=True)
        run_settings.training.loss = loss  # type: ignore[assignment]
        pair = load_pair(run_settings)  # run_training adapts this pair's draft in place
        row = bench_train(
            run_settings, epochs=epochs, max_steps=max_steps, progress=progress, pair=pair
        )
        row.update(holdout_acceptance(run_settings, pair, temperature))
        rows[loss] = {"loss": loss, "temperature": temperature, **row}
    return rows


def run(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd bench train``: `bench_train` on the configured buffer, as a table; with
    ``--losses`` one row per loss (`bench_losses`), with ``--rows`` one per traffic size."""
    origin = provenance()  # the code that ran: taken before the run
    if args.losses:
        rows = bench_losses(
            settings,
            args.losses,
            temperature=args.temperature,
            epochs=args.epochs,
            max_steps=args.max_steps,
            progress=True,
        )
        print_table(
            rows,
            [
                "heldout_before",
                "heldout_after",
                "expected_speedup_after",
                "acceptance_greedy",
                "acceptance_sampled",
                "steps",
                "train_seconds",
                "loss_last",
            ],
        )
        write_json(args.json, rows)
        return 0
    if args.rows:
        # each from a fresh pair (run_training adapts a LoRA draft in place)
        results = {
            f"rows_{n}": bench_train(
                settings,
                epochs=args.epochs,
                max_steps=args.max_steps,
                progress=True,
                max_failures=n,
            )
            for n in args.rows
        }
    else:
        results = {
            "train": bench_train(
                settings,
                epochs=args.epochs,
                max_steps=args.max_steps,
                out_dir=args.out,
                progress=True,
            )
        }
    print_table(
        results,
        [
            "heldout_before",
            "heldout_after",
            "both_right_before",
            "both_right_after",
            "trained_on_after",
            "expected_speedup_before",
            "expected_speedup_after",
            "draft_token_ms",
            "draft_token_vs_target",
            "examples",
            "rehearsal_examples",
            "target_tokens",
            "steps",
            "tokens_per_s",
            "peak_memory_bytes",
            "train_seconds",
        ],
    )
    write_json(args.json, {**results, "run": origin})
    return 0
