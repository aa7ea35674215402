"""Training examples from buffer records, and the padded micro-batches the trainer runs.

What goes in
------------
Prompts keep their last ``data.max_prompt_length`` tokens, outputs their first
``data.max_output_length`` (`daemon.core.evaluation.truncate_example`); an example left without
a prompt token or a target token is skipped and counted (`make_examples`). Which records a run
uses is `daemon.adaptation.inputs`'s business.

Labels: ``tokens = prompt + output``, ``inputs = tokens[:-1]``, ``labels = tokens[1:]`` with the
first ``len(prompt) - 1`` labels set to `IGNORE`: label ``i`` is the token that follows input
``i``, the last prompt position predicts ``output[0]`` and no loss falls on the prompt. A
rejection at output position ``j`` is label index ``len(prompt) - 1 + j``.

The target's stored top-k log-probabilities at a rejection are sanitised here: entries that
underflowed to ``-inf`` (or NaN) are dropped, and padding in a `Batch` is masked with the finite
`NEG`, never ``-inf`` (guard 2 in `daemon.adaptation`). `IGNORE` and `NEG` live here, with the
padding; the loss masks with the same values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from daemon.config import DataSettings
from daemon.core.evaluation import truncate_example
from daemon.logging import get_logger

log = get_logger("training")

IGNORE = -100  # label of a position without a target (the prompt, padding)
NEG = -1e9  # finite "minus infinity" for masking (0 * -inf is NaN, 0 * -1e9 is 0)


@dataclass
class Example:
    """One teacher-forced example: ``inputs``/``labels`` aligned, ``IGNORE`` on the prompt.

    ``rejected`` are label indices where the draft was rejected; ``kd_index[r]`` is the label
    index of the stored top-k ``kd_ids[r]``/``kd_logprobs[r]`` (the target's distribution for
    that label).
    """

    inputs: list[int]
    labels: list[int]
    rejected: list[int] = field(default_factory=list)
    kd_index: list[int] = field(default_factory=list)
    kd_ids: list[list[int]] = field(default_factory=list)
    kd_logprobs: list[list[float]] = field(default_factory=list)
    record_id: int | None = None
    source: str = "failure"

    @property
    def num_targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)

    @property
    def first_target(self) -> int:
        """Index of the first label with a target (``len(labels)`` if none)."""
        return next((i for i, t in enumerate(self.labels) if t != IGNORE), len(self.labels))


def build_example(
    prompt_tokens: Sequence[int],
    output_tokens: Sequence[int],
    rejections: Iterable[Any] = (),
    *,
    max_prompt: int,
    max_output: int,
    record_id: int | None = None,
    source: str = "failure",
) -> Example | None:
    """The example of one record, or None when truncation leaves no prompt or no target token.

    ``rejections`` are `daemon.core.records.Rejection`-like objects; those truncated away, whose
    ``target_token`` is not the output token at their position, or whose top-k has no finite
    entry are left out (of the KD term; the position still counts as rejected when it is in
    range and consistent).
    """
    prompt, output = truncate_example(prompt_tokens, output_tokens, max_prompt, max_output)
    if not prompt or not output:
        return None
    tokens = [int(t) for t in prompt + output]
    inputs = tokens[:-1]
    labels = tokens[1:]
    start = len(prompt) - 1
    labels[:start] = [IGNORE] * start
    ex = Example(inputs=inputs, labels=labels, record_id=record_id, source=source)
    seen: set[int] = set()
    for r in rejections:
        pos = int(r.position)
        if not 0 <= pos < len(output) or pos in seen or int(r.target_token) != output[pos]:
            continue
        seen.add(pos)
        index = start + pos
        ex.rejected.append(index)
        ids: list[int] = []
        lps: list[float] = []
        for i, lp in zip(r.top_ids or (), r.top_logprobs or (), strict=False):
            lp = float(lp)
            if math.isfinite(lp) and int(i) >= 0:
                ids.append(int(i))
                lps.append(lp)
        if ids:
            ex.kd_index.append(index)
            ex.kd_ids.append(ids)
            ex.kd_logprobs.append(lps)
    return ex


def make_examples(
    records: Iterable[Any], data: DataSettings, source: str
) -> tuple[list[Example], int]:
    """Examples of buffer records and how many were skipped as empty (with a warning)."""
    out: list[Example] = []
    skipped = 0
    for rec in records:
        ex = build_example(
            rec.prompt_tokens,
            rec.output_tokens,
            rec.rejections,
            max_prompt=data.max_prompt_length,
            max_output=data.max_output_length,
            record_id=rec.id,
            source=source,
        )
        if ex is None:
            skipped += 1
            log.warning(
                "train_example_skipped",
                record_id=rec.id,
                reason="no prompt or no target tokens after truncation",
                prompt_tokens=len(rec.prompt_tokens),
                output_tokens=len(rec.output_tokens),
            )
        else:
            out.append(ex)
    return out, skipped


def mark_disagreements(
    model: Any, examples: Sequence[Example], vocab_limit: int | None = None
) -> int:
    """Add to each example's ``rejected`` the label positions where ``model``'s greedy choice,
    teacher forced, is not the label: where this draft, as training starts, would be rejected.

    The recorded rejections come from whatever drafted when the request was served (an older
    adapter, or lookup with the model draft not run at all); these are on-policy for the draft
    being trained. Returns how many positions were added."""
    added = 0
    for ex in examples:
        start = ex.first_target
        if start >= len(ex.labels):
            continue
        logits = model(mx.array(ex.inputs)[None])[0, start:]
        if vocab_limit is not None:
            logits = logits[:, :vocab_limit]
        guess = np.array(mx.argmax(logits, axis=-1))
        labels = np.array(ex.labels[start:])
        have = set(ex.rejected)
        for i in np.nonzero((labels != IGNORE) & (guess != labels))[0]:
            if start + int(i) not in have:
                ex.rejected.append(start + int(i))
                added += 1
    return added


@dataclass
class Batch:
    """Padded arrays of a micro-batch (pad labels are ``IGNORE``, pad KD entries masked)."""

    inputs: mx.array  # (B, T) int32
    labels: mx.array  # (B, T) int32
    rejected: mx.array  # (B, T) float32, 1 where the draft was rejected
    kd_index: mx.array  # (B, R) int32 label index
    kd_ids: mx.array  # (B, R, K) int32
    kd_logprobs: mx.array  # (B, R, K) float32
    kd_mask: mx.array  # (B, R, K) float32, 1 for a real entry
    num_targets: int
    num_tokens: int
    start: int = 0  # first label index with a target in any row: logits before it are unused

    def arrays(self) -> tuple[mx.array, ...]:
        return (
            self.inputs,
            self.labels,
            self.rejected,
            self.kd_index,
            self.kd_ids,
            self.kd_logprobs,
            self.kd_mask,
        )


def collate(examples: Sequence[Example], vocab_limit: int | None = None) -> Batch:
    """Pad ``examples`` into one `Batch`; KD ids at or beyond ``vocab_limit`` are masked."""
    b = len(examples)
    t = max(len(e.inputs) for e in examples)
    r = max(1, max(len(e.kd_index) for e in examples))
    k = max([1] + [len(ids) for e in examples for ids in e.kd_ids])
    inputs = np.zeros((b, t), np.int32)
    labels = np.full((b, t), IGNORE, np.int32)
    rejected = np.zeros((b, t), np.float32)
    kd_index = np.zeros((b, r), np.int32)
    kd_ids = np.zeros((b, r, k), np.int32)
    kd_logprobs = np.full((b, r, k), NEG, np.float32)
    kd_mask = np.zeros((b, r, k), np.float32)
    for i, e in enumerate(examples):
        n = len(e.inputs)
        inputs[i, :n] = e.inputs
        labels[i, :n] = e.labels
        rejected[i, e.rejected] = 1.0
        for j, (index, ids, lps) in enumerate(
            zip(e.kd_index, e.kd_ids, e.kd_logprobs, strict=True)
        ):
            kd_index[i, j] = index
            for m, (tok, lp) in enumerate(zip(ids, lps, strict=True)):
                if vocab_limit is None or tok < vocab_limit:
                    kd_ids[i, j, m] = tok
                    kd_logprobs[i, j, m] = lp
                    kd_mask[i, j, m] = 1.0
    return Batch(
        inputs=mx.array(inputs),
        labels=mx.array(labels),
        rejected=mx.array(rejected),
        kd_index=mx.array(kd_index),
        kd_ids=mx.array(kd_ids),
        kd_logprobs=mx.array(kd_logprobs),
        kd_mask=mx.array(kd_mask),
        num_targets=sum(e.num_targets for e in examples),
        num_tokens=sum(len(e.inputs) for e in examples),
        start=min(e.first_target for e in examples),
    )
