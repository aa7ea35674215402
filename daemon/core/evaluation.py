"""Held-out agreement: how often the draft's greedy choice equals the token the target produced.

Teacher forced: one forward pass of the draft over ``prompt + output[:-1]`` per row, no
generation. This is what ``specd train`` prints, what the adaptation gate compares and what the
benchmarks report as ``heldout_agreement``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import mlx.core as mx
import mlx.nn as nn


@dataclass
class Agreement:
    """Matches over scored positions, summed over rows."""

    matches: int = 0
    total: int = 0
    rows: int = 0

    @property
    def rate(self) -> float:
        return self.matches / self.total if self.total else 0.0

    def __add__(self, other: Agreement) -> Agreement:
        return Agreement(
            self.matches + other.matches, self.total + other.total, self.rows + other.rows
        )

    def to_dict(self) -> dict[str, float | int]:
        return {
            "agreement": self.rate,
            "matches": self.matches,
            "positions": self.total,
            "rows": self.rows,
        }


def truncate_example(
    prompt: Sequence[int], output: Sequence[int], max_prompt: int, max_output: int
) -> tuple[list[int], list[int]]:
    """Keep the prompt's last tokens and the output's first: the ones next to each other."""
    return list(prompt[-max_prompt:]) if max_prompt > 0 else [], list(output[:max_output])


def teacher_forced_agreement(
    model: nn.Module,
    rows: Iterable[tuple[Sequence[int], Sequence[int]]],
    *,
    max_prompt: int = 512,
    max_output: int = 256,
    vocab_limit: int | None = None,
    by_row: list[list[bool]] | None = None,
) -> Agreement:
    """Agreement of ``model``'s argmax with each row's output tokens.

    ``rows`` holds (prompt tokens, target output tokens). ``vocab_limit`` slices the logits to
    the vocabulary shared with the target (padded embedding tables may differ). ``by_row``
    receives each scored row's match per position (`daemon.core.speed` walks them).
    """
    result = Agreement()
    for prompt, output in rows:
        prompt, output = truncate_example(prompt, output, max_prompt, max_output)
        if not prompt or not output:
            continue
        tokens = mx.array(prompt + output[:-1])[None]
        logits = model(tokens)[0, len(prompt) - 1 :]
        if vocab_limit is not None:
            logits = logits[:, :vocab_limit]
        hits = mx.argmax(logits, axis=-1) == mx.array(output)
        matches = cast(int, hits.sum().item())
        if by_row is not None:
            by_row.append(cast(list[bool], hits.tolist()))
        result.matches += int(matches)
        result.total += len(output)
        result.rows += 1
    return result


@dataclass
class Acceptance:
    """Expected speculative-sampling acceptance summed over scored positions."""

    accepted: float = 0.0
    total: int = 0
    rows: int = 0

    @property
    def rate(self) -> float:
        return self.accepted / self.total if self.total else 0.0


def teacher_forced_acceptance(
    target: nn.Module,
    draft: nn.Module,
    rows: Iterable[tuple[Sequence[int], Sequence[int]]],
    temperature: float,
    *,
    max_prompt: int = 512,
    max_output: int = 256,
    vocab_limit: int | None = None,
) -> Acceptance:
    """The probability that speculative sampling at ``temperature`` accepts the draft's first
    token at each output position, ``sum_v min(p_v, q_v)`` with both distributions at that
    temperature, averaged over the rows' positions (teacher forced on the rows' outputs).
    At temperature 0 it is greedy agreement of the two argmaxes. A draft with a pruned head
    has probability 0 outside its subset, as in service."""
    result = Acceptance()
    for prompt, output in rows:
        prompt, output = truncate_example(prompt, output, max_prompt, max_output)
        if not prompt or not output:
            continue
        tokens = mx.array(prompt + output[:-1])[None]
        start = len(prompt) - 1
        p_logits = target(tokens)[0, start:].astype(mx.float32)
        q_logits = draft(tokens)[0, start:].astype(mx.float32)
        width = min(p_logits.shape[-1], q_logits.shape[-1], vocab_limit or p_logits.shape[-1])
        p_logits, q_logits = p_logits[:, :width], q_logits[:, :width]
        if temperature <= 0:
            hits = mx.argmax(p_logits, axis=-1) == mx.argmax(q_logits, axis=-1)
            accepted = hits.astype(mx.float32).sum()
        else:
            p = mx.softmax(p_logits / temperature, axis=-1)
            q = mx.softmax(q_logits / temperature, axis=-1)
            accepted = mx.minimum(p, q).sum()
        result.accepted += cast(float, accepted.item())
        result.total += len(output)
        result.rows += 1
    return result


@dataclass
class ChainAgreement:
    """The first two draft tokens of a round, teacher forced up to the round's start: how
    often the first is right, and how often both are (the second drafted from the draft's own
    state, as in service)."""

    first: int = 0
    both: int = 0
    total: int = 0  # positions with a second token to score

    def to_dict(self) -> dict[str, float | int]:
        n = max(self.total, 1)
        return {"first": self.first / n, "both": self.both / n, "positions": self.total}


def chain_agreement(
    model: nn.Module,
    rows: Iterable[tuple[Sequence[int], Sequence[int]]],
    *,
    max_prompt: int = 512,
    max_output: int = 256,
    vocab_limit: int | None = None,
) -> ChainAgreement:
    """`ChainAgreement` over the rows' output positions. A token draft's second token reads
    the first, which is the true token whenever the first is right: both are right exactly
    where two teacher-forced matches follow each other. A feature draft's second token also
    reads its own output feature in place of the target's, so it is drafted step by step."""
    from daemon.core.feature_draft import FeatureDraft, chain_matches

    result = ChainAgreement()
    for prompt, output in rows:
        prompt, output = truncate_example(prompt, output, max_prompt, max_output)
        if not prompt or len(output) < 2:
            continue
        if isinstance(model, FeatureDraft):
            pairs = chain_matches(model, prompt, output, vocab_limit)
        else:
            by_row: list[list[bool]] = []
            teacher_forced_agreement(
                model,
                [(prompt, output)],
                max_prompt=max_prompt,
                max_output=max_output,
                vocab_limit=vocab_limit,
                by_row=by_row,
            )
            m = by_row[0]
            pairs = [(m[i], m[i] and m[i + 1]) for i in range(len(m) - 1)]
        result.first += sum(a for a, _ in pairs)
        result.both += sum(b for _, b in pairs)
        result.total += len(pairs)
    return result
