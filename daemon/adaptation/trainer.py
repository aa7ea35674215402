"""The optimiser loop: gradient accumulation, clipping, the learning-rate schedule, and the
guards that keep a run finite.

The `Trainer` is our own, not mlx-lm's ``tuner.trainer``: mlx-lm compiles one step over the
whole accumulation window, so it cannot skip a single non-finite micro-batch or average over the
valid ones only, which the guards below need.

4. **Exploding updates**: gradients are averaged over the accumulation window, clipped to
   ``training.max_grad_norm`` (`mlx.optimizers.clip_grad_norm`), and the learning rate warms up
   linearly before its cosine decay (`lr_schedule`, built from `mlx.optimizers`' schedules);
   Adam runs with bias correction.
5. **One bad micro-batch poisoning the weights**: a non-finite loss or any non-finite gradient
   skips that micro-batch (counted, ``skipped_nonfinite``); the accumulated gradient is averaged
   over the *valid* micro-steps only, and a window with none makes no update. A micro-batch
   without targets is not even run (counted, ``skipped_empty_batches``).

Training health (JSON log, component ``training``): one ``train_step`` event per optimizer step
(``step``, ``epoch``, ``loss``, ``ce``, ``kd``, ``grad_norm``, ``lr``, ``tokens_per_s``,
``skipped_micro_batches``) and ``train_epoch`` per epoch.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from daemon.adaptation.data import IGNORE, Batch, Example, collate
from daemon.adaptation.loss import compute_loss, target_greedy, teacher_logprobs
from daemon.config import TrainingSettings
from daemon.core.backend import free_memory_bytes
from daemon.core.feature_draft import FeatureDraft, is_feature_draft
from daemon.core.heads import pruned_head
from daemon.logging import get_logger

log = get_logger("training")

Schedule = Callable[[Any], mx.array]

# The teacher's rows (float16) and a feature draft's target features (float32 on the CPU) kept
# across epochs: a run of 200 examples x 256 output tokens over the default 8192-token head is
# ~840 MB, the features of 436 examples of ~230 tokens ~1.2 GB; beyond the budget they are
# recomputed each epoch (about twice a training step: a run of 654 examples took 1.25 s a step
# at 1 GiB). The budget: a quarter of the memory free when the run starts, within these bounds.
TEACHER_CACHE_BYTES = 1 << 30
TEACHER_CACHE_MAX_BYTES = 4 << 30


def teacher_cache_budget() -> int:
    return max(TEACHER_CACHE_BYTES, min(TEACHER_CACHE_MAX_BYTES, free_memory_bytes() // 4))


def lr_schedule(
    learning_rate: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> Schedule:
    """Linear warmup to ``learning_rate`` over ``warmup_steps`` optimizer steps (the first step
    already gets ``lr / warmup``), then cosine decay to ``min_lr_ratio * learning_rate`` at
    ``total_steps``, constant after it."""
    warmup = max(0, int(warmup_steps))
    decay = optim.cosine_decay(
        learning_rate, max(1, int(total_steps) - warmup), learning_rate * min_lr_ratio
    )
    if warmup == 0:
        return decay
    # step s < warmup gets lr * (s + 1) / warmup: a line from lr / warmup at step 0 to lr at
    # step warmup - 1 (a single warmup step is lr already; mlx needs at least one step)
    warm = optim.linear_schedule(learning_rate / warmup, learning_rate, max(1, warmup - 1))
    return optim.join_schedules([warm, decay], [warmup])


def _effective_warmup(warmup_steps: int, total_steps: int) -> int:
    """A short run still reaches the full learning rate: warmup is at most half of it."""
    return min(warmup_steps, total_steps // 2)


def _all_finite(loss: mx.array, grads: Any) -> mx.array:
    ok = mx.isfinite(loss).all()
    for _, g in cast(list[tuple[str, mx.array]], tree_flatten(grads)):
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
        teacher: nn.Module | None = None,
        group: Any = None,
    ) -> None:
        if cfg.loss != "ce" and teacher is None:
            raise ValueError(f"training.loss {cfg.loss!r} needs the target model as teacher")
        self.model = model
        self.teacher = teacher
        self.cfg = cfg
        self.vocab_limit = vocab_limit
        self.total_steps = max(1, int(total_steps))
        self.warmup = _effective_warmup(cfg.warmup_steps, self.total_steps)
        self.schedule = lr_schedule(
            cfg.learning_rate, self.warmup, self.total_steps, cfg.min_lr_ratio
        )
        self.optimizer = self._optimizer(model, cfg)
        self.value_and_grad = nn.value_and_grad(model, self.loss_fn)
        # data parallel (an mx.distributed group): every rank trains on its share of the
        # examples and each update averages the gradients of all ranks' micro-batches
        self.group = group
        self.stats = TrainStats()
        # id(example) -> its teacher rows, for one fit (cleared at its end: an id is only
        # unique while its example lives)
        self._teacher_cache: dict[int, mx.array] = {}
        self._cache_bytes = 0
        self._cache_budget = teacher_cache_budget()
        # id(example) -> the prompt term's labels (a few hundred ints each: no budget)
        self._prompt_labels: dict[int, mx.array] = {}
        self._accum: Any = None
        self._n = 0
        self._loss = self._ce = self._kd = 0.0
        self._tokens = 0

    def _optimizer(self, model: nn.Module, cfg: TrainingSettings) -> optim.Optimizer:
        """Adam(W) on the schedule; a feature draft's decoder layer on ``feature_layer_lr``
        times it (Adam's steps do not scale with the gradient, so it takes its own optimizer)."""

        def make(scale: float) -> optim.Optimizer:
            rate = self.schedule if scale == 1.0 else (lambda step: scale * self.schedule(step))
            if cfg.optimizer == "adam":
                return optim.Adam(learning_rate=rate, bias_correction=True)
            return optim.AdamW(
                learning_rate=rate, weight_decay=cfg.weight_decay, bias_correction=True
            )

        scale = cfg.feature_layer_lr
        if scale in (0.0, 1.0) or not is_feature_draft(model):
            return make(1.0)  # 0: the layer is frozen (run.py), so has no gradient
        return optim.MultiOptimizer(
            [make(scale), make(1.0)], [lambda path, _: path.startswith("layers.")]
        )

    def loss_fn(
        self,
        model: nn.Module,
        *arrays: mx.array,
        start: int = 0,
        features: Any = None,
        prompt_labels: Any = None,
    ) -> Any:
        return compute_loss(
            model,
            *arrays,
            start=start,
            kd_weight=self.cfg.kd_weight,
            disagreement_weight=self.cfg.disagreement_weight,
            vocab_limit=self.vocab_limit,
            loss=self.cfg.loss,
            features=features,
            regression_weight=self.cfg.feature_regression,
            second_step_weight=self.cfg.feature_second_step,
            feature_noise=self.cfg.feature_noise,
            prompt_weight=self.cfg.feature_prompt_weight,
            prompt_labels=prompt_labels,
        )

    def _teacher(self, inputs: mx.array, start: int) -> mx.array:
        head = pruned_head(self.model)
        columns = head.ids if head is not None else None
        assert self.teacher is not None
        logp = teacher_logprobs(self.teacher, inputs, start, columns, self.vocab_limit)
        mx.eval(logp)
        return logp

    def target_logprobs(
        self, batch: Batch, examples: Sequence[Example] | None = None
    ) -> mx.array | None:
        """The teacher's distribution over the batch (`teacher_logprobs`), for a divergence
        loss; over the draft's pruned head's columns where it has one.

        With the batch's ``examples`` each example's rows are computed once and kept (in
        float16, within `teacher_cache_budget`) for the later epochs: the target's forward pass
        costs about twice a draft training step here."""
        if self.cfg.loss == "ce" or self.teacher is None:
            return None
        if examples is None:
            return self._teacher(batch.inputs, batch.start)
        width = batch.inputs.shape[1]
        rows = []
        for ex in examples:
            first = ex.first_target
            cached = self._teacher_cache.get(id(ex))
            if cached is None:
                cached = self._teacher(mx.array(ex.inputs)[None], first)[0].astype(mx.float16)
                if self._cache_bytes + cached.nbytes <= self._cache_budget:
                    self._teacher_cache[id(ex)] = cached
                    self._cache_bytes += cached.nbytes
            # the example's rows sit at label indices first..len-1 of the padded batch
            pad = [(first - batch.start, width - len(ex.inputs)), (0, 0)]
            rows.append(mx.pad(cached.astype(mx.float32), pad))
        return mx.stack(rows)

    def target_features(
        self, batch: Batch, examples: Sequence[Example] | None = None
    ) -> mx.array | None:
        """The target's hidden states over the batch, for a feature draft (None otherwise);
        each example's are computed once per fit and kept (within `teacher_cache_budget`,
        shared with the teacher's rows): the target's forward pass is most of such a step."""
        if not isinstance(self.model, FeatureDraft):
            return None
        if examples is None:
            return mx.stop_gradient(self.model.target_features(batch.inputs))
        width = batch.inputs.shape[1]
        rows = []
        for ex in examples:
            key = -id(ex)  # beside the teacher's rows in one cache
            cached = self._teacher_cache.get(key)
            if cached is None:
                cached = self.model.target_features(mx.array(ex.inputs)[None])[0]
                mx.eval(cached)
                if self._cache_bytes + cached.nbytes <= self._cache_budget:
                    self._teacher_cache[key] = cached
                    self._cache_bytes += cached.nbytes
            rows.append(mx.pad(cached, [(0, width - cached.shape[0]), (0, 0)]))
        return mx.stack(rows)

    def prompt_labels(
        self, batch: Batch, examples: Sequence[Example] | None, features: mx.array | None
    ) -> mx.array | None:
        """The prompt term's labels (`target_greedy` at each example's prompt positions,
        ``IGNORE`` after them), computed once per example and fit; None where the loss
        computes them itself (no examples, or no prompt term)."""
        if features is None or examples is None or not self.cfg.feature_prompt_weight:
            return None
        assert isinstance(self.model, FeatureDraft)
        width = batch.inputs.shape[1]
        rows = []
        for i, ex in enumerate(examples):
            cached = self._prompt_labels.get(id(ex))
            if cached is None:
                top = self.model.final(features[i : i + 1, : max(ex.first_target, 1)])
                cached = target_greedy(self.model, top, self.vocab_limit)[0].astype(mx.int32)
                mx.eval(cached)
                self._prompt_labels[id(ex)] = cached
            rows.append(mx.pad(cached, [(0, width - cached.shape[0])], constant_values=IGNORE))
        return mx.stack(rows)

    def micro_step(self, batch: Batch, examples: Sequence[Example] | None = None) -> bool:
        """Forward/backward one micro-batch and accumulate it; False if it was skipped.
        ``examples`` (those ``batch`` was collated from) let a divergence loss reuse the
        teacher's distribution from an earlier epoch."""
        self.stats.micro_batches += 1
        if batch.num_targets == 0:
            self.stats.skipped_empty_batches += 1
            log.debug("train_micro_batch_skipped", reason="no target positions")
            return False
        (loss, (ce, kd, _)), grads = self.value_and_grad(
            self.model,
            *batch.arrays(),
            self.target_logprobs(batch, examples),
            start=batch.start,
            features=(features := self.target_features(batch, examples)),
            prompt_labels=self.prompt_labels(batch, examples, features),
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
        if self.group is not None:
            # every rank joins the all-reduce, even one whose micro-batches were all skipped
            if accum is None:
                accum = tree_map(mx.zeros_like, self.model.trainable_parameters())
            size = self.group.size()
            count = mx.distributed.all_sum(mx.array(float(n)), group=self.group)
            n = round(cast(float, count.item()))
            accum = tree_map(lambda g: g * size, nn.average_gradients(accum, group=self.group))
        if n == 0 or accum is None:
            self.stats.empty_windows += 1
            return None
        grads = tree_map(lambda g: g / n, accum)
        grads, norm = optim.clip_grad_norm(grads, self.cfg.max_grad_norm)
        main = self.optimizer
        if isinstance(main, optim.MultiOptimizer):
            main = main.optimizers[-1]  # the full rate's: the one `lr` reports
        lr = self.schedule(main.step)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state, norm, lr)
        self.stats.steps += 1
        info = StepInfo(
            step=self.stats.steps,
            loss=loss / n,
            ce=ce / n,
            kd=kd / n,
            grad_norm=float(norm.item()),
            lr=float(lr),
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

        rng = np.random.default_rng(seed)
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
                    [examples[i] for i in order[j : j + self.cfg.batch_size]]
                    for j in range(0, len(order), self.cfg.batch_size)
                ]
                losses = self._epoch(batches, epoch, bar, max_steps, on_step)
                dt = time.perf_counter() - t_epoch
                log.info(
                    "train_epoch",
                    epoch=epoch,
                    steps=self.stats.steps - steps_before,
                    mean_loss=round(sum(losses) / len(losses), 5) if losses else None,
                    tokens_per_s=round((self.stats.tokens - tokens_before) / max(dt, 1e-9), 1),
                    seconds=round(dt, 2),
                    skipped_micro_batches=self.stats.skipped_micro_batches,
                )
                if max_steps is not None and self.stats.steps >= max_steps:
                    break
        finally:
            bar.close()
            self._teacher_cache.clear()  # the memory goes back before evaluation and saving
            self._cache_bytes = 0
            self._prompt_labels.clear()
            self.model.eval()
            self.stats.train_seconds += time.perf_counter() - t_start
        return self.stats

    def _epoch(
        self,
        batches: list[list[Example]],
        epoch: int,
        bar: Any,
        max_steps: int | None,
        on_step: Callable[[StepInfo, int], None] | None,
    ) -> list[float]:
        """One pass over ``batches``: an optimizer step every ``gradient_accumulation_steps``
        micro-batches (and at the end), each logged; the steps' losses."""
        accum = self.cfg.gradient_accumulation_steps
        losses: list[float] = []
        t_window = time.perf_counter()
        for i, group in enumerate(batches):
            self.micro_step(collate(group, self.vocab_limit), group)
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
            losses.append(info.loss)
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
        return losses


def planned_steps(
    num_examples: int, cfg: TrainingSettings, epochs: int, max_steps: int | None
) -> int:
    """Optimizer steps a run of this size takes (the cosine decay's length)."""
    micro = math.ceil(num_examples / cfg.batch_size)
    steps = epochs * math.ceil(micro / cfg.gradient_accumulation_steps)
    return min(steps, max_steps) if max_steps is not None else steps
