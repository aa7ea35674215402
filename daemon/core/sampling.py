"""Logit processing shared by the speculative engine (and anything that must agree with it).

Speculative sampling is only lossless if the target distribution ``p`` and the draft
distribution ``q`` are processed exactly the way a plain sampler would process them, so the
processing lives in one place.

Order of operations (the Hugging Face / vLLM convention)::

    logits / temperature  ->  log-softmax  ->  top-k  ->  renormalise  ->  top-p  ->  renormalise

Note: mlx-lm's ``make_sampler`` applies top-p / top-k to the temperature-1 distribution and
the temperature only when sampling; for top-p < 1 the two conventions differ slightly.
Ties at a top-k / top-p threshold are all kept.
"""

from __future__ import annotations

import mlx.core as mx

__all__ = [
    "apply_top_k",
    "apply_top_p",
    "log_softmax",
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


def process_logits(
    logits: mx.array, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> mx.array:
    """Return the log-probabilities (float32, last axis) that a sampler draws from.

    ``temperature`` must be > 0 (temperature 0 is greedy decoding and handled by argmax).
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
    return lp


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
