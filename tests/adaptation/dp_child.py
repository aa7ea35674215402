"""One rank (or the single process) of tests/adaptation/test_data_parallel.py: LoRA steps of a
tiny draft on fixed examples, the final trainable parameters written to argv[1]."""

from __future__ import annotations

import sys

import mlx.core as mx
from mlx.utils import tree_flatten

from daemon.adaptation.data import IGNORE, Example, collate
from daemon.adaptation.lora import apply_lora
from daemon.adaptation.trainer import Trainer
from daemon.config import LoraSettings, TrainingSettings
from daemon.core.distributed import detect_group
from daemon.core.models import make_layer_skip_draft
from tests.helpers import tiny_model


def main(out: str) -> None:
    group = detect_group()
    target = tiny_model(vocab=40, layers=4, seed=0)
    draft = make_layer_skip_draft(target, [0, 2])
    mx.random.seed(7)
    apply_lora(draft, LoraSettings(rank=4, dropout=0.0))
    examples = [
        Example(inputs=[1 + i, 5, 9, 12 + i, 3], labels=[IGNORE, 9, 12 + i, 3, 20 + i])
        for i in range(4)
    ]
    if group is None:  # one process: the two examples of a step accumulated
        cfg = TrainingSettings(warmup_steps=0, gradient_accumulation_steps=2)
        mine, accum = examples, 2
    else:  # two ranks: one example each per step, gradients averaged
        cfg = TrainingSettings(warmup_steps=0)
        mine, accum = examples[group.rank :: group.size], 1
    trainer = Trainer(draft, cfg, 2, group=group.handle if group is not None else None)
    draft.train()
    for i, ex in enumerate(mine):
        trainer.micro_step(collate([ex], None), [ex])
        if (i + 1) % accum == 0:
            trainer.update()
    if group is None or group.rank == 0:
        mx.save_safetensors(out, dict(tree_flatten(draft.trainable_parameters())))


if __name__ == "__main__":
    main(sys.argv[1])
