"""``specd bench draft``: layer-skip draft candidates by agreement and decode-step cost."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper

from daemon.bench.common import decode_step_seconds, mlx_lm_run
from daemon.bench.report import print_table, write_json
from daemon.config import ConfigSources, Settings
from daemon.core.models import load_pair
from daemon.core.prompts import encode_prompt, read_prompts


def bench_draft(
    target: nn.Module,
    tokenizer: TokenizerWrapper,
    prompts: Sequence[list[dict[str, Any]]] | Sequence[str],
    candidates: dict[str, list[int]],
    max_tokens: int,
    head_tokens: Sequence[int] = (0,),
) -> dict[str, Any]:
    """Layer-skip draft candidates: held-out agreement with the target and cost per token.

    The target answers each prompt greedily once; every candidate is then scored by
    teacher-forced agreement on those answers (`daemon.core.evaluation`), and its decode step is
    timed against the target's in the same process (``cost_ratio``).

    Each ``head_tokens`` N > 0 adds a row per candidate with its head cut to N tokens: the
    default list an unadapted draft uses (agreement and ``head_coverage``, the share of answer
    tokens in it), and ``traffic_coverage``, the coverage of the subset an adapter would get
    from traffic, counted on the even-numbered answers and measured on the odd ones.
    """
    from daemon.core.evaluation import teacher_forced_agreement
    from daemon.core.heads import default_head_tokens, frequent_tokens, prune_head
    from daemon.core.models import make_layer_skip_draft, output_vocab

    rows = []
    for p in prompts:
        ids = encode_prompt(tokenizer, p)
        out, _ = mlx_lm_run(target, tokenizer, ids, max_tokens)
        rows.append((ids, out))
    target_step = decode_step_seconds(target)
    result: dict[str, Any] = {
        "target": {
            "layers": len(target.layers),
            "step_ms": target_step * 1000,
            "tokens": sum(len(o) for _, o in rows),
        },
    }
    vocab = output_vocab(target)
    special = sorted({*(tokenizer.eos_token_ids or ()), *tokenizer.all_special_ids})
    answers = [o for _, o in rows]
    seen, unseen = answers[0::2], [t for o in answers[1::2] for t in o]

    def coverage(ids: list[int], tokens: list[int]) -> float | None:
        keep = set(ids)
        return sum(t in keep for t in tokens) / len(tokens) if tokens else None

    for name, layers in candidates.items():
        for n in head_tokens:
            draft = make_layer_skip_draft(target, layers)
            row: dict[str, Any] = {"layers": layers, "head_tokens": n or vocab}
            if 0 < n < vocab:
                head = default_head_tokens(n, vocab, special)
                prune_head(draft, head, vocab)
                row["head_coverage"] = coverage(head, [t for o in answers for t in o])
                row["traffic_coverage"] = coverage(frequent_tokens(seen, n, vocab, special), unseen)
            agreement = teacher_forced_agreement(draft, rows)
            step = decode_step_seconds(draft)
            row |= {
                "heldout_agreement": agreement.rate,
                "step_ms": step * 1000,
                "cost_ratio": step / target_step,
            }
            result[name if n == 0 else f"{name}/head{n}"] = row
    return result


def parse_candidate(text: str) -> tuple[str, list[int]]:
    """``--candidate NAME=LAYERS``: ``first4=0-3`` or ``ends=0,1,28,29`` (no name: the spec)."""
    name, _, spec = text.rpartition("=")
    layers: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        layers += list(range(int(lo), int(hi or lo) + 1))
    return name or spec, layers


def run(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd bench draft``: every ``--candidate`` against the configured target."""
    prompts = [p.messages for p in read_prompts(args.prompts, limit=args.limit)]
    pair = load_pair(settings)
    candidates = dict(parse_candidate(c) for c in args.candidate)
    try:
        heads = [int(n) for n in str(args.head_tokens).split(",")]
    except ValueError:
        raise SystemExit(f"--head-tokens: not a list of integers: {args.head_tokens!r}") from None
    if any(n < 0 for n in heads):
        raise SystemExit("--head-tokens: sizes must be >= 0")
    result = bench_draft(pair.target, pair.tokenizer, prompts, candidates, args.max_tokens, heads)
    print_table(
        result,
        [
            "layers",
            "head_tokens",
            "heldout_agreement",
            "head_coverage",
            "traffic_coverage",
            "step_ms",
            "cost_ratio",
        ],
    )
    write_json(args.json, result)
    return 0
