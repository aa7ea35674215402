"""Adaptation: LoRA fine-tuning of the draft on the replay buffer's traffic, kept finite, and
putting the result in service.

The draft learns to agree with the target on the requests the buffer holds: teacher forcing on
``prompt + target_output`` with the prompt masked, an optional extra weight on the positions
where the draft was rejected, and optional distillation from the target's stored top-k
log-probabilities at those positions.

Modules, bottom up: data (examples and padded batches), loss, lora (LoRA layers on the draft,
with mlx-lm's conversion), trainer (the optimiser loop), run (one training run), process (the
``python -m daemon.adaptation.process`` entry the daemon spawns), loop (trigger, gate, hot
swap), status (the loop as ``/status`` shows it). The adapter file format and a run's result
and progress files belong to the store (`daemon.store.adapters`, `daemon.store.runs`). Never
imports serving: the loop drives the service through a protocol
(`daemon.adaptation.loop.ServingPort`).

Staying finite
--------------
The training code this project descends from produced NaN losses for five reasons. Each has a
guard, and a test:

1. **0/0 on a batch without targets** (everything masked): the CE divides by
   ``max(valid positions, 1)`` (`loss`); such a batch is not even run, it is counted
   (``skipped_empty_batches``), and a window of them makes no update (`trainer`).
2. **-inf / NaN in the stored target log-probs** (top-k entries that underflowed): they are
   sanitised when examples are built (`data`), the KD term masks with a finite ``-1e9`` (never
   ``-inf``, whose ``0 * inf`` is NaN) and renormalises over the valid entries only (`loss`).
3. **Half-precision logits**: the loss is always computed from float32 logits (log-softmax of a
   49k vocabulary in float16 overflows) (`loss`).
4. **Exploding updates**: gradients are averaged over the accumulation window, clipped, and the
   learning rate warms up before its cosine decay; Adam runs with bias correction (`trainer`).
5. **One bad micro-batch poisoning the weights**: a non-finite loss or gradient skips that
   micro-batch, and the window is averaged over the valid ones only (`trainer`). A run that
   takes no update at all, or ends with a non-finite adapter weight, fails and saves nothing
   (`run`).
"""
