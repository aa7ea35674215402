"""``specd bench speed``: target-only vs mlx-lm speculative vs specd's engine, side by side."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper

from daemon.bench.common import mlx_lm_run, strip_eos, timed
from daemon.bench.report import print_table, provenance, write_json
from daemon.bench.workloads import autocomplete_prompts
from daemon.config import ConfigSources, Settings, SpeculativeSettings
from daemon.core.drafting import SuffixIndex
from daemon.core.engine import GenerationStats, SamplingParams, SpeculativeConfig, SpeculativeEngine
from daemon.core.models import load_pair
from daemon.core.prompts import encode_prompt, read_prompts
from daemon.errors import AdapterError, PromptFileError
from daemon.store.adapters import AdapterStore, apply_adapter, load_adapter_dir
from daemon.store.buffer import ReplayBuffer, buffer_path


def bench_speed(
    target: nn.Module,
    draft: nn.Module,
    tokenizer: TokenizerWrapper,
    prompts: Sequence[list[dict[str, Any]]] | Sequence[str],
    max_tokens: int,
    num_draft_tokens: int,
    speculative: SpeculativeSettings | None = None,
    suffix: SuffixIndex | None = None,
    raw: bool = False,
) -> dict[str, Any]:
    """Greedy decoding speed of each method on the same prompts (chat template applied;
    ``raw``: string prompts sent as they are, as ``/v1/completions`` does).

    Rows: ``target_only`` (mlx-lm ``stream_generate`` without a draft),
    ``mlx_lm_speculative`` (``stream_generate`` with ``draft_model``), ``specd_fixed``
    (specd's engine, the model draft at fixed ``num_draft_tokens``), ``specd_adaptive``
    (specd's defaults, everything on: ``speculative`` settings, cost-aware rounds over the
    model draft, lookup and the ``suffix`` index), and one row per drafting source alone:
    ``specd_model`` (the model draft, adaptive length, no proposals), ``specd_lookup`` and
    ``specd_suffix`` (proposals only, no model draft; cost-aware).  Each row has
    ``tokens_per_s`` (generated tokens over wall time, prefill included),
    ``ratio_vs_target``, ``tokens``, ``seconds`` and ``identical_to_target`` (greedy
    outputs must match token for token, up to EOS); the
    speculative rows add ``acceptance_rate``, ``mean_accepted_length``, the tokens drafted
    and accepted per source (``drafted_by_source``, ``accepted_by_source``) and
    ``target_passes_per_token`` (prefill counted as one pass per prompt).  For mlx-lm the
    rounds are reconstructed from its ``from_draft`` flags (a round ends at the first
    non-draft token; it drafted ``min(k, tokens left)``).

    ``bookkeeping_overhead`` is (t_on - t_off) / t_off for specd's fixed-k engine with
    rejection recording on vs off (best of two alternating runs each).
    """
    if not prompts:
        raise ValueError("bench_speed needs at least one prompt")
    if raw:
        encoded = [[int(t) for t in tokenizer.encode(str(p))] for p in prompts]
    else:
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

    spec = speculative or SpeculativeSettings()
    defaults = SpeculativeConfig.from_settings(spec)

    def source_engine(lookup: bool, with_suffix: bool) -> SpeculativeEngine:
        cfg = replace(defaults, lookup=lookup, cost_aware=True, model_draft=False)
        return SpeculativeEngine(target, draft, tokenizer, cfg, suffix if with_suffix else None)

    fixed, model_only = make_engine(False), make_engine(True)
    fixed_off = make_engine(False, record=False)
    everything = SpeculativeEngine(target, draft, tokenizer, defaults, suffix=suffix)
    lookup_only, suffix_only = source_engine(True, False), source_engine(False, True)
    specd_engines = (fixed, model_only, fixed_off, everything, lookup_only, suffix_only)

    # warm-up (compilation, allocator) on the first prompt
    warm = encoded[0]
    warm_n = min(max_tokens, 16)
    mlx_lm_run(target, tokenizer, warm, warm_n)
    mlx_lm_run(target, tokenizer, warm, warm_n, draft, k)
    for eng in specd_engines:
        eng.run(warm, SamplingParams(max_tokens=warm_n))

    rows: dict[str, Any] = {}

    # target only
    ref_tokens: list[list[int]] = []
    total_t, total_n = 0.0, 0
    for p in encoded:
        (toks, _), dt = timed(partial(mlx_lm_run, target, tokenizer, p, max_tokens))
        ref_tokens.append(strip_eos(toks, eos))
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
        (toks, flags), dt = timed(partial(mlx_lm_run, target, tokenizer, p, max_tokens, draft, k))
        total_t += dt
        total_n += len(toks)
        identical &= strip_eos(toks, eos) == ref
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
            res, dt = timed(partial(eng.run, p, greedy))
            total_t += dt
            total.accumulate(res.stats)
            identical &= strip_eos(res.tokens, eos) == ref
        n = total.generation_tokens
        return {
            "tokens_per_s": n / total_t if total_t > 0 else 0.0,
            "tokens": n,
            "seconds": total_t,
            "acceptance_rate": total.acceptance_rate,
            "mean_accepted_length": total.mean_accepted_length,
            "target_passes_per_token": total.target_passes / max(n, 1),
            "identical_to_target": identical,
            "drafted_by_source": dict(total.drafted_by_source),
            "accepted_by_source": dict(total.accepted_by_source),
            # the costs and acceptances the engine's round policy measured on this row
            "measured": m.to_dict() if (m := eng.measured()) is not None else None,
        }

    rows["specd_fixed"] = run_engine(fixed)
    rows["specd_adaptive"] = run_engine(everything)
    rows["specd_model"] = run_engine(model_only)
    rows["specd_lookup"] = run_engine(lookup_only)
    rows["specd_suffix"] = run_engine(suffix_only)
    for name in ("mlx_lm_speculative", "specd_fixed", "specd_adaptive", "specd_model"):
        rows[name]["ratio_vs_target"] = rows[name]["tokens_per_s"] / base_tps if base_tps else 0.0
    for name in ("specd_lookup", "specd_suffix"):
        rows[name]["ratio_vs_target"] = rows[name]["tokens_per_s"] / base_tps if base_tps else 0.0
    mlx_tps = rows["mlx_lm_speculative"]["tokens_per_s"]
    rows["specd_adaptive"]["ratio_vs_mlx_lm"] = (
        rows["specd_adaptive"]["tokens_per_s"] / mlx_tps if mlx_tps else 0.0
    )
    rows["suffix_index"] = suffix.stats() if suffix is not None else {"tokens": 0}

    t_on, t_off = float("inf"), float("inf")
    for _ in range(2):
        t_off = min(t_off, sum(timed(partial(fixed_off.run, p, greedy))[1] for p in encoded))
        t_on = min(t_on, sum(timed(partial(fixed.run, p, greedy))[1] for p in encoded))
    rows["bookkeeping_overhead"] = (t_on - t_off) / t_off if t_off > 0 else 0.0
    rows["num_prompts"] = len(encoded)
    rows["max_tokens"] = max_tokens
    rows["num_draft_tokens"] = k
    return rows


def run(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd bench speed``: the rows on the configured pair, optionally with an adapter."""
    prompts: list[Any]
    if args.workload == "autocomplete":  # generated here: raw code prefixes
        prompts = autocomplete_prompts(args.limit)
    elif args.prompts is None:
        raise PromptFileError("bench speed needs --prompts FILE or --workload autocomplete")
    else:
        prompts = [p.messages for p in read_prompts(args.prompts, limit=args.limit)]
    pair = load_pair(settings)
    k = args.num_draft_tokens or settings.speculative.num_draft_tokens
    draft, adapter = pair.draft, "none"
    if args.adapter == "current":
        store = AdapterStore.for_data_dir(settings.paths.data_dir)
        version = store.current()
        if version is None:
            raise AdapterError(f"no current adapter in {store.root}")
        store.verify(version)  # the checksum check the daemon makes before a swap
        draft, adapter = apply_adapter(pair.fresh_draft, version), f"v{version.version}"
    elif args.adapter is not None:
        draft, adapter = load_adapter_dir(pair.fresh_draft, args.adapter), str(args.adapter)
    meta = provenance()  # at the start: the commit that ran
    print(
        f"bench speed: {len(prompts)} prompts ({args.workload or args.prompts}), "
        f"max_tokens={args.max_tokens}, k={k}, "
        f"target={pair.target_id}, draft={pair.draft_id}, adapter={adapter}"
    )
    # the suffix source drafts from the data dir's recorded outputs, as the daemon would
    suffix = SuffixIndex(settings.speculative.suffix_tokens)
    if buffer_path(settings.paths.data_dir).exists():
        with ReplayBuffer(settings.paths.data_dir, create=False) as buf:
            for output in buf.recent_outputs(suffix.budget):
                suffix.add(output)
    result = bench_speed(
        pair.target,
        draft,
        pair.tokenizer,
        prompts,
        args.max_tokens,
        k,
        speculative=settings.speculative,
        suffix=suffix,
        raw=args.workload == "autocomplete",
    )
    result["provenance"] = meta
    result["workload"] = args.workload or str(args.prompts)
    rows = {k: v for k, v in result.items() if isinstance(v, dict) and "tokens_per_s" in v}
    print_table(
        rows,
        [
            "tokens_per_s",
            "ratio_vs_target",
            "acceptance_rate",
            "mean_accepted_length",
            "target_passes_per_token",
            "identical_to_target",
        ],
    )
    print(f"bookkeeping_overhead: {result['bookkeeping_overhead']:.2%}")
    write_json(args.json, result)
    return 0
