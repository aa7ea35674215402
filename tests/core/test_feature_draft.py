"""The feature draft (EAGLE-style, `daemon.core.feature_draft`) in the engine: greedy output is
the target's token for token on every path (fixed and adaptive rounds, chunked prefill, a
prompt-cache hit, a hand-over back from the batch), sampled output is distributed as the
target's, and the teacher-forced view training uses equals what the engine drafts with."""

from __future__ import annotations

import random

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from daemon.core.engine import (
    GenerationResult,
    Handoff,
    SamplingParams,
    SpeculativeConfig,
    SpeculativeEngine,
)
from daemon.core.feature_draft import (
    FeatureDraft,
    is_feature_draft,
    make_feature_draft,
    target_hidden,
)
from daemon.core.heads import prune_head
from daemon.core.prompt_cache import PromptCache
from tests.core import test_lossless_sampling as lossless
from tests.helpers import make_tiny_llama

PROMPT_LEN = 6


def greedy(target: nn.Module, prompt: list[int], n: int) -> list[int]:
    cache = make_prompt_cache(target)
    logits = target(mx.array(prompt)[None], cache=cache)[0, -1]
    out: list[int] = []
    for _ in range(n):
        t = int(mx.argmax(logits).item())
        out.append(t)
        logits = target(mx.array([[t]]), cache=cache)[0, -1]
    return out


def fit(draft: FeatureDraft, rows: list[list[int]], start: int, steps: int) -> None:
    """A few Adam steps of cross-entropy on the rows' outputs (from ``start``)."""
    x = mx.array(rows)

    def loss(model: nn.Module, x: mx.array) -> mx.array:
        return nn.losses.cross_entropy(model(x[:, :-1])[:, start - 1 :], x[:, start:]).mean()

    opt = optim.Adam(learning_rate=3e-3)
    step = nn.value_and_grad(draft, loss)
    draft.train()
    for _ in range(steps):
        _, grads = step(draft, x)
        opt.update(draft, grads)
        mx.eval(draft.parameters(), opt.state)
    draft.eval()


@pytest.fixture(scope="module", params=[(), (0,)], ids=["final", "tapped"])
def trained(tiny_tokenizer, request):
    """A tiny target, its greedy answers to random prompts, and a feature draft fitted to
    them (it agrees on most of them): reading the final features alone, or also the first
    layer's output (EAGLE-3's taps; fitted, its fold weighs them)."""
    vocab = len(tiny_tokenizer)
    target = make_tiny_llama(vocab, seed=0)
    rng = random.Random(0)
    rows = []
    for _ in range(48):
        prompt = [rng.randrange(5, vocab) for _ in range(PROMPT_LEN)]
        rows.append(prompt + greedy(target, prompt, 24))
    draft = make_feature_draft(target, taps=request.param)
    fit(draft, rows, PROMPT_LEN, 120)
    if request.param:  # the fold learned to read the tapped layer
        assert mx.abs(draft.fuse.weight[:, :64]).max().item() > 1e-3
    return target, draft, rows, no_eos(tiny_tokenizer)


def no_eos(tokenizer: TokenizerWrapper) -> TokenizerWrapper:
    """The tokenizer without an EOS token: every answer runs to max_tokens."""
    tok = TokenizerWrapper(tokenizer._tokenizer, detokenizer_class=type(tokenizer._detokenizer))
    tok.eos_token_ids = []
    return tok


def run_greedy(engine: SpeculativeEngine, prompt: list[int], n: int):
    result = engine.run(prompt, SamplingParams(max_tokens=n))
    assert result.tokens == greedy(engine.target, prompt, n)
    return result


def _qwen3() -> nn.Module:
    from mlx_lm.models import qwen3

    mx.random.seed(4)
    model = qwen3.Model(
        qwen3.ModelArgs(
            model_type="qwen3",
            hidden_size=32,
            num_hidden_layers=3,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            vocab_size=50,
            max_position_embeddings=256,
            rope_theta=10000.0,
            head_dim=8,
            tie_word_embeddings=True,
        )
    )
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tapped_features_are_the_layers_outputs_then_the_final_ones(family) -> None:
    target = (
        make_tiny_llama(50, hidden_size=32, num_hidden_layers=3) if family == "llama" else _qwen3()
    )
    inputs = mx.array([[3, 9, 4, 17, 8]])
    features = target_hidden(target, inputs, taps=(2, 0))
    inner = target.model
    h, outs = inner.embed_tokens(inputs), []
    mask = create_attention_mask(h, None)
    for layer in inner.layers:
        h = layer(h, mask, cache=None)
        outs.append(h)
    unit = [o * mx.rsqrt(mx.mean(mx.square(o), axis=-1, keepdims=True) + 1e-6) for o in outs]
    assert features.shape == (1, 5, 3 * 32)
    assert mx.allclose(features[..., :32], unit[2], atol=1e-4)
    assert mx.allclose(features[..., 32:64], unit[0], atol=1e-4)
    assert mx.allclose(features[..., 64:], target_hidden(target, inputs), atol=1e-5)
    assert all(type(m).__name__ == "TransformerBlock" for m in inner.layers)  # put back


def test_the_draft_layer_of_a_quantized_target_is_float_and_trained() -> None:
    """On Metal a 4-bit target stays quantized; a quantized layer's weights are frozen, so a
    feature draft copying one would learn its projection alone."""
    from mlx.utils import tree_flatten

    target = make_tiny_llama(64, hidden_size=64, num_hidden_layers=2)
    nn.quantize(target, group_size=32, bits=4)
    draft = make_feature_draft(target)
    trainable = dict(tree_flatten(draft.trainable_parameters()))
    assert "layers.0.self_attn.q_proj.weight" in trainable
    assert "layers.0.mlp.down_proj.weight" in trainable
    assert isinstance(target.model.layers[-1].self_attn.q_proj, nn.QuantizedLinear)  # untouched
    q = target.model.layers[-1].self_attn.q_proj
    expected = mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits)
    assert mx.allclose(draft.layers[0].self_attn.q_proj.weight, expected)


def test_teacher_forced_view_is_what_the_engine_drafts_from(trained) -> None:
    target, draft, rows, tok = trained
    seq = mx.array(rows[0])[None]
    forced, final = draft.teacher_forced(seq)
    features = draft.target_features(seq)  # the final features and any tapped layers'
    cache = make_prompt_cache(draft)
    a = draft.forward(features[:, :4], seq[:, 1:5], cache)
    b = draft.forward(features[:, 4:-1], seq[:, 5:], cache)
    assert mx.allclose(mx.concatenate([a, b], axis=1), forced[:, 1:], atol=1e-5)
    # the final features are the target's: its head over them is its logits
    assert mx.array_equal(draft.final(features), final)
    assert mx.allclose(draft.head(final), target(seq), atol=1e-4)


@pytest.mark.parametrize(
    "cfg",
    [
        SpeculativeConfig(num_draft_tokens=1, adaptive=False),
        SpeculativeConfig(num_draft_tokens=3, adaptive=False, prefill_step_size=4),
        SpeculativeConfig(num_draft_tokens=2, max_draft_tokens=6),
    ],
    ids=["k1", "k3-chunked-prefill", "adaptive"],
)
def test_greedy_output_is_the_targets(tiny_tokenizer, trained, cfg) -> None:
    target, draft, rows, tok = trained
    engine = SpeculativeEngine(target, draft, tok, cfg)
    drafted = accepted = 0
    for row in rows[:6]:
        res = run_greedy(engine, row[:PROMPT_LEN], 24)
        drafted += res.stats.drafted
        accepted += res.stats.accepted
    novel = run_greedy(engine, [7, 8, 9, 10, 11, 12, 13], 20)  # a prompt it never saw
    assert novel.stats.drafted > 0
    assert accepted / drafted > 0.5  # the drafts are its own and good: not a target-only run


def test_each_rejected_draft_is_the_teacher_forced_prediction(tiny_tokenizer, trained) -> None:
    """One draft token per round: each is drafted from the target's features of the last
    verified position (the tapped layers' included), so each one rejected is what the draft
    predicts there teacher forced."""
    target, draft, rows, tok = trained
    engine = SpeculativeEngine(
        target, draft, tok, SpeculativeConfig(num_draft_tokens=1, adaptive=False)
    )
    rng, checked = random.Random(1), 0
    for _ in range(6):  # prompts it was not fitted to: it is wrong now and then
        prompt = [rng.randrange(5, len(tiny_tokenizer)) for _ in range(PROMPT_LEN)]
        res = run_greedy(engine, prompt, 24)
        seq = mx.array(prompt + res.tokens)[None]
        predicted = mx.argmax(draft(seq)[0], axis=-1).tolist()
        for r in res.rejections:
            assert r.draft_token == predicted[r.context_length - 1], r
            checked += 1
    assert checked >= 3


def test_untrained_and_pruned_feature_drafts_stay_lossless(tiny_tokenizer, trained) -> None:
    target, _, rows, tok = trained
    draft = make_feature_draft(target)
    prune_head(draft, list(range(0, len(tiny_tokenizer), 3)), len(tiny_tokenizer))
    assert is_feature_draft(draft) and type(draft) is FeatureDraft
    engine = SpeculativeEngine(target, draft, tok, SpeculativeConfig())
    for row in rows[:3]:
        res = run_greedy(engine, row[:PROMPT_LEN], 16)
        assert all(r.draft_token % 3 == 0 for r in res.rejections)


def test_a_prompt_cache_hit_drafts_from_where_the_target_resumes(tiny_tokenizer, trained) -> None:
    target, draft, rows, tok = trained
    engine = SpeculativeEngine(
        target, draft, tok, SpeculativeConfig(), prompt_cache=PromptCache(4, 1 << 30)
    )
    first = run_greedy(engine, rows[1][:PROMPT_LEN], 12)
    follow = rows[1][:PROMPT_LEN] + first.tokens + [20, 21, 22]
    again = run_greedy(engine, follow, 16)
    assert again.stats.cached_tokens >= PROMPT_LEN + 11  # all it held but the last token
    assert again.stats.drafted > 0


def test_a_generation_handed_over_and_back_stays_the_targets(tiny_tokenizer, trained) -> None:
    target, draft, rows, tok = trained
    engine = SpeculativeEngine(target, draft, tok, SpeculativeConfig())
    prompt, params = rows[2][:PROMPT_LEN], SamplingParams(max_tokens=24)
    result = GenerationResult()
    gen = engine.generate(prompt, params, result)
    next(gen)  # the prefill's first chunk and one round at most
    next(gen)
    with pytest.raises(StopIteration):
        gen.throw(Handoff())
    state = engine.handed_off
    assert state is not None
    for _ in engine.resume(state, params, result):
        pass
    assert result.tokens == greedy(target, prompt, 24)
    assert result.stats.accepted > 0  # the fresh feature draft picked up after one target step


def tiny_feature_target() -> nn.Module:
    return make_tiny_llama(
        lossless.VOCAB,
        seed=3,
        hidden_size=32,
        num_hidden_layers=1,
        intermediate_size=64,
        lm_head_scale=4,
    )


@pytest.fixture(scope="module")
def feature_models(tiny_tokenizer):
    target = tiny_feature_target()
    return target, make_feature_draft(target), no_eos(tiny_tokenizer)


@pytest.fixture(scope="module")
def tapped_models(tiny_tokenizer):
    """A draft that also reads the target's layer 0, its fold random (not the identity it
    starts from), so the tapped features steer its drafts."""
    target = tiny_feature_target()
    draft = make_feature_draft(target, taps=(0,))
    mx.random.seed(5)
    draft.fuse.weight = draft.fuse.weight + 0.1 * mx.random.normal(draft.fuse.weight.shape)
    mx.eval(draft.parameters())
    return target, draft, no_eos(tiny_tokenizer)


@pytest.mark.parametrize("models", ["feature_models", "tapped_models"])
def test_sampled_output_is_distributed_as_the_target(models, request) -> None:
    models = request.getfixturevalue(models)
    temperature, top_k, top_p = lossless.CONFIGS[0]
    samples, stats = lossless.sample(models, temperature, top_k, top_p)
    assert 0.1 < stats["acceptance"] < 0.95, stats
    tests = lossless.distribution_tests(models[0], samples, temperature, top_k, top_p)
    assert not [t for t in tests if t.rejected], tests


def test_a_broken_rule_is_caught_with_the_feature_draft(feature_models, monkeypatch) -> None:
    temperature, top_k, top_p = lossless.CONFIGS[0]
    with lossless.broken(monkeypatch, "wrong residual"):
        samples, _ = lossless.sample(
            feature_models, temperature, top_k, top_p, strict=False, n=lossless.N_SMALL
        )
    tests = lossless.distribution_tests(feature_models[0], samples, temperature, top_k, top_p)
    assert [t for t in tests if t.rejected], tests
