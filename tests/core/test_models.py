"""Model loading: layer-skip drafts, backend preparation, target/draft vocabulary checks."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.llama import Model
from mlx_lm.tuner.utils import linear_to_lora_layers

from daemon.config import Settings, load_settings
from daemon.core.models import ModelLoadError, check_vocab, load_pair, make_layer_skip_draft
from tests.helpers import tiny_model, write_model_dir


def reference_forward(target: Model, layers: list[int], tokens: mx.array) -> mx.array:
    """Run only ``layers`` of the target by hand."""
    from mlx_lm.models.base import create_attention_mask

    h = target.model.embed_tokens(tokens)
    mask = create_attention_mask(h, None)
    for i in layers:
        h = target.model.layers[i](h, mask, None)
    return target.lm_head(target.model.norm(h))


def test_layer_skip_draft_runs_the_chosen_layers() -> None:
    target = tiny_model()
    layers = [0, 2, 5]
    draft = make_layer_skip_draft(target, layers)
    assert len(draft.layers) == 3
    tokens = mx.array([[1, 5, 7, 3, 9]])
    assert mx.allclose(draft(tokens), reference_forward(target, layers, tokens), atol=1e-5)


def test_layer_skip_draft_shares_arrays_but_owns_modules() -> None:
    target = tiny_model()
    draft = make_layer_skip_draft(target, [1, 4])
    assert draft.model.layers[0] is not target.model.layers[1]
    assert draft.model.layers[1].mlp.up_proj.weight is target.model.layers[4].mlp.up_proj.weight
    assert draft.model.embed_tokens.weight is target.model.embed_tokens.weight

    # LoRA put into the draft must never reach the target.
    before = target(mx.array([[1, 2, 3]]))
    draft.freeze()
    linear_to_lora_layers(draft, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    for _, m in target.named_modules():
        assert "LoRA" not in type(m).__name__
    assert any("LoRA" in type(m).__name__ for _, m in draft.named_modules())
    assert mx.array_equal(before, target(mx.array([[1, 2, 3]])))


def test_layer_skip_draft_of_quantized_target() -> None:
    target = tiny_model(vocab=64)
    nn.quantize(target, group_size=32, bits=4)
    draft = make_layer_skip_draft(target, [0, 3])
    assert isinstance(draft.model.layers[1].self_attn.q_proj, nn.QuantizedLinear)
    tokens = mx.array([[4, 8, 15, 16, 23, 42]])
    assert mx.allclose(draft(tokens), reference_forward(target, [0, 3], tokens), atol=1e-4)


def test_layer_skip_draft_rejects_bad_indices() -> None:
    with pytest.raises(ModelLoadError, match=r"out of range: the target has 6 layers"):
        make_layer_skip_draft(tiny_model(), [0, 6])


def test_load_pair_with_separate_draft_and_padded_vocab(tmp_path: Path) -> None:
    words = ["the", "cat", "sat", "on", "mat"]
    t = write_model_dir(tmp_path / "target", words, vocab_size=48, seed=1)
    # Same tokenizer, differently padded embedding table: compatible.
    d = write_model_dir(tmp_path / "draft", words, vocab_size=40, seed=2)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(json.dumps({"models": {"target": str(t), "draft": str(d)}}))
    settings, _ = load_settings(cfg, {"paths.data_dir": str(tmp_path / "data")})
    pair = load_pair(settings)
    assert pair.draft_kind == "model"
    assert pair.target.args.vocab_size == 48 and pair.draft.args.vocab_size == 40
    assert pair.dtype == "float32"


def test_vocabulary_mismatch_names_both_models(tmp_path: Path) -> None:
    t = write_model_dir(tmp_path / "target", ["the", "cat", "sat"], vocab_size=40, seed=1)
    d = write_model_dir(tmp_path / "draft", ["the", "dog", "sat"], vocab_size=40, seed=2)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(json.dumps({"models": {"target": str(t), "draft": str(d)}}))
    settings, _ = load_settings(cfg, {"paths.data_dir": str(tmp_path / "data")})
    with pytest.raises(ModelLoadError) as exc:
        load_pair(settings)
    msg = str(exc.value)
    assert str(t) in msg and str(d) in msg and "tokenizer vocabulary" in msg
    assert "cat" in msg and "dog" in msg


def test_check_vocab_compares_token_by_token(tmp_path: Path) -> None:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    # Two tokenizers loaded from two directories: equal vocabularies, padded tables differ.
    a = load_tokenizer(write_model_dir(tmp_path / "a", ["x", "y", "z"], vocab_size=48, seed=1))
    b = load_tokenizer(write_model_dir(tmp_path / "b", ["x", "y", "z"], vocab_size=40, seed=2))
    assert a is not b and a.get_vocab() == b.get_vocab()
    check_vocab(a, b, "a", "b")  # compatible: returns without raising

    # Same size, one token renamed: vocab_size agrees, the vocabulary does not.
    c = load_tokenizer(write_model_dir(tmp_path / "c", ["x", "y", "w"], vocab_size=48, seed=3))
    assert len(c.get_vocab()) == len(a.get_vocab())
    with pytest.raises(ModelLoadError, match=r"only in target: \['z'\].*only in draft: \['w'\]"):
        check_vocab(a, c, "a", "c")
    # Same tokens, different ids: also incompatible.
    d = load_tokenizer(write_model_dir(tmp_path / "d", ["y", "x", "z"], vocab_size=48, seed=4))
    with pytest.raises(ModelLoadError, match="different ids for"):
        check_vocab(a, d, "a", "d")


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(json.dumps({"models": {"target": str(tmp_path / "nowhere")}}))
    settings, _ = load_settings(cfg, {"paths.data_dir": str(tmp_path / "data")})
    with pytest.raises(ModelLoadError, match="nowhere"):
        load_pair(settings)


@pytest.mark.slow
def test_default_model_import_is_idempotent(tmp_path: Path) -> None:
    from daemon.core.gguf import MARKER_NAME
    from daemon.core.models import ensure_embedded_model

    first = ensure_embedded_model(tmp_path / "models")
    marker = first / MARKER_NAME
    stamp = (marker.stat().st_mtime_ns, (first / "model.safetensors").stat().st_mtime_ns)
    second = ensure_embedded_model(tmp_path / "models")
    assert second == first
    assert (marker.stat().st_mtime_ns, (first / "model.safetensors").stat().st_mtime_ns) == stamp
    # A half-written import (no completion marker) is never trusted: it is redone.
    marker.unlink()
    third = ensure_embedded_model(tmp_path / "models")
    assert (third / MARKER_NAME).exists()


def test_the_default_draft_is_a_feature_draft_where_the_target_allows_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from structlog.testing import capture_logs

    t = write_model_dir(tmp_path / "target", ["the", "cat", "sat"], vocab_size=40, seed=1)

    def settings_with(models: dict[str, object]) -> Settings:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(json.dumps({"models": {"target": str(t), **models}}))
        return load_settings(cfg, {"paths.data_dir": str(tmp_path / "data")})[0]

    default = settings_with({"targets": {"other": {"target": str(t)}}})
    assert default.models.draft == "auto" and default.models.entry("other").draft == "auto"
    pair = load_pair(default)
    assert pair.learns_features and pair.feature_taps
    assert pair.draft_id.startswith("feature (until trained: layer-skip")
    # null keeps the LoRA-adapted layer-skip draft; so does a target read for a group's
    # training (rank 0 holds no whole forward of it)
    assert load_pair(settings_with({"draft": None})).draft_kind == "layer-skip"
    assert load_pair(default, lazy_target=True).draft_kind == "layer-skip"
    # a layer the target lacks is a configuration error, not a reason to fall back
    with pytest.raises(ModelLoadError, match="models.feature_layers: layer 99"):
        load_pair(settings_with({"feature_layers": [99]}))
    # a family that does not expose its hidden states: auto falls back and says why,
    # feature refuses to start
    monkeypatch.setattr("daemon.core.feature_draft.PLAIN_HEAD_MODULES", ("mlx_lm.models.qwen3",))
    with capture_logs() as logs:
        assert load_pair(default).draft_kind == "layer-skip"
    [event] = [e for e in logs if e["event"] == "draft_auto"]
    assert "llama" in event["reason"] and event["draft"] == "layer-skip"
    with pytest.raises(ModelLoadError, match="feature draft needs the target's hidden states"):
        load_pair(settings_with({"draft": "feature"}))
