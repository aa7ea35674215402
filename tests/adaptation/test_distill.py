"""Distillation from the target's full distribution (`training.loss`): each divergence against a
numpy reference, the loss over a pruned head's columns, training that moves the draft toward the
target, and the teacher-forced expected acceptance the benchmark reports."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from daemon.adaptation.data import IGNORE, collate
from daemon.adaptation.lora import apply_lora
from daemon.adaptation.loss import LOSSES, compute_loss, divergence, teacher_logprobs
from daemon.adaptation.run import run_training
from daemon.adaptation.trainer import Trainer
from daemon.config import LoraSettings, load_settings
from daemon.core.evaluation import teacher_forced_acceptance
from daemon.core.heads import prune_head
from daemon.core.models import make_layer_skip_draft
from daemon.logging import configure_logging
from tests.adaptation.test_training import (
    VOCAB,
    WORDS,
    cfg,
    make_buffer,
    synthetic_examples,
    write_config,
)
from tests.helpers import make_tiny_llama, write_model_dir


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reference(kind: str, q_logits: np.ndarray, p_full: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """What each divergence should be, written out in float64."""
    q = _softmax(q_logits.astype(np.float64))
    p = p_full[..., cols].astype(np.float64)  # full-vocabulary probabilities on the columns
    pn = p / p.sum(axis=-1, keepdims=True)
    if kind == "fkl":
        return (pn * (np.log(pn) - np.log(q))).sum(-1)
    if kind == "jsd":
        m = (pn + q) / 2
        return 0.5 * (pn * np.log(pn / m)).sum(-1) + 0.5 * (q * np.log(q / m)).sum(-1)
    if kind == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    return -np.log(np.minimum(p, q).sum(-1))


@pytest.mark.parametrize("kind", LOSSES[1:])
@pytest.mark.parametrize("subset", [False, True])
def test_divergences_match_the_reference(kind: str, subset: bool) -> None:
    rng = np.random.default_rng(0)
    p_logits = 2.0 * rng.standard_normal((2, 5, VOCAB))
    p_full = _softmax(p_logits)
    cols = np.sort(rng.choice(VOCAB, 24, replace=False)) if subset else np.arange(VOCAB)
    q_logits = 2.0 * rng.standard_normal((2, 5, len(cols)))
    target_logp = mx.array(np.log(p_full[..., cols]).astype(np.float32))
    got = np.array(divergence(kind, mx.array(q_logits.astype(np.float32)), target_logp))
    np.testing.assert_allclose(got, reference(kind, q_logits, p_full, cols), rtol=2e-4, atol=1e-5)
    assert (got > 0).all()
    # the draft equal to the target: nothing left to learn (tvd/acceptance over the full vocab)
    same = divergence(kind, mx.array(p_logits[..., cols].astype(np.float32)), target_logp)
    if kind in ("fkl", "jsd") or not subset:
        assert np.abs(np.array(same)).max() < 1e-5


def test_an_unknown_divergence_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown divergence 'kl2'"):
        divergence("kl2", mx.zeros((1, 2, 4)), mx.zeros((1, 2, 4)))


@pytest.mark.parametrize("kind", LOSSES[1:])
def test_the_loss_is_the_mean_divergence_over_output_positions(kind: str) -> None:
    target = make_tiny_llama(VOCAB, seed=5, hidden_size=32, intermediate_size=64)
    draft = make_tiny_llama(VOCAB, seed=3, hidden_size=32, intermediate_size=64)
    batch = collate(synthetic_examples(3))
    logp = teacher_logprobs(target, batch.inputs, batch.start)
    loss, (ce, _, _) = compute_loss(draft, *batch.arrays(), logp, start=batch.start, loss=kind)
    labels = np.array(batch.labels)[:, batch.start :]
    per_pos = np.array(divergence(kind, draft(batch.inputs)[:, batch.start :], logp))
    assert loss.item() == pytest.approx(per_pos[labels != IGNORE].mean(), rel=1e-4)
    assert ce.item() > 0  # still reported next to the loss
    # logits from `start` only give the loss of the whole sequence
    slow = compute_loss(
        draft, *batch.arrays(), teacher_logprobs(target, batch.inputs, 0), start=0, loss=kind
    )[0]
    assert slow.item() == pytest.approx(loss.item(), rel=1e-5)
    # rejected positions weighted up: 1 + w on them
    weighted = compute_loss(
        draft, *batch.arrays(), logp, start=batch.start, loss=kind, disagreement_weight=2.0
    )[0]
    rejected = np.array(batch.rejected)[:, batch.start :]
    want = (per_pos * (1 + 2.0 * rejected))[labels != IGNORE].sum() / (labels != IGNORE).sum()
    assert weighted.item() == pytest.approx(want, rel=1e-4)
    with pytest.raises(ValueError, match="needs the target's log-probabilities"):
        compute_loss(draft, *batch.arrays(), start=batch.start, loss=kind)


def test_a_pruned_draft_is_distilled_over_its_columns() -> None:
    target = make_tiny_llama(VOCAB, seed=5, hidden_size=32, intermediate_size=64)
    draft = make_tiny_llama(VOCAB, seed=3, hidden_size=32, intermediate_size=64)
    ids = list(range(0, VOCAB, 2))
    prune_head(draft, ids)
    batch = collate(synthetic_examples(2))
    logp = teacher_logprobs(target, batch.inputs, batch.start, mx.array(ids, dtype=mx.uint32))
    assert logp.shape[-1] == len(ids)
    # the target's full-vocabulary log-probabilities at the columns, not renormalised
    full = teacher_logprobs(target, batch.inputs, batch.start)
    assert mx.allclose(logp, full[..., mx.array(ids)], atol=1e-6).item()
    loss = compute_loss(draft, *batch.arrays(), logp, start=batch.start, loss="tvd")[0]
    assert np.isfinite(loss.item()) and loss.item() > 0


def _acceptance(target, draft, rows, temperature):
    return teacher_forced_acceptance(target, draft, rows, temperature).rate


def test_teacher_forced_acceptance_matches_its_definition() -> None:
    target = make_tiny_llama(VOCAB, seed=5, hidden_size=32, intermediate_size=64)
    draft = make_tiny_llama(VOCAB, seed=3, hidden_size=32, intermediate_size=64)
    rows = [([3, 4, 5], [6, 7, 8, 9]), ([10, 11], [12, 13])]
    assert _acceptance(target, target, rows, 0.7) == pytest.approx(1.0, abs=1e-5)
    assert _acceptance(target, target, rows, 0.0) == 1.0
    total, n = 0.0, 0
    for prompt, output in rows:
        tokens = mx.array(prompt + output[:-1])[None]
        p = _softmax(np.array(target(tokens)[0, len(prompt) - 1 :], dtype=np.float64) / 0.7)
        q = _softmax(np.array(draft(tokens)[0, len(prompt) - 1 :], dtype=np.float64) / 0.7)
        total += np.minimum(p, q).sum()
        n += len(output)
    assert _acceptance(target, draft, rows, 0.7) == pytest.approx(total / n, rel=1e-4)


@pytest.mark.parametrize("kind", LOSSES[1:])
def test_distilling_raises_the_expected_acceptance(kind: str) -> None:
    """Trained on nothing but the target's distribution (the output tokens are not the
    target's), the draft moves toward the target on those sequences: expected acceptance up,
    greedy and sampled."""
    target = make_tiny_llama(
        VOCAB, seed=5, hidden_size=32, intermediate_size=64, num_hidden_layers=4, lm_head_scale=2
    )
    draft = make_layer_skip_draft(target, [0, 1])  # as the default draft: an early exit
    apply_lora(draft, LoraSettings(rank=8, dropout=0.0, scale=10.0))
    examples = synthetic_examples(12, seed=4)
    rows = [
        (e.inputs[: e.first_target + 1], e.inputs[e.first_target + 1 :] + e.labels[-1:])
        for e in examples
    ]
    before = {t: _acceptance(target, draft, rows, t) for t in (0.0, 0.7)}
    trainer = Trainer(draft, cfg(loss=kind, learning_rate=3e-3), total_steps=36, teacher=target)
    stats = trainer.fit(examples, epochs=3)
    assert stats.steps == 36 and stats.skipped_micro_batches == 0
    assert np.mean(stats.losses[-6:]) < 0.8 * np.mean(stats.losses[:6])
    after = {t: _acceptance(target, draft, rows, t) for t in (0.0, 0.7)}
    assert after[0.7] > before[0.7] + 0.1, (before, after)
    assert after[0.0] > before[0.0] + 0.1, (before, after)


def test_a_divergence_loss_needs_a_teacher() -> None:
    draft = make_tiny_llama(VOCAB, seed=3, hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match="needs the target model as teacher"):
        Trainer(draft, cfg(loss="fkl"), total_steps=1)


def test_a_run_distils_from_the_target(tmp_path: Path) -> None:
    """`run_training` with a divergence loss: the training process's target is the teacher;
    the loss logged is the divergence, the run gains held-out agreement."""
    model_dir = write_model_dir(tmp_path / "model", WORDS, VOCAB, seed=2)
    data_dir = tmp_path / "data"
    make_buffer(data_dir)
    config = write_config(tmp_path, str(model_dir), epochs=2, loss="jsd", disagreement_weight=1.0)
    settings, _ = load_settings(config, {"paths.data_dir": str(data_dir)})
    assert settings.training.loss == "jsd"
    configure_logging(settings.logging.level, settings.log_file, "off")
    try:
        m = run_training(settings, out_dir=tmp_path / "a1", run_id="run-1")
    finally:
        configure_logging("info", None, "off")
    assert m.steps > 0 and m.loss_last < m.loss_first
    assert m.loss_first < 2.0  # a JSD (at most log 2, x2 where rejected), not a 64-way CE
    # the draft's own disagreements were weighted, beyond the two recorded per failure
    assert m.examples.disagreement_positions > 0
    plan = (tmp_path / "specd.log").read_text()
    assert '"loss": "jsd"' in plan


def test_an_unknown_loss_is_a_config_error(tmp_path: Path) -> None:
    from daemon.errors import ConfigError

    config = write_config(tmp_path, "x", loss="kl")
    with pytest.raises(ConfigError, match="training.loss"):
        load_settings(config, {})


def test_bench_train_compares_losses_on_one_buffer(tmp_path: Path) -> None:
    from daemon.bench.train import bench_losses

    model_dir = write_model_dir(tmp_path / "model", WORDS, VOCAB, seed=2)
    data_dir = tmp_path / "data"
    make_buffer(data_dir)
    config = write_config(tmp_path, str(model_dir), epochs=1)
    settings, _ = load_settings(config, {"paths.data_dir": str(data_dir)})
    rows = bench_losses(settings, ["ce", "tvd"], temperature=0.7, epochs=1)
    assert list(rows) == ["untrained", "ce", "tvd"]
    for name in ("ce", "tvd"):
        row = rows[name]
        assert row["loss"] == name and row["steps"] > 0 and row["temperature"] == 0.7
        # each run starts from the untrained draft: the same "before"
        assert row["heldout_before"] == rows["ce"]["heldout_before"]
        assert 0.0 <= row["acceptance_sampled"] <= 1.0
        assert 0.0 <= row["acceptance_greedy"] <= 1.0
    assert set(rows["untrained"]) == {"acceptance_greedy", "acceptance_sampled"}


def test_disagreements_of_the_draft_in_training_are_marked_rejected() -> None:
    from daemon.adaptation.data import mark_disagreements

    draft = make_tiny_llama(VOCAB, seed=3, hidden_size=32, intermediate_size=64)
    examples = synthetic_examples(4)
    recorded = [list(e.rejected) for e in examples]
    added = mark_disagreements(draft, examples)
    want = 0
    for ex, before in zip(examples, recorded, strict=True):
        guess = np.array(mx.argmax(draft(mx.array(ex.inputs)[None])[0], axis=-1))
        wrong = {i for i, t in enumerate(ex.labels) if t != IGNORE and int(guess[i]) != t}
        assert set(ex.rejected) == wrong | set(before)  # recorded ones kept, no duplicates
        assert len(ex.rejected) == len(set(ex.rejected))
        want += len(wrong - set(before))
    assert added == want > 0
    # marked once: a second pass with the same draft adds nothing
    assert mark_disagreements(draft, examples) == 0


def test_the_teacher_rows_are_kept_across_epochs_and_padded_like_the_batch() -> None:
    from daemon.adaptation.data import build_example

    target = make_tiny_llama(VOCAB, seed=5, hidden_size=32, intermediate_size=64)
    draft = make_tiny_llama(VOCAB, seed=3, hidden_size=32, intermediate_size=64)
    prune_head(draft, list(range(0, VOCAB, 3)))
    trainer = Trainer(draft, cfg(loss="fkl"), total_steps=1, teacher=target)
    examples = [
        build_example([4, 5, 6, 7, 8], [9, 10, 11], max_prompt=99, max_output=99),
        build_example([4, 5], [12, 13, 14, 15, 16, 17], max_prompt=99, max_output=99),
        build_example([7, 8, 9], [20, 21], max_prompt=99, max_output=99),
    ]
    batch = collate(examples)
    whole = trainer.target_logprobs(batch)  # the padded batch through the target at once
    cached = trainer.target_logprobs(batch, examples)
    assert whole is not None and cached is not None and cached.shape == whole.shape
    outputs = np.array(batch.labels)[:, batch.start :] != IGNORE
    np.testing.assert_allclose(
        np.array(cached)[outputs], np.array(whole)[outputs], rtol=2e-3, atol=2e-3
    )
    assert len(trainer._teacher_cache) == 3
    again = trainer.target_logprobs(batch, examples)
    assert again is not None and mx.array_equal(again, cached).item()
    # a fit frees the cache at its end
    trainer.fit(examples, epochs=1)
    assert trainer._teacher_cache == {} and trainer._cache_bytes == 0
