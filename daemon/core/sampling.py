"""Logit processing shared by the speculative engine (and anything that must agree with it).

Speculative sampling is only lossless if the target distribution ``p`` and the draft
distribution ``q`` are processed exactly the way a plain sampler would process them, so the
processing lives in one place.

Order of operations (the Hugging Face / vLLM convention)::

    logits processors (logit bias, repetition / presence / frequency penalties)
    ->  logits / temperature  ->  log-softmax  ->  top-k  ->  top-p  ->  min-p  (renormalising)

The logits processors are mlx-lm's own (`mlx_lm.sample_utils.make_logits_processors`): each
reads the tokens before its position, so a round applies them row by row with the history of
that row, the earlier draft tokens of the round included (`apply_processors`). Applied so to
the target's rows (``p``) and the draft's (``q``), rejection sampling is exact for the
processed distribution. mlx-lm's own filters (top-p, min-p, top-k) run on the temperature-1
distribution in another order; ours are kept (the lossless tests pin them).

Note: mlx-lm's ``make_sampler`` applies top-p / top-k to the temperature-1 distribution and
the temperature only when sampling; for top-p < 1 the two conventions differ slightly.
Ties at a top-k / top-p threshold are all kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

__all__ = [
    "LogitsProcessor",
    "apply_min_p",
    "apply_processors",
    "apply_top_k",
    "apply_top_p",
    "history_size",
    "log_softmax",
    "logits_processors",
    "process_logits",
    "round_keys",
    "verify_sampled",
]


def log_softmax(x: mx.array) -> mx.array:
    """Log-softmax over the last axis."""
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def apply_top_k(logprobs: mx.array, top_k: int) -> mx.array:
    """Mask (to -inf) everything below the ``top_k``-th largest value of the last axis."""
    if top_k <= 0 or top_k >= logprobs.shape[-1]:
        return logprobs
    threshold = mx.min(mx.topk(logprobs, top_k, axis=-1), axis=-1, keepdims=True)
    return mx.where(logprobs >= threshold, logprobs, -mx.inf)


def apply_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """Nucleus filter on normalised log-probabilities.

    Keeps the smallest set of most likely tokens whose mass reaches ``top_p`` (a token is
    kept when the mass of the tokens strictly more likely than it is below ``top_p``, so the
    most likely token always survives).
    """
    if top_p >= 1.0:
        return logprobs
    sorted_lp = -mx.sort(-logprobs, axis=-1)  # descending
    probs = mx.exp(sorted_lp)
    mass_before = mx.cumsum(probs, axis=-1) - probs
    n_keep = mx.sum(mass_before < top_p, axis=-1, keepdims=True).astype(mx.int32)
    n_keep = mx.maximum(n_keep, 1)
    threshold = mx.take_along_axis(sorted_lp, n_keep - 1, axis=-1)
    return mx.where(logprobs >= threshold, logprobs, -mx.inf)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Mask tokens less likely than ``min_p`` times the most likely one (min-p sampling)."""
    if min_p <= 0.0:
        return logprobs
    floor = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs >= floor, logprobs, -mx.inf)


def process_logits(
    logits: mx.array,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> mx.array:
    """Return the log-probabilities (float32, last axis) that a sampler draws from.

    ``temperature`` must be > 0 (temperature 0 is greedy decoding and handled by argmax).
    The logits processors (`apply_processors`) come before this.
    """
    if temperature <= 0:
        raise ValueError("process_logits needs temperature > 0 (0 means greedy/argmax)")
    x = logits.astype(mx.float32)
    if temperature != 1.0:
        x = x * (1.0 / temperature)
    lp = log_softmax(x)
    if 0 < top_k < lp.shape[-1]:
        lp = log_softmax(apply_top_k(lp, top_k))
    if top_p < 1.0:
        lp = log_softmax(apply_top_p(lp, top_p))
    if min_p > 0.0:
        lp = log_softmax(apply_min_p(lp, min_p))
    return lp


# --------------------------------------------------------------------------------------------
# Logits processors: functions of the tokens before a position


def logits_processors(params: Any) -> list[LogitsProcessor]:
    """mlx-lm's processors for a request's `SamplingParams` (empty: nothing to apply)."""
    return make_logits_processors(
        {int(t): float(b) for t, b in params.logit_bias.items()} or None,
        _repetition(params),
        params.repetition_context_size,
        params.presence_penalty or None,
        params.presence_context_size,
        params.frequency_penalty or None,
        params.frequency_context_size,
    )


def _repetition(params: Any) -> float | None:
    """The repetition penalty, None when off (0, as mlx-lm's server, or the neutral 1)."""
    return None if params.repetition_penalty in (0, 1) else float(params.repetition_penalty)


def history_size(params: Any) -> int:
    """How many tokens before a position the processors read (0: none)."""
    sizes = [
        size
        for penalty, size in (
            (_repetition(params), params.repetition_context_size),
            (params.presence_penalty, params.presence_context_size),
            (params.frequency_penalty, params.frequency_context_size),
        )
        if penalty
    ]
    return max(sizes, default=0)


def apply_processors(
    processors: Sequence[LogitsProcessor],
    history: Sequence[int],
    logits: mx.array,
    drafted: Sequence[mx.array] | mx.array | None = None,
    offset: int = 0,
) -> mx.array:
    """``logits`` with each row processed given the tokens before it, lazily (the draft
    tokens may not be computed yet): row ``j`` follows ``history`` and the first
    ``offset + j`` of the round's ``drafted`` tokens."""
    if not processors:
        return logits
    base = mx.array(list(history), dtype=mx.uint32)
    rows = []
    for j in range(logits.shape[0]):
        n = offset + j
        context = base
        if n and drafted is not None:
            ds = drafted[:n] if isinstance(drafted, mx.array) else mx.stack(list(drafted[:n]))
            context = mx.concatenate([base, ds.astype(mx.uint32).reshape(-1)])
        row = logits[j : j + 1]
        for proc in processors:
            row = proc(context, row)
        rows.append(row)
    return rows[0] if len(rows) == 1 else mx.concatenate(rows, axis=0)


# --------------------------------------------------------------------------------------------
# Speculative sampling (Leviathan et al. 2023; Chen et al. 2023), one round at a time.
# The engine's rounds call these two functions; the tests swap them for deliberately broken
# variants to show that the distribution test catches each rule being wrong.


def round_keys(key: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """Split ``key`` for one round that drafts ``k`` tokens: (the next round's key, k + 2 keys
    for this round: k for the draft's samples, one for the accept test, one for the final
    sample). A key is never used twice, so rounds are independent."""
    keys = mx.random.split(key, k + 3)
    return keys[0], keys[1:]


def verify_sampled(
    lp: mx.array, q_lp: mx.array, drafted: mx.array, accept_key: mx.array, sample_key: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    """Verify ``k`` drafted tokens against the target, lazily (nothing is evaluated here).

    ``lp``: the target's processed log-probs at the k + 1 verified positions; ``q_lp``: the
    draft's at the k drafted positions; ``drafted``: the k draft tokens. Returns ``(accept,
    qx, choice)``: ``accept[i]`` says whether draft token ``i`` passes, with probability
    min(1, p(d)/q(d)); ``qx[i]`` is q(d_i); ``choice[i]`` (i < k) is the token to emit when
    draft ``i`` is the first rejected one, a sample of normalise(max(0, p - q)) (of p where
    that is all zero); ``choice[k]`` is the bonus token after k acceptances, a sample of p.
    Emitted tokens are then distributed exactly as the target's own samples.
    """
    k = drafted.shape[0]
    p = mx.exp(lp[:k])
    q = mx.exp(q_lp)
    idx = drafted[:, None]
    px = mx.take_along_axis(p, idx, axis=-1)[:, 0]
    qx = mx.take_along_axis(q, idx, axis=-1)[:, 0]
    u = mx.random.uniform(shape=(k,), key=accept_key)
    accept = u * qx < px  # P(accept) = min(1, p/q)
    residual = mx.maximum(p - q, 0.0)
    res_lp = mx.where(mx.sum(residual, axis=-1, keepdims=True) > 0, mx.log(residual), lp[:k])
    candidates = mx.concatenate([res_lp, lp[k:]], axis=0)
    return accept, qx, mx.random.categorical(candidates, key=sample_key)
