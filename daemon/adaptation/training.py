"""LoRA fine-tuning of the draft on the replay buffer's traffic, kept finite.

The draft learns to agree with the target on the requests the buffer holds: teacher forcing on
``prompt + target_output`` with the prompt masked, an optional extra weight on the positions
where the draft was rejected, and optional distillation from the target's stored top-k
log-probabilities at those positions.

What goes in
------------
Each run uses the train-split failure cases no run has used yet (`ReplayBuffer.pending_failures`)
plus ``training.replay_ratio`` of the run's examples drawn from older train rows
(`ReplayBuffer.sample_replay`), so the draft does not forget. Holdout rows are only ever
evaluated on. Prompts keep their last ``data.max_prompt_length`` tokens, outputs their first
``data.max_output_length`` (`daemon.core.evaluation.truncate_example`); an example left without a
prompt token or a target token is skipped and counted.

Labels: ``tokens = prompt + output``, ``inputs = tokens[:-1]``, ``labels = tokens[1:]`` with the
first ``len(prompt) - 1`` labels set to ``-100``: label ``i`` is the token that follows input
``i``, the last prompt position predicts ``output[0]`` and no loss falls on the prompt. A
rejection at output position ``j`` is label index ``len(prompt) - 1 + j``.

Staying finite
--------------
The training code this project descends from produced NaN losses for five reasons. Each has a
guard here, and a test:

1. **0/0 on a batch without targets** (everything masked): the CE divides by
   ``max(valid positions, 1)``; such a batch is not even run, it is counted
   (``skipped_empty_batches``), and a window of them makes no update.
2. **-inf / NaN in the stored target log-probs** (top-k entries that underflowed): they are
   sanitised when examples are built, the KD term masks with a finite ``-1e9`` (never ``-inf``,
   whose ``0 * inf`` is NaN) and renormalises over the valid entries only.
3. **Half-precision logits**: the loss is always computed from float32 logits (log-softmax of a
   49k vocabulary in float16 overflows).
4. **Exploding updates**: gradients are averaged over the accumulation window, clipped to
   ``training.max_grad_norm`` (`mlx.optimizers.clip_grad_norm`), and the learning rate warms up
   linearly before its cosine decay; Adam runs with bias correction.
5. **One bad micro-batch poisoning the weights**: a non-finite loss or any non-finite gradient
   skips that micro-batch (counted, ``skipped_nonfinite``); the accumulated gradient is averaged
   over the *valid* micro-steps only, and a window with none makes no update. A run that takes
   no update at all, or ends with a non-finite adapter weight, fails and saves nothing.

Running it
----------
`run_training` does one run in-process. The daemon and ``specd train`` run it in a separate
process (`start_training_process` -> ``python -m daemon.adaptation.training ...``, then
`read_result`), so
a crash, NaN storm or out-of-memory cannot take the server down. The child writes a JSON result
file atomically: ``{"status": "ok"|"error", "error", "metrics", "adapter_path"}``.

Adapters are saved in mlx-lm's format (``adapter_config.json`` + ``adapters.safetensors``):
``mlx_lm.load(model_dir, adapter_path=...)`` and ``mlx_lm.tuner.utils.load_adapters(draft,
path)`` apply them.

Training health (JSON log, component ``training``): one ``train_step`` event per optimizer step
(``step``, ``epoch``, ``loss``, ``ce``, ``kd``, ``grad_norm``, ``lr``, ``tokens_per_s``,
``skipped_micro_batches``), ``train_epoch`` per epoch, ``train_run`` per run and
``heldout_eval`` before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from daemon.config import DataSettings, LoraSettings, Settings, TrainingSettings
from daemon.core.backend import maybe_reexec_with_openblas, openblas_env
from daemon.core.evaluation import teacher_forced_agreement, truncate_example
from daemon.durable import atomic_write, atomic_write_json
from daemon.logging import get_logger

log = get_logger("training")

IGNORE = -100
NEG = -1e9  # finite "minus infinity" for masking (0 * -inf is NaN, 0 * -1e9 is 0)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"

__all__ = [
    "Batch",
    "Example",
    "TrainingError",
    "Trainer",
    "bench_train",
    "build_example",
    "generate_traffic",
    "collate",
    "compute_loss",
    "kd_loss",
    "main",
    "make_examples",
    "read_result",
    "run_training",
    "save_adapter",
    "start_training_process",
]


class TrainingError(Exception):
    """A training run cannot be done or did not produce a usable adapter."""


# --------------------------------------------------------------------------------------------
# Examples


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

    ``rejections`` are `daemon.store.buffer.Rejection`-like objects; those truncated away, whose
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
        ids, lps = [], []
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


# --------------------------------------------------------------------------------------------
# Batches and loss


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


# Architectures whose ``Model.__call__`` is exactly ``head(self.model(inputs))`` with the head
# ``lm_head`` or the tied ``embed_tokens.as_linear``: for them the head (a vocabulary-sized
# matmul, most of a small draft's compute) runs only on the positions that carry labels.
_PLAIN_HEAD_MODULES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")


def model_logits(model: nn.Module, inputs: mx.array, start: int = 0) -> mx.array:
    """``model(inputs)[:, start:]``, computing the output head only from ``start`` where the
    architecture allows (`_PLAIN_HEAD_MODULES`)."""
    inner = getattr(model, "model", None)
    if start > 0 and type(model).__module__ in _PLAIN_HEAD_MODULES and inner is not None:
        hidden = inner(inputs)[:, start:]
        if getattr(model.args, "tie_word_embeddings", False):
            return inner.embed_tokens.as_linear(hidden)
        return model.lm_head(hidden)
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
    if vocab_limit is not None and logits.shape[-1] > vocab_limit:
        logits = logits[..., :vocab_limit]
    labels, rejected = labels[:, start:], rejected[:, start:]
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


# --------------------------------------------------------------------------------------------
# LoRA and adapters


def lora_config(lora: LoraSettings) -> dict[str, Any]:
    """mlx-lm's ``lora_parameters`` from the settings."""
    return {
        "rank": lora.rank,
        "scale": lora.scale,
        "dropout": lora.dropout,
        "keys": list(lora.keys) if lora.keys is not None else None,
    }


def _lora_keys(model: nn.Module) -> list[str]:
    """Module keys that carry LoRA, for the saved config: relative to a layer inside the
    blocks, full paths outside them (``model.embed_tokens``), as `linear_to_lora_layers`
    matches them."""
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear

    def is_lora(module: nn.Module) -> bool:
        return isinstance(module, LoRALinear | LoRAEmbedding)

    keys = {name for layer in model.layers for name, m in layer.named_modules() if is_lora(m)}
    in_blocks = {id(m) for layer in model.layers for _, m in layer.named_modules()}
    keys |= {name for name, m in model.named_modules() if is_lora(m) and id(m) not in in_blocks}
    return sorted(keys)


def apply_lora(
    model: nn.Module, lora: LoraSettings, init_adapter: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Freeze ``model`` and add LoRA layers (or those of ``init_adapter``, with its weights).

    Returns the adapter config (mlx-lm format) the saved adapter will carry.
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters

    model.freeze()
    n_layers = len(model.layers)
    if init_adapter is not None:
        path = Path(init_adapter)
        try:
            config = json.loads((path / ADAPTER_CONFIG).read_text())
            load_adapters(model, str(path))
        except (OSError, ValueError, KeyError) as e:
            raise TrainingError(f"cannot load initial adapter {path}: {e}") from e
        params = dict(config["lora_parameters"])
        num_layers = int(config["num_layers"])
        wanted = lora_config(lora)
        if any(params.get(k) != wanted[k] for k in ("rank", "scale")):
            log.warning(
                "init_adapter_config_differs",
                adapter=str(path),
                adapter_lora=params,
                settings_lora=wanted,
                note="training continues with the adapter's LoRA shape",
            )
    else:
        params = lora_config(lora)
        num_layers = n_layers if lora.num_layers < 0 else min(lora.num_layers, n_layers)
        linear_to_lora_layers(model, num_layers, params)
    trainable = tree_flatten(model.trainable_parameters())
    if not trainable:
        raise TrainingError("LoRA found no layers to adapt (check training.lora.keys)")
    params["keys"] = _lora_keys(model)
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    config: dict[str, Any],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save the trainable (LoRA) parameters and ``config`` in mlx-lm's adapter format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    atomic_write(out / ADAPTER_WEIGHTS, lambda p: mx.save_safetensors(str(p), weights))
    atomic_write_json(out / ADAPTER_CONFIG, {**config, **({"specd": metadata} if metadata else {})})
    return out


# --------------------------------------------------------------------------------------------
# Optimisation


def lr_schedule(
    learning_rate: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> Callable[[mx.array], mx.array]:
    """Linear warmup to ``learning_rate`` over ``warmup_steps`` optimizer steps (the first step
    already gets ``lr / warmup``), then cosine decay to ``min_lr_ratio * learning_rate`` at
    ``total_steps``."""
    warmup = max(0, int(warmup_steps))
    decay = max(1, int(total_steps) - warmup)
    floor = learning_rate * min_lr_ratio

    def schedule(step: mx.array) -> mx.array:
        s = mx.array(step, dtype=mx.float32)
        warm = learning_rate * (s + 1) / max(warmup, 1)
        t = mx.clip((s - warmup) / decay, 0.0, 1.0)
        cos = floor + (learning_rate - floor) * 0.5 * (1 + mx.cos(math.pi * t))
        return mx.where(s < warmup, warm, cos)

    return schedule


def _effective_warmup(warmup_steps: int, total_steps: int) -> int:
    """A short run still reaches the full learning rate: warmup is at most half of it."""
    return min(warmup_steps, total_steps // 2)


def _all_finite(loss: mx.array, grads: Any) -> mx.array:
    ok = mx.isfinite(loss).all()
    for _, g in tree_flatten(grads):
        ok = ok & mx.isfinite(g).all()
    return ok


@dataclass
class StepInfo:
    step: int
    loss: float
    ce: float
    kd: float
    grad_norm: float
    lr: float
    micro_steps: int
    tokens: int


@dataclass
class TrainStats:
    micro_batches: int = 0
    skipped_nonfinite: int = 0
    skipped_empty_batches: int = 0
    empty_windows: int = 0
    steps: int = 0
    tokens: int = 0
    target_tokens: int = 0
    train_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)

    @property
    def skipped_micro_batches(self) -> int:
        return self.skipped_nonfinite + self.skipped_empty_batches


class Trainer:
    """Gradient accumulation, clipping, schedule and the finite-ness guards around one model.

    Drive it with `micro_step` (one padded batch) and `update` (end of an accumulation window),
    or with `fit`.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainingSettings,
        total_steps: int,
        *,
        vocab_limit: int | None = None,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.vocab_limit = vocab_limit
        self.total_steps = max(1, int(total_steps))
        self.warmup = _effective_warmup(cfg.warmup_steps, self.total_steps)
        self.schedule = lr_schedule(
            cfg.learning_rate, self.warmup, self.total_steps, cfg.min_lr_ratio
        )
        if cfg.optimizer == "adam":
            self.optimizer: optim.Optimizer = optim.Adam(
                learning_rate=self.schedule, bias_correction=True
            )
        else:
            self.optimizer = optim.AdamW(
                learning_rate=self.schedule,
                weight_decay=cfg.weight_decay,
                bias_correction=True,
            )
        self.value_and_grad = nn.value_and_grad(model, self.loss_fn)
        self.stats = TrainStats()
        self._accum: Any = None
        self._n = 0
        self._loss = self._ce = self._kd = 0.0
        self._tokens = 0

    def loss_fn(self, model: nn.Module, *arrays: mx.array, start: int = 0) -> Any:
        return compute_loss(
            model,
            *arrays,
            start=start,
            kd_weight=self.cfg.kd_weight,
            disagreement_weight=self.cfg.disagreement_weight,
            vocab_limit=self.vocab_limit,
        )

    def micro_step(self, batch: Batch) -> bool:
        """Forward/backward one micro-batch and accumulate it; False if it was skipped."""
        self.stats.micro_batches += 1
        if batch.num_targets == 0:
            self.stats.skipped_empty_batches += 1
            log.debug("train_micro_batch_skipped", reason="no target positions")
            return False
        (loss, (ce, kd, _)), grads = self.value_and_grad(
            self.model, *batch.arrays(), start=batch.start
        )
        ok = _all_finite(loss, grads)
        mx.eval(loss, ce, kd, grads, ok)
        if not ok.item():
            self.stats.skipped_nonfinite += 1
            log.warning(
                "train_micro_batch_skipped",
                reason="non-finite loss or gradient",
                loss=float(loss.item()),
                skipped=self.stats.skipped_nonfinite,
            )
            return False
        self._accum = grads if self._accum is None else tree_map(mx.add, self._accum, grads)
        mx.eval(self._accum)
        self._n += 1
        self._loss += float(loss.item())
        self._ce += float(ce.item())
        self._kd += float(kd.item())
        self._tokens += batch.num_tokens
        self.stats.tokens += batch.num_tokens
        self.stats.target_tokens += batch.num_targets
        return True

    def update(self) -> StepInfo | None:
        """Apply the window's averaged, clipped gradient; None (no update) if nothing is valid."""
        n, accum = self._n, self._accum
        self._accum, self._n = None, 0
        loss, ce, kd, tokens = self._loss, self._ce, self._kd, self._tokens
        self._loss = self._ce = self._kd = 0.0
        self._tokens = 0
        if n == 0 or accum is None:
            self.stats.empty_windows += 1
            return None
        grads = tree_map(lambda g: g / n, accum)
        grads, norm = optim.clip_grad_norm(grads, self.cfg.max_grad_norm)
        lr = self.schedule(self.optimizer.step)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state, norm, lr)
        self.stats.steps += 1
        info = StepInfo(
            step=self.stats.steps,
            loss=loss / n,
            ce=ce / n,
            kd=kd / n,
            grad_norm=float(norm.item()),
            lr=float(lr.item()),
            micro_steps=n,
            tokens=tokens,
        )
        self.stats.losses.append(info.loss)
        self.stats.grad_norms.append(info.grad_norm)
        return info

    def fit(
        self,
        examples: Sequence[Example],
        epochs: int,
        *,
        max_steps: int | None = None,
        seed: int = 0,
        progress: bool = False,
        on_step: Callable[[StepInfo, int], None] | None = None,
    ) -> TrainStats:
        """``epochs`` shuffled passes (at most ``max_steps`` optimizer steps); ``on_step(info,
        epoch)`` after each optimizer step."""
        from tqdm import tqdm

        cfg = self.cfg
        rng = np.random.default_rng(seed)
        accum = cfg.gradient_accumulation_steps
        bar = tqdm(
            total=self.total_steps, disable=not progress, file=sys.stderr, unit="step", leave=True
        )
        self.model.train()
        t_start = time.perf_counter()
        try:
            for epoch in range(1, epochs + 1):
                t_epoch = time.perf_counter()
                steps_before, tokens_before = self.stats.steps, self.stats.tokens
                order = rng.permutation(len(examples))
                batches = [
                    [examples[i] for i in order[j : j + cfg.batch_size]]
                    for j in range(0, len(order), cfg.batch_size)
                ]
                epoch_losses: list[float] = []
                t_window = time.perf_counter()
                for i, group in enumerate(batches):
                    self.micro_step(collate(group, self.vocab_limit))
                    if (i + 1) % accum and i + 1 < len(batches):
                        continue
                    tokens = self._tokens
                    info = self.update()
                    now = time.perf_counter()
                    tps = tokens / max(now - t_window, 1e-9)
                    t_window = now
                    if info is None:
                        log.warning("train_step_skipped", epoch=epoch, reason="no valid micro-step")
                        continue
                    epoch_losses.append(info.loss)
                    log.info(
                        "train_step",
                        step=info.step,
                        epoch=epoch,
                        loss=round(info.loss, 5),
                        ce=round(info.ce, 5),
                        kd=round(info.kd, 5),
                        grad_norm=round(info.grad_norm, 5),
                        lr=info.lr,
                        tokens_per_s=round(tps, 1),
                        skipped_micro_batches=self.stats.skipped_micro_batches,
                    )
                    bar.update(1)
                    bar.set_postfix(loss=f"{info.loss:.3f}", lr=f"{info.lr:.1e}", epoch=epoch)
                    if on_step is not None:
                        on_step(info, epoch)
                    if max_steps is not None and self.stats.steps >= max_steps:
                        break
                dt = time.perf_counter() - t_epoch
                log.info(
                    "train_epoch",
                    epoch=epoch,
                    steps=self.stats.steps - steps_before,
                    mean_loss=(
                        round(sum(epoch_losses) / len(epoch_losses), 5) if epoch_losses else None
                    ),
                    tokens_per_s=round((self.stats.tokens - tokens_before) / max(dt, 1e-9), 1),
                    seconds=round(dt, 2),
                    skipped_micro_batches=self.stats.skipped_micro_batches,
                )
                if max_steps is not None and self.stats.steps >= max_steps:
                    break
        finally:
            bar.close()
            self.model.eval()
            self.stats.train_seconds += time.perf_counter() - t_start
        return self.stats


def planned_steps(
    num_examples: int, cfg: TrainingSettings, epochs: int, max_steps: int | None
) -> int:
    """Optimizer steps a run of this size takes (the cosine decay's length)."""
    micro = math.ceil(num_examples / cfg.batch_size)
    steps = epochs * math.ceil(micro / cfg.gradient_accumulation_steps)
    return min(steps, max_steps) if max_steps is not None else steps


# --------------------------------------------------------------------------------------------
# One run


def output_vocab(model: nn.Module) -> int:
    """Logit width of ``model`` (lazy graph, never evaluated)."""
    return int(model(mx.zeros((1, 1), dtype=mx.int32)).shape[-1])


def heldout_agreement(
    model: nn.Module,
    records: Sequence[Any],
    data: DataSettings,
    vocab_limit: int | None = None,
) -> dict[str, Any]:
    """Teacher-forced agreement of ``model`` with the records' target outputs."""
    model.eval()
    t0 = time.perf_counter()
    result = teacher_forced_agreement(
        model,
        [(r.prompt_tokens, r.output_tokens) for r in records],
        max_prompt=data.max_prompt_length,
        max_output=data.max_output_length,
        vocab_limit=vocab_limit,
    )
    return {**result.to_dict(), "seconds": round(time.perf_counter() - t0, 2)}


def _replay_count(num_failures: int, ratio: float) -> int:
    """Replay rows so that they are ``ratio`` of the run's examples."""
    if ratio <= 0 or num_failures <= 0:
        return 0
    return int(round(num_failures * ratio / (1.0 - ratio)))


def default_run_id() -> str:
    return time.strftime("train-%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"


def run_training(
    settings: Settings,
    *,
    out_dir: str | os.PathLike[str],
    epochs: int | None = None,
    max_steps: int | None = None,
    init_adapter: str | os.PathLike[str] | None = None,
    run_id: str | None = None,
    progress: bool = False,
    mark_used: bool = True,
    pair: Any = None,
    progress_file: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """One training run of the configured draft on the buffer; returns its metrics.

    Loads the pair (or uses ``pair``), builds examples from the pending failures plus replay,
    evaluates held-out agreement before (with ``init_adapter``) and after, saves the adapter to
    ``out_dir`` and, with ``mark_used``, marks the failures used by ``run_id``. Raises
    `TrainingError` (and marks nothing) when there is nothing to train on or no update was
    made. With ``progress_file`` the run's phase and latest step are kept there
    (`RunProgress`).
    """
    from daemon.core.models import load_pair
    from daemon.store.buffer import ReplayBuffer

    t0 = time.perf_counter()
    mx.reset_peak_memory()
    cfg = settings.training
    run_id = run_id or default_run_id()
    epochs = int(epochs if epochs is not None else cfg.epochs)
    if epochs < 1:
        raise TrainingError(f"epochs must be >= 1, got {epochs}")
    if max_steps is not None and max_steps < 1:
        raise TrainingError(f"max_steps must be >= 1, got {max_steps}")
    log.info(
        "train_start",
        run_id=run_id,
        out_dir=str(out_dir),
        epochs=epochs,
        max_steps=max_steps,
        init_adapter=str(init_adapter) if init_adapter else None,
    )
    progress_view = RunProgress(Path(progress_file) if progress_file else None)
    progress_view.update(phase="loading")

    if pair is None:
        pair = load_pair(settings)
    draft = pair.draft
    vocab_limit = min(output_vocab(pair.target), output_vocab(draft))

    with ReplayBuffer(settings.paths.data_dir, settings.buffer, create=False) as buffer:
        failures = buffer.pending_failures()
        replay = buffer.sample_replay(
            _replay_count(len(failures), cfg.replay_ratio),
            exclude_ids=[r.id for r in failures],
            seed=cfg.seed,
        )
        holdout = buffer.holdout(cfg.eval_max_rows)
    fail_ex, skipped_f = make_examples(failures, settings.data, "failure")
    replay_ex, skipped_r = make_examples(replay, settings.data, "replay")
    examples = fail_ex + replay_ex
    counts = {
        "failures": len(fail_ex),
        "replay": len(replay_ex),
        "skipped_empty": skipped_f + skipped_r,
        "target_tokens": sum(e.num_targets for e in examples),
        "rejected_positions": sum(len(e.rejected) for e in examples),
        "holdout_rows": len(holdout),
    }
    log.info("train_data", run_id=run_id, **counts)
    if not fail_ex:
        raise TrainingError(
            f"nothing to train on: {len(failures)} pending failure cases "
            f"({skipped_f} empty after truncation) in {buffer.path}"
        )

    mx.random.seed(cfg.seed)
    adapter_config = apply_lora(draft, cfg.lora, init_adapter)
    trainable = sum(v.size for _, v in tree_flatten(draft.trainable_parameters()))

    progress_view.update(phase="eval_before", holdout_rows=len(holdout))
    before = heldout_agreement(draft, holdout, settings.data, vocab_limit)
    log.info("heldout_eval", run_id=run_id, when="before", **before)

    total = planned_steps(len(examples), cfg, epochs, max_steps)
    trainer = Trainer(draft, cfg, total, vocab_limit=vocab_limit)
    log.info(
        "train_plan",
        run_id=run_id,
        examples=len(examples),
        steps=total,
        warmup_steps=trainer.warmup,
        trainable_parameters=trainable,
        learning_rate=cfg.learning_rate,
        lora=adapter_config["lora_parameters"],
    )
    progress_view.update(
        phase="training", step=0, total_steps=total, heldout_before=before["agreement"]
    )

    def on_step(info: StepInfo, epoch: int) -> None:
        progress_view.update(step=info.step, epoch=epoch, loss=round(info.loss, 5), lr=info.lr)

    stats = trainer.fit(
        examples, epochs, max_steps=max_steps, seed=cfg.seed, progress=progress, on_step=on_step
    )
    if stats.steps == 0:
        raise TrainingError(
            f"no optimizer step was taken: {stats.micro_batches} micro-batches, "
            f"{stats.skipped_nonfinite} non-finite, {stats.skipped_empty_batches} without targets"
        )
    bad = [k for k, v in tree_flatten(draft.trainable_parameters()) if not mx.isfinite(v).all()]
    if bad:
        raise TrainingError(f"adapter weights became non-finite: {bad[:3]}")

    progress_view.update(phase="eval_after")
    after = heldout_agreement(draft, holdout, settings.data, vocab_limit)
    log.info("heldout_eval", run_id=run_id, when="after", **after)
    progress_view.update(phase="saving", heldout_after=after["agreement"])

    metadata = {
        "run_id": run_id,
        "created": time.time(),
        "target": pair.target_id,
        "draft": pair.draft_id,
        "init_adapter": str(init_adapter) if init_adapter else None,
        "heldout_before": before["agreement"],
        "heldout_after": after["agreement"],
    }
    path = save_adapter(draft, out_dir, adapter_config, metadata)
    # every pending failure this run consumed, the ones skipped as empty too (they would only
    # be skipped again)
    marked = buffer.mark_used([r.id for r in failures], run_id) if mark_used else 0
    buffer.close()

    n = max(1, min(5, len(stats.losses) // 4 or 1))
    metrics = {
        "run_id": run_id,
        "heldout_before": before,
        "heldout_after": after,
        "examples": counts,
        "epochs": epochs,
        "steps": stats.steps,
        "planned_steps": total,
        "micro_batches": stats.micro_batches,
        "skipped_micro_batches": stats.skipped_micro_batches,
        "skipped_nonfinite": stats.skipped_nonfinite,
        "skipped_empty_batches": stats.skipped_empty_batches,
        "empty_windows": stats.empty_windows,
        "loss_first": sum(stats.losses[:n]) / n,
        "loss_last": sum(stats.losses[-n:]) / n,
        "grad_norm_mean": sum(stats.grad_norms) / len(stats.grad_norms),
        "tokens": stats.tokens,
        "target_tokens": stats.target_tokens,
        "tokens_per_s": stats.tokens / max(stats.train_seconds, 1e-9),
        "train_seconds": stats.train_seconds,
        "trainable_parameters": trainable,
        "peak_memory_bytes": int(mx.get_peak_memory()),
        "marked_used": marked,
        "wall_s": time.perf_counter() - t0,
        "adapter_path": str(path),
    }
    log.info(
        "train_run",
        **{k: v for k, v in metrics.items() if k not in ("heldout_before", "heldout_after")},
        heldout_before=before["agreement"],
        heldout_after=after["agreement"],
    )
    return metrics


def generate_traffic(
    pair: Any,
    prompts: Iterable[str | list[dict[str, Any]]],
    buffer: Any,
    *,
    max_tokens: int = 64,
    split: str | None = None,
    speculative: Any = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Serve ``prompts`` greedily with the engine (chat template applied) and store each
    request in ``buffer`` (a `daemon.store.buffer.ReplayBuffer`) as the daemon would; ``split``
    forces the split (else the buffer's hash of the prompt text decides)."""
    from tqdm import tqdm

    from daemon.core.engine import SamplingParams, SpeculativeConfig, SpeculativeEngine
    from daemon.core.prompts import encode_prompt
    from daemon.store.buffer import BufferRecord

    config = (
        SpeculativeConfig.from_settings(speculative, pair.max_context)
        if speculative is not None
        else SpeculativeConfig(max_context=pair.max_context)
    )
    engine = SpeculativeEngine(pair.target, pair.draft, pair.tokenizer, config)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    t0 = time.perf_counter()
    rows = tokens = 0
    for prompt in tqdm(list(prompts), disable=not progress, file=sys.stderr, unit="prompt"):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = encode_prompt(pair.tokenizer, messages)
        result = engine.run(ids, params)
        record = BufferRecord.from_result(
            messages[-1]["content"], ids, result, pair.target_id, pair.draft_id
        )
        if split is not None:
            record.split = split
        buffer.add([record])
        rows += 1
        tokens += len(result.tokens)
    dt = time.perf_counter() - t0
    return {"records": rows, "tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt}


def bench_train(
    settings: Settings,
    *,
    prompts: Sequence[str | list[dict[str, Any]]] | None = None,
    holdout_prompts: Sequence[str | list[dict[str, Any]]] | None = None,
    max_tokens: int = 64,
    epochs: int | None = None,
    max_steps: int | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    pair: Any = None,
) -> dict[str, Any]:
    """Training throughput (tokens/s), peak memory and held-out agreement before -> after for
    the configured draft.

    Without ``prompts`` it trains on the buffer in ``settings.paths.data_dir`` (its pending
    failures + replay; holdout rows for evaluation) and marks nothing used. With ``prompts``
    it first builds traffic in a scratch buffer: each prompt served greedily (``max_tokens``)
    by the untrained pair, split by the buffer's hash, and ``holdout_prompts`` (if given) all
    stored as holdout rows. The adapter goes to ``out_dir`` (default: a temporary directory,
    deleted). CPU note: generation runs at ~5-10 tokens/s for the default pair, so 100 prompts x
    64 tokens take ~15 minutes.
    """
    from daemon.core.models import load_pair
    from daemon.store.buffer import ReplayBuffer

    if pair is None:
        pair = load_pair(settings)
    traffic: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="specd-bench-train-") as tmp:
        run_settings = settings
        if prompts is not None:
            run_settings = settings.model_copy(deep=True)
            run_settings.paths.data_dir = Path(tmp) / "data"
            with ReplayBuffer(run_settings.paths.data_dir, settings.buffer) as buf:
                traffic = generate_traffic(
                    pair,
                    prompts,
                    buf,
                    max_tokens=max_tokens,
                    speculative=settings.speculative,
                    progress=progress,
                )
                if holdout_prompts:
                    generate_traffic(
                        pair,
                        holdout_prompts,
                        buf,
                        max_tokens=max_tokens,
                        split="holdout",
                        speculative=settings.speculative,
                        progress=progress,
                    )
                traffic["train_records"] = buf.count("train")
                traffic["holdout_records"] = buf.count("holdout")
        m = run_training(
            run_settings,
            out_dir=out_dir or Path(tmp) / "adapter",
            epochs=epochs,
            max_steps=max_steps,
            run_id="bench-train",
            progress=progress,
            mark_used=False,
            pair=pair,
        )
    cfg = settings.training
    return {
        "draft": pair.draft_id,
        "heldout_before": m["heldout_before"]["agreement"],
        "heldout_after": m["heldout_after"]["agreement"],
        "heldout_positions": m["heldout_after"]["positions"],
        "heldout_rows": m["heldout_after"]["rows"],
        "examples": m["examples"]["failures"] + m["examples"]["replay"],
        "epochs": m["epochs"],
        "steps": m["steps"],
        "tokens_per_s": m["tokens_per_s"],
        "peak_memory_bytes": m["peak_memory_bytes"],
        "train_seconds": m["train_seconds"],
        "loss_first": m["loss_first"],
        "loss_last": m["loss_last"],
        "learning_rate": cfg.learning_rate,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "lora_rank": cfg.lora.rank,
        "kd_weight": cfg.kd_weight,
        "disagreement_weight": cfg.disagreement_weight,
        "traffic": traffic,
        "adapter_path": m["adapter_path"] if out_dir else None,
    }


# --------------------------------------------------------------------------------------------
# The training process


@dataclass
class RunProgress:
    """A running training run's phase and latest step, kept in a small JSON file that the
    daemon shows in ``/status``. Replaced atomically but not fsynced: it is only a view, and
    the result file stays the record. Does nothing without a path."""

    path: Path | None
    state: dict[str, Any] = field(default_factory=dict)

    def update(self, **fields: Any) -> None:
        if self.path is None:
            return
        self.state.update(fields, updated=time.time())
        try:
            atomic_write_json(self.path, self.state, fsync=False)
        except OSError as e:  # a view must never fail the run
            log.warning("train_progress_unwritable", path=str(self.path), error=str(e))
            self.path = None


def progress_file_for(result_file: str | os.PathLike[str]) -> Path:
    """Where the run writing ``result_file`` keeps its `RunProgress`."""
    result_file = Path(result_file)
    return result_file.with_name(f"{result_file.stem}.progress.json")


def read_progress(result_file: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The latest progress of the run writing ``result_file``; None before its first update
    (or if the file cannot be read)."""
    try:
        data = json.loads(progress_file_for(result_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_result(path: str | os.PathLike[str], result: dict[str, Any]) -> None:
    """Write the result file atomically (readers see the old file or the whole new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)


def read_result(path: str | os.PathLike[str], returncode: int | None = None) -> dict[str, Any]:
    """The child's result; a missing or unreadable file (a hard crash, a kill) gives an error
    result that says how the process ended."""
    path = Path(path)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(result, dict) or result.get("status") not in ("ok", "error"):
            raise ValueError("not a training result")
    except (OSError, ValueError) as e:
        how = ""
        if returncode is not None and returncode < 0:
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = f"signal {-returncode}"
            how = f"; the process was killed by {name}"
            if -returncode == signal.SIGKILL:
                how += " (out of memory?)"
        elif returncode is not None:
            how = f"; the process exited with code {returncode}"
        reason = "no result file" if isinstance(e, FileNotFoundError) else f"bad result file: {e}"
        return {
            "status": "error",
            "error": f"training process wrote {reason} ({path}){how}",
            "metrics": None,
            "adapter_path": None,
            "returncode": returncode,
        }
    if returncode is not None:
        result["returncode"] = returncode
        if returncode != 0 and result["status"] == "ok":
            result = {**result, "status": "error", "error": f"exit code {returncode}"}
    return result


def training_command(
    *,
    out_dir: str | os.PathLike[str],
    result_file: str | os.PathLike[str],
    config: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    init_adapter: str | os.PathLike[str] | None = None,
    run_id: str | None = None,
    progress: bool = False,
    console: str = "off",
    nice: int = 0,
    python: str | None = None,
) -> list[str]:
    """The argv of ``python -m daemon.adaptation.training`` for these arguments."""
    cmd = [python or sys.executable, "-m", "daemon.adaptation.training"]
    if config is not None:
        cmd += ["--config", str(config)]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    cmd += ["--out", str(out_dir), "--result", str(result_file), "--console", console]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    if max_steps is not None:
        cmd += ["--max-steps", str(max_steps)]
    if init_adapter is not None:
        cmd += ["--init-adapter", str(init_adapter)]
    if run_id is not None:
        cmd += ["--run-id", run_id]
    if progress:
        cmd.append("--progress")
    if nice:
        cmd += ["--nice", str(nice)]
    return cmd


def start_training_process(
    *,
    out_dir: str | os.PathLike[str],
    result_file: str | os.PathLike[str],
    config: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    init_adapter: str | os.PathLike[str] | None = None,
    run_id: str | None = None,
    progress: bool = False,
    console: str = "off",
    nice: int = 0,
    preload_openblas: bool = True,
    env: dict[str, str] | None = None,
    **popen_kwargs: Any,
) -> subprocess.Popen:
    """Spawn a training run in its own process; `read_result` its ``result_file`` after wait().

    A stale ``result_file`` is removed first. On Linux the child gets the system OpenBLAS in
    ``LD_PRELOAD`` (as the CLI's re-exec does) unless ``preload_openblas`` is False. ``nice``
    lowers the child's priority (the child calls ``os.nice``; no ``preexec_fn``, which is unsafe
    in a threaded parent). ``popen_kwargs`` go to `subprocess.Popen` (stdout, stderr, ...).
    """
    Path(result_file).unlink(missing_ok=True)
    progress_file_for(result_file).unlink(missing_ok=True)
    child_env = dict(os.environ if env is None else env)
    if (
        preload_openblas
        and sys.platform.startswith("linux")
        and "openblas" not in child_env.get("LD_PRELOAD", "")
    ):
        child_env = openblas_env(child_env) or child_env
    repo_root = str(Path(__file__).resolve().parents[2])
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (repo_root, child_env.get("PYTHONPATH", "")) if p
    )
    cmd = training_command(
        out_dir=out_dir,
        result_file=result_file,
        config=config,
        data_dir=data_dir,
        epochs=epochs,
        max_steps=max_steps,
        init_adapter=init_adapter,
        run_id=run_id,
        progress=progress,
        console=console,
        nice=nice,
    )
    log.info("train_process_start", argv=cmd)
    return subprocess.Popen(cmd, env=child_env, **popen_kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m daemon.adaptation.training",
        description="One LoRA training run of the draft on the replay buffer, in its own "
        "process; writes a JSON result file.",
    )
    p.add_argument("--config", type=Path, metavar="PATH", help="main config file")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="data dir (buffer, models)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="adapter output dir")
    p.add_argument("--result", type=Path, required=True, metavar="FILE.json", help="result file")
    p.add_argument("--epochs", type=int, help="default: training.epochs")
    p.add_argument("--max-steps", type=int, help="cap on optimizer steps")
    p.add_argument("--init-adapter", type=Path, metavar="DIR", help="continue this adapter")
    p.add_argument("--run-id", help="id recorded on the used buffer rows")
    p.add_argument("--progress", action="store_true", help="tqdm progress bar on stderr")
    p.add_argument(
        "--console", choices=("off", "pretty", "json"), default="off", help="log to stderr too"
    )
    p.add_argument("--nice", type=int, default=0, help="lower this process's priority by N")
    p.add_argument(
        "--no-mark-used", action="store_true", help="do not mark the failures used (benchmarks)"
    )
    return p


def _maybe_reexec(enabled: bool, argv: list[str]) -> None:
    """Like the CLI's OpenBLAS re-exec, re-running this module."""
    maybe_reexec_with_openblas(enabled, argv, module="daemon.adaptation.training")


def main(argv: list[str] | None = None, *, standalone: bool = False) -> int:
    """Entry point of ``python -m daemon.adaptation.training``: 0 = ok, 1 = the run failed (also on
    SIGTERM), 2 = bad configuration. The result file is written in every case the process
    survives. ``standalone`` (the process's own entry point): re-exec once with OpenBLAS
    preloaded if the parent did not, and turn SIGTERM into a clean failure."""
    from daemon.config import ConfigError, load_settings
    from daemon.logging import configure_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    result: dict[str, Any] = {"status": "error", "error": None, "metrics": None}
    result["adapter_path"] = None
    try:
        settings, _ = load_settings(
            args.config,
            {"paths.data_dir": str(args.data_dir) if args.data_dir else None},
        )
    except ConfigError as e:
        write_result(args.result, {**result, "error": str(e)})
        print(f"specd train: {e}", file=sys.stderr)
        return 2
    if standalone:
        _maybe_reexec(settings.models.preload_openblas, argv)

        def _terminate(signum: int, _frame: Any) -> None:
            raise TrainingError(f"cancelled by {signal.Signals(signum).name}")

        signal.signal(signal.SIGTERM, _terminate)
    if args.nice:
        try:
            os.nice(args.nice)
        except OSError:
            pass
    configure_logging(settings.logging.level, settings.log_file, args.console)
    try:
        metrics = run_training(
            settings,
            out_dir=args.out,
            epochs=args.epochs,
            max_steps=args.max_steps,
            init_adapter=args.init_adapter,
            run_id=args.run_id,
            progress=args.progress,
            mark_used=not args.no_mark_used,
            progress_file=progress_file_for(args.result),
        )
    except BaseException as e:  # noqa: BLE001 - every failure must reach the result file
        msg = f"{type(e).__name__}: {e}" if not isinstance(e, TrainingError) else str(e)
        log.error("train_failed", error=msg, traceback=traceback.format_exc(limit=8))
        write_result(args.result, {**result, "error": msg})
        print(f"specd train: {msg}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    write_result(
        args.result,
        {
            "status": "ok",
            "error": None,
            "metrics": metrics,
            "adapter_path": metrics["adapter_path"],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(standalone=True))
