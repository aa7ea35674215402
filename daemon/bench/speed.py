"""``specd bench speed``: target-only vs mlx-lm speculative vs specd's engine, side by side."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import mlx.nn as nn
import yaml
from mlx_lm.tokenizer_utils import TokenizerWrapper
from pydantic import ValidationError

from daemon.bench.common import mlx_lm_run, strip_eos, timed
from daemon.bench.report import print_table, provenance, write_json
from daemon.bench.workloads import autocomplete_prompts
from daemon.config import ConfigSources, Settings, SpeculativeSettings
from daemon.core.drafting import SuffixIndex
from daemon.core.engine import GenerationStats, SamplingParams, SpeculativeConfig, SpeculativeEngine
from daemon.core.models import load_pair
from daemon.core.prompts import encode_prompt, read_prompts
from daemon.errors import AdapterError, ConfigError, PromptFileError
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
    repeat: int = 1,
    variants: Sequence[Variant] = (),
    rows: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Greedy decoding speed of each method on the same prompts (chat template applied;
    ``raw``: string prompts sent as they are, as ``/v1/completions`` does).

    Rows: ``target_only`` (mlx-lm ``stream_generate`` without a draft),
    ``mlx_lm_speculative`` (``stream_generate`` with ``draft_model``), ``specd_fixed``
    (specd's engine, the model draft at fixed ``num_draft_tokens``), ``specd_adaptive``
    (specd's defaults, everything on: ``speculative`` settings, cost-aware rounds over the
    model draft, lookup and the ``suffix`` index), one row per drafting source alone:
    ``specd_model`` (the model draft, adaptive length, no proposals), ``specd_lookup`` and
    ``specd_suffix`` (proposals only, no model draft; cost-aware), and one row per
    ``variants`` entry (the defaults with some ``speculative`` settings changed).

    The rows run ``repeat`` times, every row once per repetition in the same order, so a
    slow minute of the machine touches all rows alike.  Each row's ratio is taken against
    the target measured in the same repetition; a row reports the median repetition
    (``tokens_per_s``, ``ratio_vs_target``), ``ratio_min``/``ratio_max`` over repetitions
    and the per-repetition lists (``tokens_per_s_runs``, ``ratio_runs``): the run-to-run
    spread a difference between rows has to exceed.  Each row has ``tokens``, ``seconds``
    and ``identical_to_target`` (greedy outputs must match the target's token for token, up
    to EOS, in every repetition); the speculative rows add ``acceptance_rate``,
    ``mean_accepted_length``, the tokens drafted and accepted per source and
    ``target_passes_per_token`` (prefill counted as one pass per prompt).  For mlx-lm the
    rounds are reconstructed from its ``from_draft`` flags (a round ends at the first
    non-draft token; it drafted ``min(k, tokens left)``).

    ``rows`` keeps only these rows (and ``target_only``, which every ratio needs; the
    variants always run), for repeated runs of the rows a choice depends on.

    ``bookkeeping_overhead`` is (t_on - t_off) / t_off for specd's fixed-k engine with
    rejection recording on vs off (best of two alternating runs each, measured once; only
    with the ``specd_fixed`` row).
    """
    if not prompts:
        raise ValueError("bench_speed needs at least one prompt")
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    if raw:
        encoded = [[int(t) for t in tokenizer.encode(str(p))] for p in prompts]
    else:
        encoded = [encode_prompt(tokenizer, p) for p in prompts]
    k = int(num_draft_tokens)
    eos = set(tokenizer.eos_token_ids or ())
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    engines, fixed_off = _engines(
        target, draft, tokenizer, k, speculative or SpeculativeSettings(), suffix, variants, rows
    )
    with_mlx_lm = rows is None or "mlx_lm_speculative" in rows

    # warm-up (compilation, allocator) on the first prompt
    warm = encoded[0]
    warm_n = min(max_tokens, 16)
    mlx_lm_run(target, tokenizer, warm, warm_n)
    if with_mlx_lm:
        mlx_lm_run(target, tokenizer, warm, warm_n, draft, k)
    for eng in (*engines.values(), *([fixed_off] if "specd_fixed" in engines else [])):
        eng.run(warm, SamplingParams(max_tokens=warm_n))

    ref_tokens: list[list[int]] = []
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(repeat):
        target_row, outputs = _target_row(target, tokenizer, encoded, max_tokens)
        if not ref_tokens:
            ref_tokens = [strip_eos(toks, eos) for toks in outputs]
        measured = {"target_only": target_row}
        if with_mlx_lm:
            measured["mlx_lm_speculative"] = _mlx_lm_row(
                target, draft, tokenizer, encoded, ref_tokens, max_tokens, k, eos
            )
        for name, eng in engines.items():
            measured[name] = _engine_row(eng, encoded, ref_tokens, greedy, eos)
        base = target_row["tokens_per_s"]
        for name, row in measured.items():
            row["ratio_vs_target"] = row["tokens_per_s"] / base if base else 0.0
            runs.setdefault(name, []).append(row)
    out: dict[str, Any] = {name: _median_run(rs) for name, rs in runs.items()}
    if "mlx_lm_speculative" in out and "specd_adaptive" in out:
        mlx_tps = out["mlx_lm_speculative"]["tokens_per_s"]
        out["specd_adaptive"]["ratio_vs_mlx_lm"] = (
            out["specd_adaptive"]["tokens_per_s"] / mlx_tps if mlx_tps else 0.0
        )
    out["suffix_index"] = suffix.stats() if suffix is not None else {"tokens": 0}

    if "specd_fixed" in engines:
        out["bookkeeping_overhead"] = _bookkeeping_overhead(
            engines["specd_fixed"], fixed_off, encoded, greedy
        )
    out["num_prompts"] = len(encoded)
    out["max_tokens"] = max_tokens
    out["num_draft_tokens"] = k
    out["repeat"] = repeat
    return out


ROWS = (
    "target_only",
    "mlx_lm_speculative",
    "specd_fixed",
    "specd_adaptive",
    "specd_model",
    "specd_lookup",
    "specd_suffix",
)


def _engines(
    target: nn.Module,
    draft: nn.Module,
    tokenizer: TokenizerWrapper,
    k: int,
    spec: SpeculativeSettings,
    suffix: SuffixIndex | None,
    variants: Sequence[Variant],
    rows: Sequence[str] | None,
) -> tuple[dict[str, SpeculativeEngine], SpeculativeEngine]:
    """The engine of each specd row ``rows`` keeps (and of each variant), and the fixed-k
    engine without rejection recording that ``bookkeeping_overhead`` compares with."""

    def make_engine(adaptive: bool, record: bool = True) -> SpeculativeEngine:
        cfg = SpeculativeConfig(
            num_draft_tokens=k,
            adaptive=adaptive,
            min_draft_tokens=1,
            max_draft_tokens=max(8, k),
            record_rejections=record,
        )
        return SpeculativeEngine(target, draft, tokenizer, cfg)

    defaults = SpeculativeConfig.from_settings(spec)

    def source_engine(lookup: bool, with_suffix: bool) -> SpeculativeEngine:
        cfg = replace(defaults, lookup=lookup, cost_aware=True, model_draft=False)
        return SpeculativeEngine(target, draft, tokenizer, cfg, suffix if with_suffix else None)

    engines: dict[str, SpeculativeEngine] = {
        "specd_fixed": make_engine(False),
        "specd_adaptive": SpeculativeEngine(target, draft, tokenizer, defaults, suffix=suffix),
        "specd_model": make_engine(True),
        "specd_lookup": source_engine(True, False),
        "specd_suffix": source_engine(False, True),
    }
    if rows is not None:
        unknown = set(rows) - {*engines, "mlx_lm_speculative", "target_only"}
        if unknown:
            raise ValueError(
                f"unknown rows {sorted(unknown)}; rows: mlx_lm_speculative, {', '.join(engines)}"
            )
        engines = {k: v for k, v in engines.items() if k in rows}
    for v in variants:
        cfg = SpeculativeConfig.from_settings(v.apply(spec))
        engines[v.row] = SpeculativeEngine(target, draft, tokenizer, cfg, suffix=suffix)
    return engines, make_engine(False, record=False)


def _bookkeeping_overhead(
    fixed: SpeculativeEngine,
    fixed_off: SpeculativeEngine,
    encoded: Sequence[list[int]],
    greedy: SamplingParams,
) -> float:
    """(t_on - t_off) / t_off with rejection recording on and off, best of two each."""
    t_on, t_off = float("inf"), float("inf")
    for _ in range(2):
        t_off = min(t_off, sum(timed(partial(fixed_off.run, p, greedy))[1] for p in encoded))
        t_on = min(t_on, sum(timed(partial(fixed.run, p, greedy))[1] for p in encoded))
    return (t_on - t_off) / t_off if t_off > 0 else 0.0


@dataclass(frozen=True)
class Variant:
    """A ``bench speed`` row: specd's defaults with some ``speculative`` settings changed."""

    changes: dict[str, Any]

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``KEY=VALUE[,KEY=VALUE...]`` over ``speculative.*`` (values as YAML scalars); an
        unknown key or a bad value is an error naming it."""
        changes: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip().removeprefix("speculative.")
            if not sep or key not in SpeculativeSettings.model_fields:
                raise ConfigError(f"--variant {text!r}: {part!r} is not speculative.KEY=VALUE")
            changes[key] = yaml.safe_load(value)
        if not changes:
            raise ConfigError(f"--variant {text!r}: no KEY=VALUE")
        variant = cls(changes)
        variant.apply(SpeculativeSettings())  # validate now, not after the first rows ran
        return variant

    @property
    def row(self) -> str:
        return "specd_adaptive[" + ",".join(f"{k}={v}" for k, v in self.changes.items()) + "]"

    def apply(self, settings: SpeculativeSettings) -> SpeculativeSettings:
        try:
            return SpeculativeSettings.model_validate({**settings.model_dump(), **self.changes})
        except ValidationError as exc:
            raise ConfigError(f"--variant {self.row}: {exc.errors()[0]['msg']}") from exc


def _target_row(
    target: nn.Module, tokenizer: TokenizerWrapper, encoded: list[list[int]], max_tokens: int
) -> tuple[dict[str, Any], list[list[int]]]:
    outputs: list[list[int]] = []
    total_t, total_n = 0.0, 0
    for p in encoded:
        (toks, _), dt = timed(partial(mlx_lm_run, target, tokenizer, p, max_tokens))
        outputs.append(toks)
        total_t += dt
        total_n += len(toks)
    row = {
        "tokens_per_s": total_n / total_t if total_t > 0 else 0.0,
        "tokens": total_n,
        "seconds": total_t,
        "target_passes_per_token": (total_n + len(encoded)) / max(total_n, 1),
        "identical_to_target": True,
    }
    return row, outputs


def _mlx_lm_row(
    target: nn.Module,
    draft: nn.Module,
    tokenizer: TokenizerWrapper,
    encoded: list[list[int]],
    ref_tokens: list[list[int]],
    max_tokens: int,
    k: int,
    eos: set[int],
) -> dict[str, Any]:
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
    return {
        "tokens_per_s": total_n / total_t if total_t > 0 else 0.0,
        "tokens": total_n,
        "seconds": total_t,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "mean_accepted_length": 1.0 + accepted / rounds if rounds else 1.0,
        "target_passes_per_token": (rounds + len(encoded)) / max(total_n, 1),
        "identical_to_target": identical,
    }


def _engine_row(
    eng: SpeculativeEngine,
    encoded: list[list[int]],
    ref_tokens: list[list[int]],
    greedy: SamplingParams,
    eos: set[int],
) -> dict[str, Any]:
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


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repetition with the median ratio (the lower middle one for an even count), with
    the spread over all of them; identical only when every repetition was."""
    ordered = sorted(runs, key=lambda r: r["ratio_vs_target"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    ratios = [r["ratio_vs_target"] for r in runs]
    row.update(
        runs=len(runs),
        ratio_min=min(ratios),
        ratio_max=max(ratios),
        ratio_runs=ratios,
        tokens_per_s_runs=[r["tokens_per_s"] for r in runs],
        identical_to_target=all(r["identical_to_target"] for r in runs),
    )
    return row


def run(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd bench speed``: the rows on the configured pair, optionally with an adapter."""
    variants = [Variant.parse(v) for v in args.variant]  # a typo fails before the model loads
    rows = args.rows.split(",") if args.rows else None
    if rows is not None and set(rows) - set(ROWS):
        raise ConfigError(f"--rows: unknown {', '.join(sorted(set(rows) - set(ROWS)))}")
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
        f"max_tokens={args.max_tokens}, k={k}, repeat={args.repeat}, "
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
        repeat=args.repeat,
        variants=variants,
        rows=rows,
    )
    result["provenance"] = meta
    result["workload"] = args.workload or str(args.prompts)
    rows = {k: v for k, v in result.items() if isinstance(v, dict) and "tokens_per_s" in v}
    print_table(
        rows,
        [
            "tokens_per_s",
            "ratio_vs_target",
            "ratio_min",
            "ratio_max",
            "acceptance_rate",
            "mean_accepted_length",
            "target_passes_per_token",
            "identical_to_target",
        ],
    )
    if "bookkeeping_overhead" in result:
        print(f"bookkeeping_overhead: {result['bookkeeping_overhead']:.2%}")
    write_json(args.json, result)
    return 0
