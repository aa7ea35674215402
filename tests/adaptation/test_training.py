"""LoRA training of the draft: label alignment, truncation, the finite-ness guards, adapters that
mlx-lm loads, the target left untouched, and the training subprocess (ok and crash)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from daemon.adaptation.data import IGNORE, build_example, collate, make_examples
from daemon.adaptation.lora import apply_lora
from daemon.adaptation.loss import compute_loss, kd_loss, model_logits
from daemon.adaptation.process import TrainingArgs, start_training_process
from daemon.adaptation.run import run_training
from daemon.adaptation.trainer import Trainer, lr_schedule
from daemon.bench.train import bench_train
from daemon.config import DataSettings, LoraSettings, Settings, TrainingSettings, load_settings
from daemon.core.heads import prune_head
from daemon.core.models import make_layer_skip_draft
from daemon.core.records import Rejection
from daemon.logging import configure_logging
from daemon.store.adapters import save_adapter
from daemon.store.buffer import BufferRecord, ReplayBuffer
from daemon.store.runs import read_progress, read_result
from tests.helpers import HANG_GUARD_S, make_tiny_llama, wait_until, write_model_dir

REPO = Path(__file__).resolve().parents[2]
VOCAB = 64
WORDS = [f"w{i}" for i in range(VOCAB - 2)]


def rej(pos: int, target: int, ids: list[int] | None = None, lps: list[float] | None = None):
    ids = ids if ids is not None else [target, 1, 2]
    lps = lps if lps is not None else [-0.1, -2.5, -3.0]
    return Rejection(
        position=pos,
        context_length=10 + pos,
        draft_token=(target + 1) % VOCAB,
        draft_prob=0.3,
        target_token=target,
        top_ids=ids,
        top_logprobs=lps,
    )


def cfg(**kw) -> TrainingSettings:
    base = {"learning_rate": 1e-3, "warmup_steps": 0, "gradient_accumulation_steps": 1}
    return TrainingSettings(**{**base, **kw})


def synthetic_examples(n: int, seed: int = 0, plen: int = 6, olen: int = 8) -> list:
    """Learnable toy data: outputs follow a fixed permutation of the previous token."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(VOCAB)
    out = []
    for _ in range(n):
        prompt = rng.integers(2, VOCAB, plen).tolist()
        output = []
        prev = prompt[-1]
        for _ in range(olen):
            prev = int(perm[prev])
            output.append(prev)
        rejections = [rej(1, output[1]), rej(3, output[3])]
        out.append(build_example(prompt, output, rejections, max_prompt=512, max_output=256))
    return out


def fresh_draft(rank: int = 4) -> nn.Module:
    model = make_tiny_llama(VOCAB, seed=3, hidden_size=32, intermediate_size=64)
    apply_lora(model, LoraSettings(rank=rank, dropout=0.0, scale=10.0))
    return model


def trainable(model: nn.Module) -> dict[str, mx.array]:
    params = dict(tree_flatten(model.trainable_parameters()))
    mx.eval(params)
    return {k: mx.array(v) for k, v in params.items()}


def same(a: dict[str, mx.array], b: dict[str, mx.array]) -> bool:
    return a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


# --------------------------------------------------------------------------------------------
# Data


def test_labels_align_and_mask_the_prompt() -> None:
    ex = build_example(
        [1, 2, 3],
        [4, 5, 6],
        [rej(1, 5), rej(2, 99)],  # the second is inconsistent with the output: dropped
        max_prompt=512,
        max_output=256,
    )
    assert ex is not None
    assert ex.inputs == [1, 2, 3, 4, 5]
    assert ex.labels == [IGNORE, IGNORE, 4, 5, 6]
    # label i is the token after input i; the last prompt position predicts output[0]
    assert ex.inputs[2] == 3 and ex.labels[2] == 4
    assert ex.rejected == [3] and ex.labels[3] == 5
    assert ex.kd_index == [3] and ex.kd_ids == [[5, 1, 2]]
    assert ex.num_targets == 3


def test_truncation_keeps_prompt_end_and_output_start() -> None:
    prompt, output = list(range(1, 11)), list(range(11, 21))
    ex = build_example(
        prompt, output, [rej(2, 13), rej(5, 16)], max_prompt=3, max_output=4, record_id=7
    )
    assert ex is not None
    assert ex.inputs == [8, 9, 10, 11, 12, 13]
    assert ex.labels == [IGNORE, IGNORE, 11, 12, 13, 14]
    assert ex.rejected == [4] and ex.labels[4] == 13  # position 5 was truncated away

    empty = BufferRecord("p", [1, 2], "", [], {}, [], "t", "d", id=3)
    full = BufferRecord("q", [1, 2], "x", [5], {}, [], "t", "d", id=4)
    examples, skipped = make_examples([empty, full], DataSettings(), "failure")
    assert skipped == 1 and [e.record_id for e in examples] == [4]


def test_non_finite_stored_logprobs_are_dropped() -> None:
    ex = build_example(
        [1, 2],
        [3, 4],
        [rej(0, 3, ids=[3, 9, 8], lps=[-0.1, float("-inf"), float("nan")])],
        max_prompt=8,
        max_output=8,
    )
    assert ex.kd_ids == [[3]] and ex.kd_logprobs == [[-0.1]]
    batch = collate([ex])
    logits = mx.random.normal((1, len(ex.inputs), VOCAB))
    assert mx.isfinite(kd_loss(logits, *batch.arrays()[3:])).item()


# --------------------------------------------------------------------------------------------
# Loss


def test_kd_loss_zero_when_draft_matches_stored_top_k_positive_otherwise() -> None:
    mx.random.seed(0)
    logits = 3 * mx.random.normal((2, 5, VOCAB))
    full = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # what the target stores
    examples = []
    for b in range(2):
        ex = build_example([1, 2], [3, 4, 5, 6], max_prompt=8, max_output=8)
        ex.kd_index = [1, 3]
        ex.kd_ids = [[7, 3, 11, 2], [5, 9, 40]]
        ex.kd_logprobs = [
            [full[b, i, t].item() for t in ids]
            for i, ids in zip(ex.kd_index, ex.kd_ids, strict=True)
        ]
        examples.append(ex)
    examples[1].kd_index, examples[1].kd_ids = examples[1].kd_index[:1], examples[1].kd_ids[:1]
    examples[1].kd_logprobs = examples[1].kd_logprobs[:1]  # ragged: padding must be inert
    batch = collate(examples)
    kd = kd_loss(logits, *batch.arrays()[3:]).item()
    assert abs(kd) < 1e-5
    other = logits + mx.random.normal(logits.shape)
    assert kd_loss(other, *batch.arrays()[3:]).item() > 1e-3
    # no stored top-k anywhere: 0, not 0/0
    bare = collate([build_example([1], [2, 3], max_prompt=8, max_output=8)])
    assert kd_loss(logits[:1, :2], *bare.arrays()[3:]).item() == 0.0


@pytest.mark.parametrize("tied", [False, True])
def test_head_runs_only_on_label_positions_with_the_same_loss(tied: bool) -> None:
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(6)
    args = ModelArgs.from_dict(
        {**vars(make_tiny_llama(VOCAB, hidden_size=32).args), "tie_word_embeddings": tied}
    )
    model = Model(args)
    examples = synthetic_examples(3)
    examples[1] = build_example([5] * 9, [6, 7, 8], [rej(1, 7)], max_prompt=99, max_output=9)
    batch = collate(examples)
    assert batch.start == 5  # the shortest prompt (6 tokens) - 1
    full = model(batch.inputs)
    assert mx.allclose(model_logits(model, batch.inputs, batch.start), full[:, 5:], atol=1e-5)
    kw = {"kd_weight": 0.7, "disagreement_weight": 2.0}
    fast = compute_loss(model, *batch.arrays(), start=batch.start, **kw)[0]
    slow = compute_loss(model, *batch.arrays(), start=0, **kw)[0]
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5)


def test_a_pruned_head_is_trained_over_its_subset() -> None:
    """The loss of a draft with a pruned head is the cross-entropy over the subset; a label
    outside it (a token the draft can never propose) is no target."""
    model = fresh_draft()
    examples = synthetic_examples(3)
    batch = collate(examples)
    labels = np.array(batch.labels)
    seen = sorted({int(t) for t in labels.ravel() if t != IGNORE})
    ids = seen[: len(seen) // 2] + [VOCAB - 1]
    prune_head(model, ids)
    loss, (ce, _, count) = compute_loss(model, *batch.arrays())
    logits = np.array(model(batch.inputs)[..., mx.array(ids)].astype(mx.float32))
    total, n = 0.0, 0
    for b, t in zip(*np.nonzero(labels != IGNORE), strict=True):
        if labels[b, t] in ids:
            row = logits[b, t]
            lse = row.max() + np.log(np.exp(row - row.max()).sum())
            total += lse - row[ids.index(labels[b, t])]
            n += 1
    assert 0 < n < (labels != IGNORE).sum() and count.item() == n
    assert ce.item() == pytest.approx(total / n, rel=1e-4)
    assert loss.item() == pytest.approx(ce.item(), rel=1e-6)
    # the KD term is taken over the subset too: finite, whatever the stored ids are
    kd_loss_value = compute_loss(model, *batch.arrays(), kd_weight=1.0)[1][1]
    assert math.isfinite(kd_loss_value.item())


def test_all_masked_batch_is_finite_and_makes_no_update() -> None:
    model = fresh_draft()
    ex = build_example([1, 2, 3], [4, 5], max_prompt=8, max_output=8)
    ex.labels = [IGNORE] * len(ex.labels)
    batch = collate([ex])
    loss, (ce, kd, count) = compute_loss(model, *batch.arrays(), kd_weight=1.0)
    assert mx.isfinite(loss).item() and loss.item() == 0.0 and count.item() == 0

    trainer = Trainer(model, cfg(gradient_accumulation_steps=2), total_steps=4)
    before = trainable(model)
    assert trainer.micro_step(batch) is False
    assert trainer.micro_step(batch) is False
    assert trainer.update() is None
    assert same(before, trainable(model))
    assert trainer.stats.skipped_empty_batches == 2
    assert trainer.stats.empty_windows == 1 and trainer.stats.steps == 0


def test_nan_gradient_is_skipped_and_update_averages_valid_micro_steps() -> None:
    examples = synthetic_examples(2)
    model = fresh_draft()
    start = trainable(model)
    trainer = Trainer(model, cfg(gradient_accumulation_steps=2), total_steps=4)
    real = trainer.value_and_grad
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        (loss, aux), grads = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (1, 2):  # the first micro-batch of each window
            flat = tree_flatten(grads)
            bad = [(k, v * mx.nan if i == 0 else v) for i, (k, v) in enumerate(flat)]
            grads = tree_unflatten(bad)
        return (loss, aux), grads

    trainer.value_and_grad = poisoned
    # window 1: only the poisoned micro-batch -> no update at all
    assert trainer.micro_step(collate([examples[0]])) is False
    assert trainer.update() is None
    assert same(start, trainable(model))
    # window 2: [poisoned (skipped), ok] -> same update as a clean window of just the ok one
    trainer.micro_step(collate([examples[0]]))
    trainer.micro_step(collate([examples[1]]))
    info = trainer.update()
    assert info is not None and info.micro_steps == 1
    assert trainer.stats.skipped_nonfinite == 2 and trainer.stats.steps == 1
    got = trainable(model)
    assert all(mx.isfinite(v).all().item() for v in got.values())

    ref = fresh_draft()
    ref_trainer = Trainer(ref, cfg(gradient_accumulation_steps=2), total_steps=4)
    ref_trainer.micro_step(collate([examples[1]]))
    ref_trainer.update()
    want = trainable(ref)
    assert all(mx.allclose(got[k], want[k], atol=1e-6).item() for k in want)


def test_loss_decreases_and_grads_are_clipped() -> None:
    examples = synthetic_examples(8)
    model = fresh_draft()
    settings = cfg(kd_weight=0.5, disagreement_weight=1.0, max_grad_norm=0.5, warmup_steps=2)
    trainer = Trainer(model, settings, total_steps=24, vocab_limit=VOCAB)
    stats = trainer.fit(examples, epochs=3)
    assert stats.steps == 24 and stats.skipped_micro_batches == 0
    assert np.mean(stats.losses[-4:]) < 0.8 * np.mean(stats.losses[:4])
    assert all(np.isfinite(stats.losses))


def test_schedule_warms_up_then_decays() -> None:
    sched = lr_schedule(1e-3, warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    lrs = [sched(mx.array(s)).item() for s in range(21)]
    assert lrs[0] == pytest.approx(2.5e-4) and lrs[3] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lrs[20] == pytest.approx(1e-4)


def reference_lr(lr: float, warmup: int, total: int, min_ratio: float, step: int) -> float:
    """The schedule as it was hand-written before it moved onto `mlx.optimizers`."""
    if step < warmup:
        return lr * (step + 1) / max(warmup, 1)
    floor = lr * min_ratio
    t = min(max((step - warmup) / max(1, total - warmup), 0.0), 1.0)
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize(
    ("warmup", "total", "min_ratio"),
    [(0, 20, 0.1), (1, 20, 0.0), (2, 3, 0.1), (4, 20, 0.1), (10, 10, 0.0), (3, 1, 0.5)],
)
def test_schedule_matches_the_hand_written_one(warmup: int, total: int, min_ratio: float) -> None:
    sched = lr_schedule(1e-3, warmup, total, min_ratio)
    for step in range(total + 4):  # past the end it stays at the floor
        want = reference_lr(1e-3, warmup, total, min_ratio, step)
        # the optimizer passes its step count as an unsigned array
        for s in (mx.array(step), mx.array(step, dtype=mx.uint64)):
            assert sched(s).item() == pytest.approx(want, rel=1e-5, abs=1e-9), (step, s.dtype)


def test_trainer_schedule_uses_the_effective_warmup() -> None:
    # warmup is at most half of a short run, so it still reaches the full learning rate
    trainer = Trainer(fresh_draft(), cfg(warmup_steps=10, min_lr_ratio=0.1), total_steps=6)
    assert trainer.warmup == 3
    lrs = [trainer.schedule(mx.array(s)).item() for s in range(7)]
    want = [reference_lr(1e-3, 3, 6, 0.1, s) for s in range(7)]
    assert lrs == pytest.approx(want, rel=1e-5)
    assert lrs[2] == pytest.approx(1e-3) and lrs[6] == pytest.approx(1e-4)
    assert Trainer(fresh_draft(), cfg(warmup_steps=10), total_steps=1).warmup == 0


def test_lora_on_quantized_draft() -> None:
    model = make_tiny_llama(VOCAB, seed=4, hidden_size=64, intermediate_size=128)
    nn.quantize(model, group_size=32, bits=4)
    apply_lora(model, LoraSettings(rank=4, dropout=0.0, scale=10.0))
    before = trainable(model)
    stats = Trainer(model, cfg(), total_steps=4).fit(synthetic_examples(4), epochs=1)
    assert stats.steps == 4 and stats.skipped_micro_batches == 0
    after = trainable(model)
    assert not same(before, after)
    assert all(mx.isfinite(v).all().item() for v in after.values())


# --------------------------------------------------------------------------------------------
# Target isolation and adapters


def test_lora_never_touches_the_target() -> None:
    target = make_tiny_llama(VOCAB, seed=5, hidden_size=32, intermediate_size=64)
    target.set_dtype(mx.float32)
    draft = make_layer_skip_draft(target, [0])
    tokens = mx.array([[3, 9, 4, 17, 22]])
    target_before = target(tokens)
    draft_before = draft(tokens)
    mx.eval(target_before, draft_before)
    apply_lora(draft, LoraSettings(rank=4, dropout=0.0, scale=10.0))
    Trainer(draft, cfg(), total_steps=6).fit(synthetic_examples(6), epochs=1)
    assert mx.array_equal(target(tokens), target_before).item()
    assert not mx.allclose(draft(tokens), draft_before).item()
    assert not any("lora" in k for k, _ in tree_flatten(target.parameters()))
    assert not tree_flatten(target.trainable_parameters()) or all(
        "lora" not in k for k, _ in tree_flatten(target.trainable_parameters())
    )


def test_saved_adapter_loads_with_mlx_lm(tmp_path: Path) -> None:
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters

    model_dir = write_model_dir(tmp_path / "model", WORDS, VOCAB, seed=2)
    draft, _ = load(str(model_dir))
    config = apply_lora(draft, LoraSettings(rank=4, dropout=0.05, scale=10.0, num_layers=3))
    Trainer(draft, cfg(), total_steps=4).fit(synthetic_examples(4), epochs=1)
    draft.eval()
    tokens = mx.array([[3, 9, 4, 17, 22, 5]])
    trained = draft(tokens)
    out = save_adapter(draft, tmp_path / "adapter", config, {"run_id": "t"})
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["fine_tune_type"] == "lora" and saved["num_layers"] == 3
    assert set(saved["lora_parameters"]) >= {"rank", "scale", "dropout", "keys"}
    assert (out / "adapters.safetensors").is_file()

    loaded, _ = load(str(model_dir), adapter_path=str(out))
    assert mx.allclose(loaded(tokens), trained, atol=1e-5).item()

    # LoRA outside the blocks (the tied embedding, i.e. also the head) is saved by its path
    emb, _ = load(str(model_dir))
    keys = ["self_attn.q_proj", "mlp.down_proj", "model.embed_tokens"]
    emb_cfg = apply_lora(emb, LoraSettings(rank=4, dropout=0.0, scale=10.0, keys=keys))
    assert emb_cfg["lora_parameters"]["keys"] == sorted(keys)
    Trainer(emb, cfg(), total_steps=3).fit(synthetic_examples(3), epochs=1)
    emb.eval()
    out3 = save_adapter(emb, tmp_path / "emb-adapter", emb_cfg)
    emb_loaded, _ = load(str(model_dir), adapter_path=str(out3))
    assert mx.allclose(emb_loaded(tokens), emb(tokens), atol=1e-5).item()

    # and onto a layer-skip draft of a target
    target, _ = load(str(model_dir))
    skip = make_layer_skip_draft(target, [0, 2, 4])
    apply_lora(skip, LoraSettings(rank=4, dropout=0.0, scale=10.0))
    Trainer(skip, cfg(), total_steps=3).fit(synthetic_examples(3), epochs=1)
    skip_cfg = {
        "fine_tune_type": "lora",
        "num_layers": 3,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": None},
    }
    out2 = save_adapter(skip, tmp_path / "skip-adapter", skip_cfg)
    fresh = load_adapters(make_layer_skip_draft(target, [0, 2, 4]), str(out2))
    fresh.eval()
    assert mx.allclose(fresh(tokens), skip(tokens), atol=1e-5).item()


# --------------------------------------------------------------------------------------------
# Runs and the subprocess


def make_buffer(data_dir: Path, n_fail: int = 10, n_ok: int = 4, n_holdout: int = 3) -> dict:
    rng = np.random.default_rng(1)
    perm = rng.permutation(VOCAB - 2) + 2
    records = []
    for i in range(n_fail + n_ok + n_holdout):
        prompt = rng.integers(2, VOCAB, 6).tolist()
        output = [int(perm[(prompt[-1] + j) % (VOCAB - 2)]) for j in range(10)]
        split = "holdout" if i >= n_fail + n_ok else "train"
        failure = i < n_fail
        records.append(
            BufferRecord(
                prompt_text=f"prompt {i}",
                prompt_tokens=prompt,
                output_text=" ".join(f"w{t}" for t in output),
                output_tokens=output,
                stats={"drafted": 10, "accepted": 2 if failure else 9},
                rejections=[rej(2, output[2]), rej(5, output[5])] if failure else [],
                target_id="t",
                draft_id="d",
                split=split,
                is_failure=failure,
            )
        )
    with ReplayBuffer(data_dir) as buf:
        ids = buf.add(records)
    return {
        "failures": ids[:n_fail],
        "ok": ids[n_fail : n_fail + n_ok],
        "holdout": ids[n_fail + n_ok :],
    }


def write_config(tmp_path: Path, target: str, **training) -> Path:
    lines = [
        "models:",
        f"  target: {target}",
        "  draft: null",  # LoRA on the layer-skip draft (the feature draft: test_feature_training)
        "  draft_layers: [0, 2]",
        "  preload_openblas: false",
        "training:",
        "  learning_rate: 1.0e-3",
        "  warmup_steps: 2",
        "  gradient_accumulation_steps: 2",
        *[f"  {k}: {v}" for k, v in training.items()],
        "  lora:",
        "    rank: 4",
        "logging:",
        f"  file: {tmp_path / 'specd.log'}",
    ]
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tiny_setup(tmp_path: Path) -> tuple[Path, Path, dict]:
    model_dir = write_model_dir(tmp_path / "model", WORDS, VOCAB, seed=2)
    data_dir = tmp_path / "data"
    ids = make_buffer(data_dir)
    return (
        write_config(tmp_path, str(model_dir), epochs=2, kd_weight=0.5, replay_ratio=0.2),
        data_dir,
        ids,
    )


def test_run_training_in_process(tiny_setup, tmp_path: Path) -> None:
    config, data_dir, ids = tiny_setup
    settings, _ = load_settings(config, {"paths.data_dir": str(data_dir)})
    configure_logging(settings.logging.level, settings.log_file, "off")
    try:
        m = run_training(
            settings, out_dir=tmp_path / "a1", run_id="run-1", progress_file=tmp_path / "p.json"
        ).to_dict()
    finally:
        configure_logging("info", None, "off")
    assert m["examples"]["failures"] == 10
    assert m["examples"]["replay"] == 2  # 20% of the run: 10 failures + 2 replay rows
    assert m["examples"]["holdout_rows"] == 3
    assert m["steps"] == 2 * 6 and m["skipped_micro_batches"] == 0
    assert m["heldout_before"]["positions"] == 30
    assert m["loss_last"] < m["loss_first"]
    assert m["peak_memory_bytes"] > 0 and m["tokens_per_s"] > 0
    progress = json.loads((tmp_path / "p.json").read_text())
    assert progress["phase"] == "saving" and progress["step"] == progress["total_steps"] == 12
    assert progress["heldout_before"] == m["heldout_before"]["agreement"]
    assert progress["heldout_after"] == m["heldout_after"]["agreement"]
    with ReplayBuffer(data_dir) as buf:
        assert buf.pending_failure_count() == 0
        assert {buf.get(i).used_for_training for i in ids["failures"]} == {"run-1"}
        assert {buf.get(i).used_for_training for i in ids["ok"] + ids["holdout"]} == {None}
    log_events = [json.loads(line) for line in (tmp_path / "specd.log").read_text().splitlines()]
    names = {e["event"] for e in log_events if e.get("component") == "training"}
    assert {"train_step", "train_epoch", "train_run", "heldout_eval"} <= names
    step = next(e for e in log_events if e["event"] == "train_step")
    assert {"step", "epoch", "loss", "grad_norm", "lr", "tokens_per_s"} <= step.keys()

    # nothing pending any more: a second run has nothing to train on and marks nothing
    with pytest.raises(Exception, match="nothing to train on"):
        run_training(settings, out_dir=tmp_path / "a2")
    # continuing the adapter starts where the first run ended
    make_buffer(data_dir, n_fail=4, n_ok=0, n_holdout=0)
    m2 = run_training(
        settings, out_dir=tmp_path / "a2", init_adapter=tmp_path / "a1", epochs=1
    ).to_dict()
    assert m2["heldout_before"]["agreement"] == m["heldout_after"]["agreement"]


def test_a_run_with_a_pruned_head_keeps_its_subset_in_the_adapter(tmp_path: Path) -> None:
    """The subset is the target outputs' most frequent tokens; the adapter carries it, a
    draft loaded from the adapter gets it, and the next run's "before" uses it."""
    from daemon.core.heads import pruned_head
    from daemon.core.models import load_pair
    from daemon.store.adapters import adapter_head, load_adapter_dir

    model_dir = write_model_dir(tmp_path / "model", WORDS, VOCAB, seed=2)
    data_dir = tmp_path / "data"
    make_buffer(data_dir)
    config = write_config(tmp_path, str(model_dir), epochs=1)
    settings, _ = load_settings(
        config, {"paths.data_dir": str(data_dir), "models.draft_head_tokens": 24}
    )
    pair = load_pair(settings)
    assert pair.prunes_head and (head := pruned_head(pair.draft)) is not None
    assert head.size == 24  # before any traffic: the default list
    m = run_training(settings, out_dir=tmp_path / "a1", pair=pair)
    assert m.head_tokens == 24
    ids = adapter_head(tmp_path / "a1")
    assert ids is not None and len(ids) == 24
    with ReplayBuffer(data_dir) as buf:
        outputs = [t for o in buf.recent_outputs(1 << 20) for t in o]
    common = [t for t, _ in Counter(outputs).most_common(10)]
    assert set(common) <= set(ids)
    fresh = load_pair(settings)
    draft = load_adapter_dir(fresh.fresh_draft, tmp_path / "a1")
    assert pruned_head(draft).token_ids() == ids
    make_buffer(data_dir, n_fail=4, n_ok=0, n_holdout=0)
    m2 = run_training(settings, out_dir=tmp_path / "a2", init_adapter=tmp_path / "a1", pair=fresh)
    assert m2.heldout_before.agreement == m.heldout_after.agreement
    # pruning off: the same adapter loads with the full head
    off = Settings.model_validate(
        {
            **settings.model_dump(),
            "models": {**settings.models.model_dump(), "draft_head_tokens": 0},
        }
    )
    assert pruned_head(load_adapter_dir(load_pair(off).fresh_draft, tmp_path / "a1")) is None


def test_bench_train_builds_traffic_and_reports(tiny_setup, tmp_path: Path) -> None:
    config, data_dir, _ = tiny_setup
    settings, _ = load_settings(config, {"paths.data_dir": str(tmp_path / "bench-data")})
    rng = np.random.default_rng(3)
    prompts = [" ".join(rng.choice(WORDS, 5)) for _ in range(6)]
    result = bench_train(
        settings, prompts=prompts, holdout_prompts=prompts[:2], max_tokens=8, epochs=1
    )
    assert result["traffic"]["records"] == 6 and result["heldout_rows"] >= 2
    assert result["steps"] >= 1 and result["tokens_per_s"] > 0
    assert result["peak_memory_bytes"] > 0
    assert 0.0 <= result["heldout_before"] <= 1.0 and 0.0 <= result["heldout_after"] <= 1.0
    # the gate's score of each draft, from the step costs the run measured
    assert result["expected_speedup_before"] >= 1.0 and result["expected_speedup_after"] >= 1.0
    assert result["draft_token_ms"] > 0
    # the same measure on rows it trained on: scored on train rows, not the holdout again
    trained_on = result["chain_trained_on"]
    assert trained_on["positions"] > 0 and trained_on["first"] == result["trained_on_after"]
    assert trained_on != result["chain_after"]
    assert not (tmp_path / "bench-data" / "buffer.sqlite").exists()  # scratch buffer only


def test_bench_train_rows_trains_on_the_buffer_as_it_stood_after_n_failures(
    tiny_setup, tmp_path: Path
) -> None:
    config, data_dir, _ = tiny_setup
    settings, _ = load_settings(config, {"paths.data_dir": str(data_dir)})
    full = bench_train(settings, epochs=1)
    assert full["failures"] == 10 and full["examples"] > 10  # replay from the rows after them
    curve = bench_train(settings, epochs=1, max_failures=3)
    # the oldest 3 failures, and no replay: every other train row came after them
    assert curve["failures"] == 3 and curve["examples"] == 3
    assert curve["heldout_rows"] == full["heldout_rows"]  # scored on the same holdout


def test_bench_train_rows_reads_counts_and_refuses_others() -> None:
    from daemon.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["bench", "train", "--rows", "100,50,100"]).rows == [50, 100]
    for bad in ("0,50", "fifty", ""):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", "train", "--rows", bad])
    # several runs keep no adapter, and one mode at a time: refused, not ignored
    for other in (["--out", "a1"], ["--losses", "ce"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", "train", "--rows", "50", *other])


def result_dict(path: Path, returncode: int | None = None) -> dict:
    """The result file as the JSON contract (`TrainingResult.to_dict`)."""
    return read_result(path, returncode).to_dict()


def progress_dict(result_file: Path) -> dict | None:
    """The progress file as the JSON contract (`RunProgress.to_dict`), None before it exists."""
    progress = read_progress(result_file)
    return None if progress is None else progress.to_dict()


def run_child(args: dict, timeout: float = 120) -> tuple[subprocess.Popen, dict]:
    proc = start_training_process(
        TrainingArgs(**args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
    )
    out, _ = proc.communicate(timeout=timeout)
    return proc, {**result_dict(args["result_file"], proc.returncode), "output": out}


def test_training_subprocess_end_to_end(tiny_setup, tmp_path: Path) -> None:
    config, data_dir, ids = tiny_setup
    result_file = tmp_path / "result.json"
    result_file.write_text("stale")
    proc, result = run_child(
        {
            "config": config,
            "data_dir": data_dir,
            "out_dir": tmp_path / "adapter",
            "result_file": result_file,
            "max_steps": 3,
            "run_id": "child-run",
            "nice": 1,
        }
    )
    assert proc.returncode == 0, result
    assert result["status"] == "ok", result
    assert result["metrics"]["steps"] == 3
    assert progress_dict(result_file)["step"] == 3
    adapter = Path(result["adapter_path"])
    assert (adapter / "adapters.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["fine_tune_type"] == "lora"
    with ReplayBuffer(data_dir) as buf:
        assert {buf.get(i).used_for_training for i in ids["failures"]} == {"child-run"}


def test_training_subprocess_crash_reports_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, str(tmp_path / "no-such-model"))
    data_dir = tmp_path / "data"
    ids = make_buffer(data_dir, n_fail=2, n_ok=0, n_holdout=0)
    result_file = tmp_path / "result.json"
    proc, result = run_child(
        {
            "config": config,
            "data_dir": data_dir,
            "out_dir": tmp_path / "adapter",
            "result_file": result_file,
        }
    )
    assert proc.returncode == 1
    assert result["status"] == "error" and "no-such-model" in result["error"]
    assert json.loads(result_file.read_text())["status"] == "error"
    assert not (tmp_path / "adapter").exists()
    with ReplayBuffer(data_dir) as buf:
        assert buf.pending_failure_count() == len(ids["failures"])


def test_sigterm_cancels_cleanly(tiny_setup, tmp_path: Path) -> None:
    config, data_dir, ids = tiny_setup
    result_file = tmp_path / "result.json"
    proc = start_training_process(
        TrainingArgs(
            config=config,
            data_dir=data_dir,
            out_dir=tmp_path / "adapter",
            result_file=result_file,
            epochs=10_000,
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    log_file = tmp_path / "specd.log"
    wait_until(
        lambda: (
            proc.poll() is not None or (log_file.exists() and "train_step" in log_file.read_text())
        ),
        "the first train_step",
    )
    assert proc.poll() is None
    # the run's progress (what /status shows) follows its steps
    wait_until(
        lambda: proc.poll() is not None or (progress_dict(result_file) or {}).get("step", 0) >= 1,
        "progress at step 1",
    )
    progress = progress_dict(result_file)
    assert proc.poll() is None and progress is not None
    assert progress["phase"] == "training" and progress["total_steps"] == 10_000 * 6
    proc.terminate()
    proc.wait(HANG_GUARD_S)
    result = result_dict(result_file, proc.returncode)
    assert proc.returncode == 1
    assert result["status"] == "error" and "SIGTERM" in result["error"]
    assert not (tmp_path / "adapter").exists()
    with ReplayBuffer(data_dir) as buf:
        assert buf.pending_failure_count() == len(ids["failures"])


def test_read_result_without_file_says_how_the_process_ended(tmp_path: Path) -> None:
    r = result_dict(tmp_path / "missing.json", returncode=-9)
    assert r["status"] == "error" and "SIGKILL" in r["error"]
    (tmp_path / "half.json").write_text('{"status": "o')
    assert result_dict(tmp_path / "half.json", returncode=1)["status"] == "error"


def test_main_module_is_runnable() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "daemon.adaptation.process", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert out.returncode == 0 and "--result" in out.stdout


def test_defaults_are_documented_settings() -> None:
    t = Settings().training
    assert t.max_grad_norm == 1.0 and t.replay_ratio == 0.5


@pytest.mark.parametrize(("free_gib", "budget_gib"), [(2, 1), (8, 2), (100, 4)])
def test_the_teacher_cache_takes_a_quarter_of_free_memory_within_bounds(
    monkeypatch: pytest.MonkeyPatch, free_gib: int, budget_gib: int
) -> None:
    """What a run keeps across epochs (target features, teacher rows): a quarter of the free
    memory, never under 1 GiB (the old fixed budget) nor over 4 GiB."""
    from daemon.adaptation import trainer

    monkeypatch.setattr(trainer, "free_memory_bytes", lambda: free_gib << 30)
    assert trainer.teacher_cache_budget() == budget_gib << 30
