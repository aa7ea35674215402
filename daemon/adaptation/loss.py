"""The training loss: a per-position term on the output tokens (``training.loss``), with the
rejected positions weighted up and an optional distillation term from the target's stored top-k.

``loss = term + disagreement_weight * term_on_rejected + kd_weight * kd`` (`compute_loss`), the
position terms divided by the number of target positions (at least 1: a batch without targets
is 0, never 0/0, guard 1 in `daemon.adaptation`). ``term`` is the cross-entropy with the
target's output token (``ce``) or a divergence from the target's *full* distribution at that
position (`divergence`: ``fkl``, ``tvd``, ``jsd``, ``acceptance``), which the training process
recomputes with the target (`teacher_logprobs`). A draft with a pruned head
(`daemon.core.heads`) is trained over its subset: CE targets outside it are not counted, and
the target's distribution is taken at its columns. ``kd`` (`kd_loss`) is the forward
KL from the target's stored top-k to the draft, both renormalised over those ids, masked with
the finite `NEG` (guard 2). Logits are upcast to float32 first: a log-softmax over a 49k
vocabulary in float16 overflows (guard 3).

A feature draft (`daemon.core.feature_draft`) reads the target's hidden states: its logits come
from them teacher forced (computed here, or given as ``features`` by a trainer that keeps
them), and ``regression_weight`` adds EAGLE's regression term, the smooth-L1 distance of its
output features from the target's at the same output positions; ``second_step_weight`` its
second token's CE (`second_step_ce`), ``prompt_weight`` a CE at the prompt's positions against
the target's own greedy choice there (`prompt_ce`); ``feature_noise`` perturbs what it reads.
"""

from __future__ import annotations

import math
from typing import cast

import mlx.core as mx
import mlx.nn as nn

from daemon.adaptation.data import IGNORE, NEG
from daemon.config import TRAINING_LOSSES
from daemon.core.feature_draft import FeatureDraft
from daemon.core.heads import PLAIN_HEAD_MODULES, output_head, pruned_head

__all__ = [
    "IGNORE",
    "LOSSES",
    "NEG",
    "compute_loss",
    "divergence",
    "kd_loss",
    "model_logits",
    "teacher_logprobs",
]

LOSSES = TRAINING_LOSSES
# acceptance below this is clamped in -log(acceptance): a draft with no overlap at a position
# still gets a finite loss and gradient
MIN_ACCEPTANCE = 1e-6


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
    if isinstance(model, FeatureDraft):
        return _feature_logits(model, model.hidden(inputs)[:, start:])
    inner: nn.Module | None = getattr(model, "model", None)
    head = pruned_head(model)
    if head is not None and inner is not None:
        return head.subset_logits(inner(inputs)[:, start:])
    if start > 0 and type(model).__module__ in PLAIN_HEAD_MODULES and inner is not None:
        return cast(mx.array, output_head(model)(inner(inputs)[:, start:]))
    return model(inputs)[:, start:] if start > 0 else model(inputs)


def _feature_logits(model: FeatureDraft, hidden: mx.array) -> mx.array:
    head = pruned_head(model)
    return head.subset_logits(hidden) if head is not None else model.head(hidden)


def second_step_ce(
    model: FeatureDraft, out: mx.array, inputs: mx.array, labels: mx.array
) -> mx.array:
    """Cross-entropy of a round's second draft token (HASS): entry ``j + 1`` reads the draft's
    own output feature of entry ``j`` instead of the target's, as in service. Every earlier
    entry reads its own output too (HASS's harmonized context), not the target's."""
    out2 = model.forward(out[:, 1:-1], inputs[:, 2:])  # stands for entries 2 .. T - 1
    return _mean_ce(model, out2, labels[:, 2:])


def target_greedy(model: FeatureDraft, top: mx.array, vocab_limit: int | None = None) -> mx.array:
    """The token the target would put next at each position: the argmax of its logits from
    its final features ``top`` (within ``vocab_limit``)."""
    target_logits = output_head(model.target)(top).astype(mx.float32)
    if vocab_limit is not None and target_logits.shape[-1] > vocab_limit:
        target_logits = target_logits[..., :vocab_limit]
    return mx.stop_gradient(mx.argmax(target_logits, axis=-1))


def prompt_ce(
    model: FeatureDraft,
    out: mx.array,
    top: mx.array,
    labels: mx.array,
    vocab_limit: int | None = None,
    greedy: mx.array | None = None,
) -> mx.array:
    """Cross-entropy at the prompt's positions, each labelled with the token the target itself
    would put next there (`target_greedy` of its final features ``top``): the function a
    lossless draft learns, on the prompts' positions as well as the answers'. ``greedy``:
    those labels when already computed (the trainer keeps them across epochs: the target's
    whole-vocabulary head over the prompt is a large part of a step)."""
    valid = labels != IGNORE
    # positions before each row's first output label (padding comes after it); entry 0 has none
    before = mx.cumsum(valid.astype(mx.int32), axis=1) == 0
    prompt = before & (mx.arange(labels.shape[1])[None] >= 1)
    width = cast(int, mx.max(mx.sum(before.astype(mx.int32), axis=1)).item())
    if width < 2:
        return mx.array(0.0)
    if greedy is None:
        greedy = target_greedy(model, top[:, :width], vocab_limit)
    greedy = greedy[:, :width].astype(labels.dtype)
    return _mean_ce(model, out[:, :width], mx.where(prompt[:, :width], greedy, IGNORE))


def _mean_ce(model: FeatureDraft, hidden: mx.array, labels: mx.array) -> mx.array:
    """Mean cross-entropy of the draft's logits from output features ``hidden`` against
    ``labels`` (token ids; over a pruned head's subset, a label outside it no target)."""
    logits = _feature_logits(model, hidden).astype(mx.float32)
    head = pruned_head(model)
    if head is not None:  # subset columns; a label outside the subset is no target
        sub = head.index[mx.where(labels == IGNORE, 0, labels)]
        labels = mx.where((labels == IGNORE) | (sub < 0), IGNORE, sub)
    valid = labels != IGNORE
    picked = mx.take_along_axis(logits, mx.where(valid, labels, 0)[..., None], axis=-1)
    token_ce = mx.where(valid, mx.logsumexp(logits, axis=-1) - picked.squeeze(-1), 0.0)
    return token_ce.sum() / mx.maximum(valid.sum(), 1).astype(mx.float32)


def teacher_logprobs(
    target: nn.Module,
    inputs: mx.array,
    start: int,
    columns: mx.array | None = None,
    vocab_limit: int | None = None,
) -> mx.array:
    """The target's log-probabilities at every position from ``start``: ``(B, T - start, V)``,
    normalised over the vocabulary shared with the draft (``vocab_limit``) and then restricted
    to ``columns`` (a pruned draft head's token ids), not renormalised: the probability mass
    outside the draft's subset is mass the draft can never be accepted on."""
    logits = model_logits(target, inputs, start).astype(mx.float32)
    if vocab_limit is not None and logits.shape[-1] > vocab_limit:
        logits = logits[..., :vocab_limit]
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if columns is not None:
        logp = mx.take(logp, columns, axis=-1)
    return mx.stop_gradient(logp)


def divergence(kind: str, logits: mx.array, target_logp: mx.array) -> mx.array:
    """Per-position divergence ``(B, T)`` of the draft's ``logits`` from the target's
    ``target_logp`` (`teacher_logprobs`, same columns).

    ``fkl`` is KL(p || q) and ``jsd`` the Jensen-Shannon divergence, with p renormalised over
    the draft's columns; ``tvd`` is the total variation and ``acceptance`` is
    -log sum_v min(p_v, q_v), the log of the probability that speculative sampling accepts the
    draft's token (1 - tvd is that probability), with p the target's full-vocabulary
    probabilities on the columns.
    """
    logq = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    q = mx.exp(logq)
    p = mx.exp(target_logp)
    if kind in ("fkl", "jsd"):
        logp = target_logp - mx.logsumexp(target_logp, axis=-1, keepdims=True)
        pn = mx.exp(logp)
        if kind == "fkl":
            return (pn * (logp - logq)).sum(axis=-1)
        logm = mx.logaddexp(logp, logq) - math.log(2.0)
        return 0.5 * ((pn * (logp - logm)).sum(axis=-1) + (q * (logq - logm)).sum(axis=-1))
    if kind == "tvd":
        # the mass of p outside the columns adds a constant (1 - sum p) / 2: left out
        return 0.5 * mx.abs(p - q).sum(axis=-1)
    if kind == "acceptance":
        return -mx.log(mx.maximum(mx.minimum(p, q).sum(axis=-1), MIN_ACCEPTANCE))
    raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(LOSSES[1:])}")


def _feature_terms(
    model: FeatureDraft,
    inputs: mx.array,
    labels: mx.array,
    features: mx.array | None,
    start: int,
    vocab_limit: int | None,
    noise: float,
    *,
    regression_weight: float,
    second_step_weight: float,
    prompt_weight: float,
    prompt_labels: mx.array | None,
) -> tuple[mx.array, list[mx.array]]:
    """A feature draft's logits from ``start`` on (float32) and its weighted extra terms, in
    the order the loss adds them: the regression to the target's features (smooth L1, over
    output positions), `second_step_ce`, `prompt_ce`; a term weighted 0 is not computed."""
    out, target_features = model.teacher_forced(inputs, features, noise)
    logits = _feature_logits(model, out[:, start:]).astype(mx.float32)
    extra = []
    if regression_weight:
        outputs = labels[:, start:] != IGNORE
        diff = out[:, start:] - target_features[:, start:]
        l1 = nn.losses.smooth_l1_loss(diff, mx.zeros_like(diff), reduction="none")
        per_position = l1.astype(mx.float32).mean(axis=-1)
        extra.append(
            regression_weight
            * mx.where(outputs, per_position, 0.0).sum()
            / (mx.maximum(outputs.sum(), 1).astype(mx.float32))
        )
    if second_step_weight and inputs.shape[1] > 2:
        extra.append(second_step_weight * second_step_ce(model, out, inputs, labels))
    if prompt_weight:
        prompt = prompt_ce(model, out, target_features, labels, vocab_limit, greedy=prompt_labels)
        extra.append(prompt_weight * prompt)
    return logits, extra


def _head_columns(
    index: mx.array, labels: mx.array, kd_ids: mx.array, kd_mask: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    """Labels and KD ids as columns of a pruned head's subset: a label outside the subset is
    a token this draft can never propose, so it is no target (and no KD term)."""
    sub = index[mx.where(labels == IGNORE, 0, labels)]
    labels = mx.where((labels == IGNORE) | (sub < 0), IGNORE, sub)
    kd_sub = index[kd_ids]
    return labels, mx.maximum(kd_sub, 0), mx.where(kd_sub < 0, 0, kd_mask)


def compute_loss(
    model: nn.Module,
    inputs: mx.array,
    labels: mx.array,
    rejected: mx.array,
    kd_index: mx.array,
    kd_ids: mx.array,
    kd_logprobs: mx.array,
    kd_mask: mx.array,
    target_logp: mx.array | None = None,
    *,
    start: int = 0,
    kd_weight: float = 0.0,
    disagreement_weight: float = 0.0,
    vocab_limit: int | None = None,
    loss: str = "ce",
    features: mx.array | None = None,
    regression_weight: float = 0.0,
    second_step_weight: float = 0.0,
    feature_noise: float = 0.0,
    prompt_weight: float = 0.0,
    prompt_labels: mx.array | None = None,
) -> tuple[mx.array, tuple[mx.array, mx.array, mx.array]]:
    """``(loss, (ce, kd, num_targets))`` of a batch; ``model`` first, for `nn.value_and_grad`.

    ``ce`` is the cross-entropy over valid label positions divided by their count (at least 1).
    The loss's position term is that CE (``loss="ce"``) or the `divergence` from
    ``target_logp`` (`teacher_logprobs` of the same inputs and ``start``); it weights the
    rejected positions by ``1 + disagreement_weight`` (same divisor) and adds
    ``kd_weight * kd`` (`kd_loss`). Logits are upcast to float32 first. Labels before ``start``
    must all be ``IGNORE`` (`Batch.start`); their logits are not computed.
    """
    start = max(0, min(int(start), inputs.shape[1] - 1))
    extra: list[mx.array] = []
    if isinstance(model, FeatureDraft):
        logits, extra = _feature_terms(
            model,
            inputs,
            labels,
            features,
            start,
            vocab_limit,
            feature_noise,
            regression_weight=regression_weight,
            second_step_weight=second_step_weight,
            prompt_weight=prompt_weight,
            prompt_labels=prompt_labels,
        )
    else:
        logits = model_logits(model, inputs, start).astype(mx.float32)
    labels, rejected = labels[:, start:], rejected[:, start:]
    # output positions, before a pruned head drops the labels it cannot propose: the target's
    # distribution is defined at every one of them
    outputs = labels != IGNORE
    head = pruned_head(model)
    if head is not None:
        labels, kd_ids, kd_mask = _head_columns(head.index, labels, kd_ids, kd_mask)
    elif vocab_limit is not None and logits.shape[-1] > vocab_limit:
        logits = logits[..., :vocab_limit]
    valid = labels != IGNORE
    count = valid.sum()
    denom = mx.maximum(count, 1).astype(mx.float32)
    safe = mx.where(valid, labels, 0)
    picked = mx.take_along_axis(logits, safe[..., None], axis=-1).squeeze(-1)
    token_ce = mx.where(valid, mx.logsumexp(logits, axis=-1) - picked, 0.0)
    ce = token_ce.sum() / denom
    if loss == "ce":
        term, denom_term = token_ce, denom
    else:
        if target_logp is None:
            raise ValueError(f"loss {loss!r} needs the target's log-probabilities")
        term = mx.where(outputs, divergence(loss, logits, target_logp), 0.0)
        denom_term = mx.maximum(outputs.sum(), 1).astype(mx.float32)
    total = term.sum() / denom_term
    for t in extra:
        total = total + t
    if disagreement_weight:
        total = total + disagreement_weight * (term * rejected).sum() / denom_term
    if kd_weight:
        kd = kd_loss(logits, mx.maximum(kd_index - start, 0), kd_ids, kd_logprobs, kd_mask)
        total = total + kd_weight * kd
    else:
        kd = mx.array(0.0)
    return total, (ce, kd, count)
