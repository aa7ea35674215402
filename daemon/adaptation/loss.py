"""The training loss: cross-entropy on the output tokens, with the rejected positions weighted
up and an optional distillation term from the target's stored top-k.

``loss = ce + disagreement_weight * ce_on_rejected + kd_weight * kd`` (`compute_loss`), each CE
term divided by the number of target positions (at least 1: a batch without targets is 0, never
0/0, guard 1 in `daemon.adaptation`). A draft with a pruned head (`daemon.core.heads`) is
trained over its subset: targets outside it are not counted. ``kd`` (`kd_loss`) is the forward
KL from the target's stored top-k to the draft, both renormalised over those ids, masked with
the finite `NEG` (guard 2). Logits are upcast to float32 first: a log-softmax over a 49k
vocabulary in float16 overflows (guard 3).
"""

from __future__ import annotations

from typing import cast

import mlx.core as mx
import mlx.nn as nn

from daemon.adaptation.data import IGNORE, NEG
from daemon.core.heads import PLAIN_HEAD_MODULES, output_head, pruned_head

__all__ = ["IGNORE", "NEG", "compute_loss", "kd_loss", "model_logits"]


def kd_loss(
    logits: mx.array,
    kd_index: mx.array,
    kd_ids: mx.array,
    kd_logprobs: mx.array,
    kd_mask: mx.array,
) -> mx.array:
    """Mean forward KL(p_target || q_draft) over the rows that have stored top-k entries.

    Both sides are renormalised over the stored top-k ids: ``p`` from the target's stored
    log-probs, ``q`` from the draft's logits at those ids. Masked entries use a finite
    ``-1e9`` so nothing is ever ``0 * inf``. Zero rows give 0, never 0/0.
    """
    bsz, tlen, vocab = logits.shape
    flat = logits.reshape(bsz * tlen, vocab)
    rows = flat[(mx.arange(bsz)[:, None] * tlen + kd_index).reshape(-1)]
    rows = rows.reshape(bsz, kd_index.shape[1], vocab)  # (B, R, V)
    q_logits = mx.take_along_axis(rows, kd_ids, axis=-1)  # (B, R, K)
    valid = kd_mask > 0
    p_logits = mx.where(valid, kd_logprobs, NEG)
    q_logits = mx.where(valid, q_logits, NEG)
    logp = p_logits - mx.logsumexp(p_logits, axis=-1, keepdims=True)
    logq = q_logits - mx.logsumexp(q_logits, axis=-1, keepdims=True)
    p = mx.exp(logp) * kd_mask
    kl = (p * (logp - logq)).sum(axis=-1)  # (B, R)
    row_valid = kd_mask.max(axis=-1)
    return (kl * row_valid).sum() / mx.maximum(row_valid.sum(), 1.0)


def model_logits(model: nn.Module, inputs: mx.array, start: int = 0) -> mx.array:
    """``model(inputs)[:, start:]``, computing the output head (a vocabulary-sized matmul, most
    of a small draft's compute) only from ``start`` where the architecture allows
    (`PLAIN_HEAD_MODULES`). A draft with a pruned head gets logits over its subset only
    (``(..., N)``; `PrunedHead.index` maps token ids to their columns)."""
    inner: nn.Module | None = getattr(model, "model", None)
    head = pruned_head(model)
    if head is not None and inner is not None:
        return head.subset_logits(inner(inputs)[:, start:])
    if start > 0 and type(model).__module__ in PLAIN_HEAD_MODULES and inner is not None:
        return cast(mx.array, output_head(model)(inner(inputs)[:, start:]))
    return model(inputs)[:, start:] if start > 0 else model(inputs)


def compute_loss(
    model: nn.Module,
    inputs: mx.array,
    labels: mx.array,
    rejected: mx.array,
    kd_index: mx.array,
    kd_ids: mx.array,
    kd_logprobs: mx.array,
    kd_mask: mx.array,
    *,
    start: int = 0,
    kd_weight: float = 0.0,
    disagreement_weight: float = 0.0,
    vocab_limit: int | None = None,
) -> tuple[mx.array, tuple[mx.array, mx.array, mx.array]]:
    """``(loss, (ce, kd, num_targets))`` of a batch; ``model`` first, for `nn.value_and_grad`.

    ``ce`` is the cross-entropy over valid label positions divided by their count (at least 1);
    ``loss`` weights the rejected positions' CE by ``1 + disagreement_weight`` (same divisor)
    and adds ``kd_weight * kd`` (`kd_loss`). Logits are upcast to float32 first. Labels before
    ``start`` must all be ``IGNORE`` (`Batch.start`); their logits are not computed.
    """
    start = max(0, min(int(start), inputs.shape[1] - 1))
    logits = model_logits(model, inputs, start).astype(mx.float32)
    labels, rejected = labels[:, start:], rejected[:, start:]
    head = pruned_head(model)
    if head is not None:
        # the loss over the head's subset: labels (and KD ids) become subset columns; a label
        # outside the subset is a token this draft can never propose, so it is no target
        sub = head.index[mx.where(labels == IGNORE, 0, labels)]
        labels = mx.where((labels == IGNORE) | (sub < 0), IGNORE, sub)
        kd_sub = head.index[kd_ids]
        kd_mask = mx.where(kd_sub < 0, 0, kd_mask)
        kd_ids = mx.maximum(kd_sub, 0)
    elif vocab_limit is not None and logits.shape[-1] > vocab_limit:
        logits = logits[..., :vocab_limit]
    valid = labels != IGNORE
    count = valid.sum()
    denom = mx.maximum(count, 1).astype(mx.float32)
    safe = mx.where(valid, labels, 0)
    picked = mx.take_along_axis(logits, safe[..., None], axis=-1).squeeze(-1)
    token_ce = mx.where(valid, mx.logsumexp(logits, axis=-1) - picked, 0.0)
    ce = token_ce.sum() / denom
    loss = ce
    if disagreement_weight:
        loss = loss + disagreement_weight * (token_ce * rejected).sum() / denom
    if kd_weight:
        kd = kd_loss(logits, mx.maximum(kd_index - start, 0), kd_ids, kd_logprobs, kd_mask)
        loss = loss + kd_weight * kd
    else:
        kd = mx.array(0.0)
    return loss, (ce, kd, count)
