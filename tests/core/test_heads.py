"""The pruned draft head (FR-Spec): its logits, its subset rules and losslessness."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import TokenizerWrapper

from daemon.core.engine import SamplingParams, SpeculativeConfig, SpeculativeEngine
from daemon.core.heads import (
    default_head_tokens,
    frequent_tokens,
    output_head,
    prune_head,
    pruned_head,
)
from daemon.core.models import make_layer_skip_draft
from daemon.errors import ModelLoadError
from tests.helpers import TINY_CORPUS, perturbed_copy, tiny_model


def target_greedy(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    """Target-only greedy decoding through mlx-lm, with clear top-2 margins asserted (a
    near-tie could flip between a k+1-row and a 1-row pass)."""
    out = []
    for tok, logprobs in generate_step(mx.array(prompt), model, max_tokens=n):
        top2 = mx.sort(logprobs)[-2:].tolist()
        assert top2[1] - top2[0] > 1e-4, "test model has a near-tie; change its seed"
        out.append(int(tok))
    return out


def test_pruned_logits_are_the_full_ones_on_the_subset() -> None:
    model = tiny_model(vocab=40, layers=2)
    x = mx.array([[3, 7, 11, 2]])
    full = model(x)
    ids = [0, 5, 7, 11, 39]
    prune_head(model, ids)
    cut = model(x)
    assert cut.shape == full.shape
    keep = mx.array(ids)
    assert mx.allclose(cut[..., keep], full[..., keep], atol=1e-5).item()
    outside = [i for i in range(40) if i not in ids]
    assert mx.all(cut[..., mx.array(outside)] == -mx.inf).item()
    # nothing of the head is a parameter (never trained, never saved in an adapter)
    names = {k for k, _ in nn.utils.tree_flatten(model.parameters())}
    assert not [n for n in names if "pruned" in n]
    assert pruned_head(model) is not None and output_head(model) is pruned_head(model)


def test_tied_and_quantized_heads_prune_to_the_same_rows() -> None:
    model = tiny_model(vocab=64, layers=2)
    model.args.tie_word_embeddings = True
    del model["lm_head"]
    nn.quantize(model, group_size=32, bits=8)
    x = mx.array([[1, 2, 3]])
    full = model(x)
    ids = list(range(0, 64, 3))
    prune_head(model, ids)
    assert mx.allclose(model(x)[..., mx.array(ids)], full[..., mx.array(ids)], atol=1e-4).item()


def test_a_layer_skip_draft_prunes_without_touching_the_target() -> None:
    target = tiny_model(vocab=40, layers=4)
    before = target(mx.array([[1, 2]]))
    draft = make_layer_skip_draft(target, [0, 1])
    prune_head(draft, [1, 2, 3])
    assert type(target).__call__ is not type(draft).__call__
    assert mx.array_equal(target(mx.array([[1, 2]])), before).item()
    prune_head(draft, [4, 5])  # a second cut replaces the first
    head = pruned_head(draft)
    assert head is not None and head.token_ids() == [4, 5]


def test_bad_subsets_are_refused() -> None:
    model = tiny_model(vocab=40, layers=2)
    with pytest.raises(ModelLoadError, match="at least one"):
        prune_head(model, [])
    with pytest.raises(ModelLoadError, match=r"\[0, 40\)"):
        prune_head(model, [3, 40])


def test_subset_rules() -> None:
    assert default_head_tokens(4, 100, special=[99]) == [0, 1, 2, 99]
    outputs = [[50, 50, 50, 60, 60, 70], [50, 80]]
    assert frequent_tokens(outputs, 3, 100, special=[99]) == [50, 60, 99]
    # too little traffic: filled with the default list
    assert frequent_tokens([[50]], 4, 100) == [0, 1, 2, 50]


def test_greedy_is_the_targets_with_a_pruned_draft(tiny_tokenizer, tiny_target) -> None:
    """The draft can never propose what the target picks outside the subset: those rounds
    are rejected and corrected, and the output stays the target's token for token."""
    draft = perturbed_copy(tiny_target, seed=1, noise=0.2)
    prune_head(draft, list(range(0, len(tiny_tokenizer), 2)))  # half the vocabulary
    cfg = SpeculativeConfig(num_draft_tokens=3, min_draft_tokens=1, max_draft_tokens=5)
    tok = TokenizerWrapper(
        tiny_tokenizer._tokenizer, detokenizer_class=type(tiny_tokenizer._detokenizer)
    )
    tok.eos_token_ids = []  # full-length outputs
    engine = SpeculativeEngine(tiny_target, draft, tok, cfg)
    drafted = accepted = 0
    odd_targets = 0
    for text in TINY_CORPUS[:8]:
        prompt = tiny_tokenizer.encode(text)
        res = engine.run(prompt, SamplingParams(max_tokens=24))
        assert res.tokens == target_greedy(tiny_target, prompt, 24)
        drafted += res.stats.drafted
        accepted += res.stats.accepted
        assert all(r.draft_token % 2 == 0 for r in res.rejections)
        odd_targets += sum(t % 2 for t in res.tokens)
    assert odd_targets and 0 < accepted < drafted
