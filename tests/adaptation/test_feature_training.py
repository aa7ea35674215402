"""Training a feature draft (``models.draft: feature``): the loss with EAGLE's regression term,
the trainer's cached target features, a run that starts from the layer-skip draft in service
and stores a whole-draft version, loading that version, continuing it, and the gate pricing a
candidate of another kind with its own draft cost."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from daemon.adaptation.data import collate
from daemon.adaptation.gate import _gate_costs
from daemon.adaptation.loss import compute_loss
from daemon.adaptation.run import run_training
from daemon.adaptation.trainer import Trainer
from daemon.config import load_settings
from daemon.core.feature_draft import (
    is_feature_draft,
    make_feature_draft,
    perturb,
    resolve_taps,
    target_hidden,
)
from daemon.core.heads import output_head
from daemon.core.models import load_pair
from daemon.core.speed import StepCosts
from daemon.errors import AdapterError, ModelLoadError
from daemon.store.adapters import ADAPTER_CONFIG, load_adapter_dir
from tests.adaptation.test_training import (
    VOCAB,
    WORDS,
    cfg,
    make_buffer,
    synthetic_examples,
    write_config,
)
from tests.helpers import make_tiny_llama, write_model_dir


def test_the_regression_term_is_the_smooth_l1_of_output_and_target_features() -> None:
    target = make_tiny_llama(VOCAB, seed=3)
    draft = make_feature_draft(target)
    batch = collate(synthetic_examples(3))
    plain, (ce, _, _) = compute_loss(draft, *batch.arrays(), start=batch.start)
    total, _ = compute_loss(draft, *batch.arrays(), start=batch.start, regression_weight=0.5)
    out, feats = draft.teacher_forced(batch.inputs)
    diff = np.abs(np.array(out - feats))
    l1 = np.where(diff < 1.0, 0.5 * diff**2, diff - 0.5).mean(axis=-1)
    outputs = np.array(batch.labels) != -100
    expected = float(ce.item()) + 0.5 * l1[outputs].sum() / outputs.sum()
    assert plain.item() == pytest.approx(ce.item(), rel=1e-5)
    assert total.item() == pytest.approx(expected, rel=1e-4)


def test_the_trainer_keeps_each_examples_features_and_they_are_the_targets() -> None:
    target = make_tiny_llama(VOCAB, seed=3)
    draft = make_feature_draft(target)
    examples = synthetic_examples(4)
    trainer = Trainer(draft, cfg(feature_regression=1.0), total_steps=8)
    batch = collate(examples[:2])
    feats = trainer.target_features(batch, examples[:2])
    assert feats is not None and len(trainer._teacher_cache) == 2
    first = mx.array(examples[0].inputs)[None]
    n = first.shape[1]
    assert mx.allclose(feats[0, :n], target_hidden(target, first)[0], atol=1e-5)
    stats = trainer.fit(examples, epochs=2)
    assert stats.steps == 8 and stats.losses[-1] < stats.losses[0]
    assert not trainer._teacher_cache  # freed at the end of the fit


@pytest.fixture
def feature_setup(tmp_path: Path):
    model_dir = write_model_dir(tmp_path / "model", WORDS, VOCAB, seed=2)
    data_dir = tmp_path / "data"
    make_buffer(data_dir)
    config = write_config(tmp_path, str(model_dir), epochs=8, replay_ratio=0.2)
    settings, _ = load_settings(
        config,
        {
            "paths.data_dir": str(data_dir),
            "models.draft": "feature",
            "models.feature_layers": [0],  # the tiny target's first layer, beside its final one
            "training.warmup_steps": 0,
            "training.learning_rate": 1e-2,
        },
    )
    return settings, data_dir


def test_a_feature_run_starts_from_the_served_draft_and_stores_a_whole_draft(
    feature_setup, tmp_path: Path
) -> None:
    settings, data_dir = feature_setup
    pair = load_pair(settings)
    assert pair.learns_features and not is_feature_draft(pair.draft)  # layer-skip until trained
    m = run_training(settings, out_dir=tmp_path / "a1", pair=pair)
    assert m.draft_kind == "feature"
    # its own passes (training.feature_epochs), not the LoRA draft's training.epochs (8 here)
    assert m.epochs == settings.training.feature_epochs == 6
    assert m.costs is not None and m.costs_before is not None  # two kinds, each timed
    assert m.heldout_after.agreement > m.heldout_before.agreement
    config = json.loads((tmp_path / "a1" / ADAPTER_CONFIG).read_text())
    assert config["fine_tune_type"] == "feature" and config["taps"] == [0]
    # a version reads the layers it was trained with, whatever models.feature_layers says now
    untapped = load_pair(
        settings.model_copy(
            update={"models": settings.models.model_copy(update={"feature_layers": []})}
        )
    )
    assert untapped.feature_taps == ()
    assert load_adapter_dir(untapped.fresh_draft, tmp_path / "a1").taps == (0,)
    fresh = load_pair(settings)
    served = load_adapter_dir(fresh.fresh_draft, tmp_path / "a1")
    assert is_feature_draft(served)
    # the loaded version scores what the run measured after training
    make_buffer(data_dir, n_fail=4, n_ok=0, n_holdout=0)
    m2 = run_training(settings, out_dir=tmp_path / "a2", init_adapter=tmp_path / "a1", pair=fresh)
    assert m2.heldout_before.agreement == pytest.approx(m.heldout_after.agreement)
    assert m2.costs_before is None  # same kind as the version in service


def test_a_broken_feature_version_is_refused(feature_setup, tmp_path: Path) -> None:
    settings, _ = feature_setup
    pair = load_pair(settings)
    run_training(settings, out_dir=tmp_path / "a1", pair=pair, epochs=1)
    weights = tmp_path / "a1" / "adapters.safetensors"
    arrays = mx.load(str(weights))
    arrays.pop("fc.weight")
    mx.save_safetensors(str(weights), arrays)
    with pytest.raises(Exception, match="does not fit the draft"):
        load_adapter_dir(pair.fresh_draft, tmp_path / "a1")


def test_a_version_tapping_a_layer_the_target_lacks_is_refused(
    feature_setup, tmp_path: Path
) -> None:
    settings, _ = feature_setup
    pair = load_pair(settings)
    run_training(settings, out_dir=tmp_path / "a1", pair=pair, epochs=1)
    path = tmp_path / "a1" / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "taps": [9]}))
    with pytest.raises(AdapterError, match="taps: layer 9 is outside the target's 6 layers"):
        load_adapter_dir(pair.fresh_draft, tmp_path / "a1")
    path.write_text(json.dumps({**config, "taps": "low"}))
    with pytest.raises(AdapterError, match="taps must be a list of layer indices"):
        load_adapter_dir(pair.fresh_draft, tmp_path / "a1")


def test_feature_layers_auto_is_eagle3s_choice_and_a_list_is_checked() -> None:
    assert resolve_taps("auto", 30) == (2, 15, 27)
    assert resolve_taps("auto", 6) == (2, 3)
    assert resolve_taps("auto", 4) == ()
    assert resolve_taps([1, 0], 2) == (1, 0)
    with pytest.raises(ModelLoadError, match="layer 2 is outside the target's 2 layers"):
        resolve_taps([2], 2)


def test_the_gate_prices_a_candidate_of_another_kind_with_its_own_draft_cost() -> None:
    class M:
        costs = StepCosts(0.02, [0.025] * 8, 0.002).to_dict()  # the candidate, run-timed
        costs_before = StepCosts(0.02, [0.025] * 8, 0.006).to_dict()  # the served draft

    live = StepCosts(0.04, [0.05] * 8, 0.012, source="service")
    before, after = _gate_costs(M(), live)  # type: ignore[arg-type]
    # both timed by the run, back to back: the live figures do not enter
    assert before == StepCosts.from_dict(M.costs_before)
    assert after is not None and after.draft == pytest.approx(0.002)
    M.costs_before = None  # same kind: the run's figures for both
    assert _gate_costs(M(), live) == (StepCosts.from_dict(M.costs), None)  # type: ignore[arg-type]
    M.costs = None  # the run timed nothing (a split target): the live engine's
    assert _gate_costs(M(), live) == (live, None)  # type: ignore[arg-type]


def test_the_second_step_reads_the_drafts_own_features_and_the_next_label() -> None:
    target = make_tiny_llama(VOCAB, seed=3)
    draft = make_feature_draft(target)
    batch = collate(synthetic_examples(2))
    plain, _ = compute_loss(draft, *batch.arrays(), start=batch.start)
    total, _ = compute_loss(draft, *batch.arrays(), start=batch.start, second_step_weight=0.5)
    out, _ = draft.teacher_forced(batch.inputs)
    labels = np.array(batch.labels)
    losses = []
    for b in range(labels.shape[0]):
        for j in range(1, labels.shape[1] - 1):  # entry j + 1 from entry j's own output
            if labels[b, j + 1] == -100:
                continue
            # the context: entries 2 .. j + 1, each from its predecessor's own output
            x = draft.forward(out[b : b + 1, 1 : j + 1], batch.inputs[b : b + 1, 2 : j + 2])
            row = np.array(draft.head(x)[0, -1].astype(mx.float32))
            m = row.max()
            losses.append(m + np.log(np.exp(row - m).sum()) - row[labels[b, j + 1]])
    expected = plain.item() + 0.5 * float(np.mean(losses))
    assert total.item() == pytest.approx(expected, rel=1e-4)


def test_feature_noise_perturbs_what_the_draft_reads_by_each_blocks_scale() -> None:
    target = make_tiny_llama(VOCAB, seed=3)
    draft = make_feature_draft(target, taps=(0,))
    batch = collate(synthetic_examples(2))
    feats = draft.target_features(batch.inputs)
    hidden = draft.fc.weight.shape[0]
    mx.random.seed(0)
    noisy = perturb(feats, 0.1, hidden)
    blocks = np.array(feats.astype(mx.float32)).reshape(*feats.shape[:-1], 2, hidden)
    rms = np.sqrt((blocks**2).mean(axis=-1, keepdims=True))
    delta = np.array(noisy.astype(mx.float32)).reshape(blocks.shape) - blocks
    # within +-0.1 of each block's own RMS (the tap at unit RMS, the final features at theirs)
    assert np.all(np.abs(delta) <= 0.1 * rms + 1e-4)
    assert np.abs(delta).max() > 0.05 * rms.min()
    # the loss reads the perturbed features; the regression target stays the target's own
    plain, _ = compute_loss(draft, *batch.arrays(), start=batch.start, features=feats)
    again, _ = compute_loss(draft, *batch.arrays(), start=batch.start, features=feats)
    noisy_loss, _ = compute_loss(
        draft, *batch.arrays(), start=batch.start, features=feats, feature_noise=0.1
    )
    assert plain.item() == again.item() and noisy_loss.item() != plain.item()
    _, top = draft.teacher_forced(batch.inputs, feats, noise=0.1)
    assert mx.array_equal(top, draft.final(feats))
    # and the trainer hands training.feature_noise to the loss
    losses = []
    for amount in (0.0, 0.1):
        trainer = Trainer(draft, cfg(feature_noise=amount), total_steps=1)
        loss, _ = trainer.loss_fn(draft, *batch.arrays(), start=batch.start, features=feats)
        losses.append(loss.item())
    assert losses[0] != losses[1]


def test_the_prompt_term_labels_each_prompt_position_with_the_targets_own_next_token() -> None:
    target = make_tiny_llama(VOCAB, seed=3)
    draft = make_feature_draft(target)
    examples = synthetic_examples(2, plen=6) + synthetic_examples(1, seed=1, plen=9)
    batch = collate(examples)
    plain, _ = compute_loss(draft, *batch.arrays(), start=batch.start)
    total, _ = compute_loss(draft, *batch.arrays(), start=batch.start, prompt_weight=0.5)
    out, top = draft.teacher_forced(batch.inputs)
    greedy = np.array(mx.argmax(output_head(target)(top), axis=-1))
    logits = np.array(draft.head(out).astype(mx.float32))
    losses = []
    for b, ex in enumerate(examples):
        # entries 1 .. the last before the first output label: the prompt's positions
        for j in range(1, ex.first_target):
            row = logits[b, j]
            m = row.max()
            losses.append(m + np.log(np.exp(row - m).sum()) - row[greedy[b, j]])
    assert len(losses) == 4 + 4 + 7  # prompts of 6, 6 and 9 tokens
    expected = plain.item() + 0.5 * float(np.mean(losses))
    assert total.item() == pytest.approx(expected, rel=1e-4)


def test_the_trainer_computes_the_prompt_labels_once_per_example_and_the_loss_is_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from daemon.adaptation import trainer as trainer_module

    target = make_tiny_llama(VOCAB, seed=3)
    draft = make_feature_draft(target)
    examples = synthetic_examples(2, plen=6) + synthetic_examples(1, seed=1, plen=9)
    trainer = Trainer(draft, cfg(feature_prompt_weight=1.0), total_steps=6)
    calls = []
    real = trainer_module.target_greedy
    monkeypatch.setattr(
        trainer_module, "target_greedy", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    batch = collate(examples)
    feats = trainer.target_features(batch, examples)
    labels = trainer.prompt_labels(batch, examples, feats)
    again = trainer.prompt_labels(batch, examples, feats)
    assert len(calls) == 3 and labels is not None and again is not None
    assert mx.array_equal(labels, again)
    # the loss with the kept labels is the loss that computes them itself
    kept, _ = compute_loss(
        draft,
        *batch.arrays(),
        start=batch.start,
        features=feats,
        prompt_weight=1.0,
        prompt_labels=labels,
    )
    own, _ = compute_loss(
        draft, *batch.arrays(), start=batch.start, features=feats, prompt_weight=1.0
    )
    assert kept.item() == pytest.approx(own.item(), rel=1e-6)
    trainer._prompt_labels.clear()
    stats = trainer.fit(examples, epochs=2)
    assert stats.steps == 6 and not trainer._prompt_labels  # freed at the end of the fit
    assert len(calls) == 3 + 3  # once per example in the fit, not once per step


def _moved(before: dict, draft, prefix: str) -> float:
    """The largest change of any of ``draft``'s parameters under ``prefix`` since ``before``."""
    from mlx.utils import tree_flatten

    return max(
        float(mx.abs(v - before[k]).max())
        for k, v in tree_flatten(draft.parameters())
        if k.startswith(prefix)
    )


def test_the_layer_learns_at_its_own_fraction_of_the_rate() -> None:
    from mlx.utils import tree_flatten

    target = make_tiny_llama(VOCAB, seed=3)
    moved = {}
    for scale in (1.0, 0.25):
        draft = make_feature_draft(target)
        before = {k: mx.array(v) for k, v in tree_flatten(draft.parameters())}
        trainer = Trainer(draft, cfg(feature_layer_lr=scale), total_steps=1)
        stats = trainer.fit(synthetic_examples(1), epochs=1)
        assert stats.steps == 1
        moved[scale] = (_moved(before, draft, "layers."), _moved(before, draft, "fc."))
    # Adam's first step moves each parameter by about its rate: the layer by a quarter of it,
    # the projection by the whole
    assert moved[1.0][0] == pytest.approx(1e-3, rel=0.05)
    assert moved[0.25][0] == pytest.approx(0.25e-3, rel=0.05)
    assert moved[0.25][1] == pytest.approx(1e-3, rel=0.05)


def test_a_frozen_layer_stays_the_targets_last_and_the_projections_still_learn(
    feature_setup, tmp_path: Path
) -> None:
    settings, _ = feature_setup
    settings = settings.model_copy(
        update={"training": settings.training.model_copy(update={"feature_layer_lr": 0.0})}
    )
    pair = load_pair(settings)
    m = run_training(settings, out_dir=tmp_path / "a1", pair=pair, epochs=2)
    fresh = pair.fresh_feature_draft()
    served = load_adapter_dir(load_pair(settings).fresh_draft, tmp_path / "a1")
    from mlx.utils import tree_flatten

    start = {k: v for k, v in tree_flatten(fresh.parameters())}
    assert _moved(start, served, "layers.") == 0.0
    assert _moved(start, served, "fc.") > 0.0 and _moved(start, served, "fuse.") > 0.0
    assert m.trainable_parameters == sum(
        v.size for k, v in tree_flatten(fresh.parameters()) if not k.startswith("layers.")
    )
