"""``specd bench speed``: target-only vs mlx-lm speculative vs specd's engine, side by side."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.nn as nn
from mlx_lm import stream_generate
from mlx_lm.tokenizer_utils import TokenizerWrapper

from daemon.engine import GenerationStats, SamplingParams, SpeculativeConfig, SpeculativeEngine
from daemon.prompts import encode_prompt

__all__ = ["bench_draft", "bench_speed"]


def _mlx_lm_run(
    target: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: list[int],
    max_tokens: int,
    draft: nn.Module | None = None,
    num_draft_tokens: int = 0,
) -> tuple[list[int], list[bool]]:
    kwargs: dict[str, Any] = {}
    if draft is not None:
        kwargs.update(draft_model=draft, num_draft_tokens=num_draft_tokens)
    toks: list[int] = []
    flags: list[bool] = []
    for r in stream_generate(target, tokenizer, prompt, max_tokens=max_tokens, **kwargs):
        toks.append(int(r.token))
        flags.append(bool(r.from_draft))
    return toks, flags


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _strip_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def bench_speed(
    target: nn.Module,
    draft: nn.Module,
    tokenizer: TokenizerWrapper,
    prompts: Sequence[list[dict[str, Any]]] | Sequence[str],
    max_tokens: int,
    num_draft_tokens: int,
) -> dict[str, Any]:
    """Greedy decoding speed of four methods on the same prompts (chat template applied).

    Rows: ``target_only`` (mlx-lm ``stream_generate`` without a draft),
    ``mlx_lm_speculative`` (``stream_generate`` with ``draft_model``), ``specd_fixed``
    (specd's engine, fixed ``num_draft_tokens``) and ``specd_adaptive`` (adaptive draft length
    starting at ``num_draft_tokens``).  Each row has ``tokens_per_s`` (generated tokens over
    wall time, prefill included), ``ratio_vs_target``, ``tokens``, ``seconds`` and
    ``identical_to_target`` (greedy outputs must match token for token, up to EOS); the
    speculative rows add ``acceptance_rate``, ``mean_accepted_length`` and
    ``target_passes_per_token`` (prefill counted as one pass per prompt).  For mlx-lm the
    rounds are reconstructed from its ``from_draft`` flags (a round ends at the first
    non-draft token; it drafted ``min(k, tokens left)``).

    ``bookkeeping_overhead`` is (t_on - t_off) / t_off for specd's fixed-k engine with
    rejection recording on vs off (best of two alternating runs each).
    """
    if not prompts:
        raise ValueError("bench_speed needs at least one prompt")
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    k = int(num_draft_tokens)
    eos = set(tokenizer.eos_token_ids or ())
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens)

    def make_engine(adaptive: bool, record: bool = True) -> SpeculativeEngine:
        cfg = SpeculativeConfig(
            num_draft_tokens=k,
            adaptive=adaptive,
            min_draft_tokens=1,
            max_draft_tokens=max(8, k),
            record_rejections=record,
        )
        return SpeculativeEngine(target, draft, tokenizer, cfg)

    fixed, adaptive = make_engine(False), make_engine(True)
    fixed_off = make_engine(False, record=False)

    # warm-up (compilation, allocator) on the first prompt
    warm = encoded[0]
    warm_n = min(max_tokens, 16)
    _mlx_lm_run(target, tokenizer, warm, warm_n)
    _mlx_lm_run(target, tokenizer, warm, warm_n, draft, k)
    for eng in (fixed, adaptive, fixed_off):
        eng.run(warm, SamplingParams(max_tokens=warm_n))

    rows: dict[str, Any] = {}

    # target only
    ref_tokens: list[list[int]] = []
    total_t, total_n = 0.0, 0
    for p in encoded:
        (toks, _), dt = _timed(lambda p=p: _mlx_lm_run(target, tokenizer, p, max_tokens))
        ref_tokens.append(_strip_eos(toks, eos))
        total_t += dt
        total_n += len(toks)
    base_tps = total_n / total_t if total_t > 0 else 0.0
    rows["target_only"] = {
        "tokens_per_s": base_tps,
        "ratio_vs_target": 1.0,
        "tokens": total_n,
        "seconds": total_t,
        "target_passes_per_token": (total_n + len(encoded)) / max(total_n, 1),
        "identical_to_target": True,
    }

    # mlx-lm speculative
    total_t, total_n, accepted, drafted, rounds = 0.0, 0, 0, 0, 0
    identical = True
    for p, ref in zip(encoded, ref_tokens, strict=True):
        (toks, flags), dt = _timed(
            lambda p=p: _mlx_lm_run(target, tokenizer, p, max_tokens, draft, k)
        )
        total_t += dt
        total_n += len(toks)
        identical &= _strip_eos(toks, eos) == ref
        start = True
        for i, f in enumerate(flags):
            if start:
                rounds += 1
                drafted += min(k, max_tokens - i)
                start = False
            if f:
                accepted += 1
            else:
                start = True
    rows["mlx_lm_speculative"] = {
        "tokens_per_s": total_n / total_t if total_t > 0 else 0.0,
        "tokens": total_n,
        "seconds": total_t,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "mean_accepted_length": 1.0 + accepted / rounds if rounds else 1.0,
        "target_passes_per_token": (rounds + len(encoded)) / max(total_n, 1),
        "identical_to_target": identical,
    }

    def run_engine(eng: SpeculativeEngine) -> dict[str, Any]:
        total = GenerationStats()
        total_t, identical = 0.0, True
        for p, ref in zip(encoded, ref_tokens, strict=True):
            res, dt = _timed(lambda p=p: eng.run(p, greedy))
            total_t += dt
            total.accumulate(res.stats)
            identical &= _strip_eos(res.tokens, eos) == ref
        n = total.generation_tokens
        return {
            "tokens_per_s": n / total_t if total_t > 0 else 0.0,
            "tokens": n,
            "seconds": total_t,
            "acceptance_rate": total.acceptance_rate,
            "mean_accepted_length": total.mean_accepted_length,
            "target_passes_per_token": total.target_passes / max(n, 1),
            "identical_to_target": identical,
        }

    rows["specd_fixed"] = run_engine(fixed)
    rows["specd_adaptive"] = run_engine(adaptive)
    for name in ("mlx_lm_speculative", "specd_fixed", "specd_adaptive"):
        rows[name]["ratio_vs_target"] = rows[name]["tokens_per_s"] / base_tps if base_tps else 0.0

    t_on, t_off = float("inf"), float("inf")
    for _ in range(2):
        t_off = min(t_off, sum(_timed(lambda p=p: fixed_off.run(p, greedy))[1] for p in encoded))
        t_on = min(t_on, sum(_timed(lambda p=p: fixed.run(p, greedy))[1] for p in encoded))
    rows["bookkeeping_overhead"] = (t_on - t_off) / t_off if t_off > 0 else 0.0
    rows["num_prompts"] = len(encoded)
    rows["max_tokens"] = max_tokens
    rows["num_draft_tokens"] = k
    return rows


def _decode_step_seconds(model: nn.Module, context: int = 256, steps: int = 32) -> float:
    """Seconds per single-token forward pass with a KV cache of ``context`` tokens."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.ones((1, context), dtype=mx.uint32), cache=cache))
    token = mx.array([[1]], dtype=mx.uint32)
    for _ in range(4):  # warm-up
        mx.eval(model(token, cache=cache))
    t0 = time.perf_counter()
    for _ in range(steps):
        mx.eval(model(token, cache=cache))
    return (time.perf_counter() - t0) / steps


def bench_draft(
    target: nn.Module,
    tokenizer: TokenizerWrapper,
    prompts: Sequence[list[dict[str, Any]]] | Sequence[str],
    candidates: dict[str, list[int]],
    max_tokens: int,
) -> dict[str, Any]:
    """Layer-skip draft candidates: held-out agreement with the target and cost per token.

    The target answers each prompt greedily once; every candidate is then scored by
    teacher-forced agreement on those answers (`daemon.evaluation`), and its decode step is
    timed against the target's in the same process (``cost_ratio``).
    """
    from daemon.evaluation import teacher_forced_agreement
    from daemon.models import make_layer_skip_draft

    rows = []
    for p in prompts:
        ids = encode_prompt(tokenizer, p)
        out, _ = _mlx_lm_run(target, tokenizer, ids, max_tokens)
        rows.append((ids, out))
    target_step = _decode_step_seconds(target)
    result: dict[str, Any] = {
        "target": {
            "layers": len(target.layers),
            "step_ms": target_step * 1000,
            "tokens": sum(len(o) for _, o in rows),
        },
    }
    for name, layers in candidates.items():
        draft = make_layer_skip_draft(target, layers)
        agreement = teacher_forced_agreement(draft, rows)
        step = _decode_step_seconds(draft)
        result[name] = {
            "layers": layers,
            "heldout_agreement": agreement.rate,
            "step_ms": step * 1000,
            "cost_ratio": step / target_step,
        }
    return result


@dataclass
class _EvalTotals:
    """Eval requests summed; the rates are `GenerationStats`'s, over the sums."""

    stats: GenerationStats = field(default_factory=GenerationStats)
    seconds: float = 0.0

    def add(self, stats: GenerationStats, seconds: float) -> None:
        self.stats.accumulate(stats)
        self.seconds += seconds

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "tokens_per_s": s.generation_tokens / self.seconds if self.seconds else 0.0,
            "acceptance_rate": s.acceptance_rate,
            "mean_accepted_length": s.mean_accepted_length,
            "tokens": s.generation_tokens,
            "seconds": self.seconds,
        }


def _eval_engine(
    service: Any, prompts: Sequence[Any], max_tokens: int, groups: Sequence[str] | None = None
) -> dict[str, Any]:
    """Greedy eval traffic through the service (never recorded): speed and acceptance, and
    with ``groups`` (a label per prompt) the same per label under ``by_group``."""
    total = _EvalTotals()
    by_group: dict[str, _EvalTotals] = {}
    for i, p in enumerate(prompts):
        t0 = time.perf_counter()
        r = service.generate(p, record=False, temperature=0.0, max_tokens=max_tokens)
        seconds = time.perf_counter() - t0
        total.add(r.stats, seconds)
        if groups is not None:
            by_group.setdefault(groups[i], _EvalTotals()).add(r.stats, seconds)
    out = total.to_dict()
    if groups is not None:
        out["by_group"] = {g: t.to_dict() for g, t in by_group.items()}
    return out


def bench_adapt(
    settings: Any,
    config_file: Any,
    train_prompts: Sequence[list[dict[str, Any]]],
    eval_prompts: Sequence[list[dict[str, Any]]],
    max_tokens: int,
    progress: bool = True,
    eval_groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The adaptive loop on the configured pair, measured on eval prompts before and after.

    Runs in a private data directory (a fresh buffer and adapter store): eval traffic is never
    recorded; train traffic goes through the service exactly as the daemon serves it, and the
    `AdaptationLoop` trains, gates and swaps as it would, with the configured
    ``min_failure_cases``. ``heldout_agreement`` is teacher-forced agreement of the draft with
    the target's greedy answers to the eval prompts. With ``eval_groups`` (a label per eval
    prompt, e.g. its domain) ``before`` and ``after`` also break the measures down by label.
    """
    import tempfile
    from pathlib import Path

    from tqdm import tqdm

    from daemon.adaptation import AdaptationLoop
    from daemon.evaluation import Agreement, teacher_forced_agreement
    from daemon.models import load_pair
    from daemon.service import Service

    wall0 = time.perf_counter()
    groups = list(eval_groups) if eval_groups is not None else None
    if groups is not None and len(groups) != len(eval_prompts):
        raise ValueError(f"{len(groups)} eval groups for {len(eval_prompts)} eval prompts")
    pair = load_pair(settings)
    tok = pair.tokenizer
    eval_ids = [encode_prompt(tok, p) for p in eval_prompts]
    # Target-only reference: speed, and the greedy answers held-out agreement is scored on.
    _mlx_lm_run(pair.target, tok, eval_ids[0], 8)  # warm-up
    t0 = time.perf_counter()
    answers = [_mlx_lm_run(pair.target, tok, ids, max_tokens)[0] for ids in eval_ids]
    target_s = time.perf_counter() - t0
    target_tps = sum(len(a) for a in answers) / target_s
    heldout_rows = list(zip(eval_ids, answers, strict=True))

    with tempfile.TemporaryDirectory(prefix="specd-bench-adapt-") as tmp:
        s = settings.model_copy(deep=True)
        s.paths.data_dir = Path(tmp)
        s.training.cooldown_seconds = 0.0
        s.training.check_interval_seconds = 2.0
        s.training.policy = "immediate"
        service = Service(s, pair)
        service.start()
        loop = AdaptationLoop(service, config_file)
        loop.start()
        try:

            def measure() -> dict[str, Any]:
                m = _eval_engine(service, eval_prompts, max_tokens, groups)
                m["speedup_vs_target"] = m["tokens_per_s"] / target_tps
                # one pass per group; the overall figure is their sum
                draft = service.engine.draft
                labels = groups or [""] * len(heldout_rows)
                agreement = {
                    g: teacher_forced_agreement(
                        draft, [r for r, rg in zip(heldout_rows, labels, strict=True) if rg == g]
                    )
                    for g in dict.fromkeys(labels)
                }
                m["heldout_agreement"] = sum(agreement.values(), Agreement()).rate
                for g, gm in m.get("by_group", {}).items():
                    gm["heldout_agreement"] = agreement[g].rate
                m["adapter_version"] = service.adapter_version
                return m

            before = measure()
            for p in tqdm(train_prompts, desc="train traffic", disable=not progress):
                service.generate(p, temperature=0.0, max_tokens=max_tokens)
            service.writer.flush(60)
            loop.check()  # the last failures may have just crossed the threshold
            while loop.run is not None:  # let a started run finish, gate and swap
                with loop.runs_done:
                    loop.runs_done.wait(5)
            after = measure()
        finally:
            loop.stop()
            service.stop(timeout=60)
    return {
        "target_only": {"tokens_per_s": target_tps, "tokens": sum(len(a) for a in answers)},
        "before": before,
        "after": after,
        "adapters_installed": loop.counts["installed"],
        "training_runs": loop.counts["runs"],
        "last_run": loop.last_run,
        "train_requests": len(train_prompts),
        "eval_requests": len(eval_prompts),
        "wall_s": time.perf_counter() - wall0,
    }


def blas_probe(target: nn.Module, prompt_tokens: int = 256, decode_steps: int = 32) -> dict:
    """Prefill and decode timings of ``target`` in this process (whatever BLAS it has)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from daemon.backend import loaded_blas

    tokens = mx.array([[(7 * i) % 1000 + 100 for i in range(prompt_tokens)]])
    mx.eval(target(tokens[:, :16]))  # warm-up
    cache = make_prompt_cache(target)
    t0 = time.perf_counter()
    mx.eval(target(tokens, cache=cache))
    prefill = time.perf_counter() - t0
    step = _decode_step_seconds(target, context=prompt_tokens, steps=decode_steps)
    return {
        "blas": loaded_blas(),
        "prefill_tokens_per_s": prompt_tokens / prefill,
        "decode_tokens_per_s": 1.0 / step,
    }


def bench_blas(argv_base: list[str]) -> dict[str, Any]:
    """The same probe in two child processes: MLX's bundled BLAS, then the system OpenBLAS."""
    import json
    import os
    import subprocess
    import sys

    from daemon.backend import REEXEC_MARKER, find_openblas

    lib = find_openblas()
    if lib is None:
        raise RuntimeError(
            "no system OpenBLAS found (Debian: apt-get install libopenblas0-pthread)"
        )
    rows: dict[str, Any] = {}
    for name, preload in (("bundled", None), ("openblas", lib)):
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", REEXEC_MARKER)}
        env["SPECD_MODELS__PRELOAD_OPENBLAS"] = "false"  # no re-exec: exactly this environment
        if preload:
            env["LD_PRELOAD"] = preload
        out = subprocess.run(
            [sys.executable, "-m", "daemon", *argv_base, "--probe"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        rows[f"{key.split('_')[0]}_speedup"] = rows["openblas"][key] / rows["bundled"][key]
    return rows
