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
from daemon.bench.report import print_table, write_json
from daemon.config import ConfigSources, Settings


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
) -> dict[str, Any]:
    """Training throughput (tokens/s), peak memory and held-out agreement before -> after for
    the configured draft.

    Without ``prompts`` it trains on the buffer in ``settings.paths.data_dir`` (its pending
    failures + replay; holdout rows for evaluation) and marks nothing used. With ``prompts``
    it first builds traffic in a scratch buffer: each prompt served greedily (``max_tokens``)
    by the untrained pair, split by the buffer's hash, and ``holdout_prompts`` (if given) all
    stored as holdout rows. The adapter goes to ``out_dir`` (default: a temporary directory,
    deleted). CPU note: generation runs at ~5-10 tokens/s for the default pair, so 100 prompts x
    64 tokens take ~15 minutes.
    """
    from daemon.core.models import load_pair
    from daemon.store.buffer import ReplayBuffer

    if pair is None:
        pair = load_pair(settings)
    traffic: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="specd-bench-train-") as tmp:
        run_settings = settings
        if prompts is not None:
            run_settings = settings.model_copy(deep=True)
            run_settings.paths.data_dir = Path(tmp) / "data"
            with ReplayBuffer(run_settings.paths.data_dir, settings.buffer) as buf:
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
        m = run_training(
            run_settings,
            out_dir=out_dir or Path(tmp) / "adapter",
            epochs=epochs,
            max_steps=max_steps,
            run_id="bench-train",
            progress=progress,
            mark_used=False,
            pair=pair,
        )
    cfg = settings.training
    return {
        "draft": pair.draft_id,
        "heldout_before": m.heldout_before.agreement,
        "heldout_after": m.heldout_after.agreement,
        "heldout_positions": m.heldout_after.positions,
        "heldout_rows": m.heldout_after.rows,
        "examples": m.examples.failures + m.examples.replay,
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
        "traffic": traffic,
        "adapter_path": m.adapter_path if out_dir else None,
    }


def run(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd bench train``: `bench_train` on the configured buffer, as a table."""
    result = bench_train(
        settings, epochs=args.epochs, max_steps=args.max_steps, out_dir=args.out, progress=True
    )
    print_table(
        {"train": result},
        [
            "heldout_before",
            "heldout_after",
            "examples",
            "steps",
            "tokens_per_s",
            "peak_memory_bytes",
            "train_seconds",
        ],
    )
    write_json(args.json, {"train": result})
    return 0
