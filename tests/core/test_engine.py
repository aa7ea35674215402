"""Tests for specd's speculative decoding engine (daemon/core/engine.py)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer, TokenizerWrapper

from daemon.core.engine import (
    GenerationError,
    GenerationResult,
    GenerationStats,
    SamplingParams,
    SpeculativeConfig,
    SpeculativeEngine,
)
from daemon.core.sampling import process_logits
from tests.helpers import TINY_CORPUS, make_tiny_llama, perturbed_copy

MAX_TOKENS = 24
# Required top-1 / top-2 log-prob gap at every step of the reference decoding.  Scoring k+1
# tokens in one pass vs one at a time differs by ~1e-5 in float32 logits; a smaller gap would make
# the comparison a coin flip, so the test model must not have one (change its seed if so).
MIN_MARGIN = 1e-4


# --------------------------------------------------------------------------- helpers


def no_eos(tokenizer: TokenizerWrapper, naive: bool = False) -> TokenizerWrapper:
    """A wrapper around the same HF tokenizer that never stops on EOS."""
    cls = NaiveStreamingDetokenizer if naive else type(tokenizer._detokenizer)
    w = TokenizerWrapper(tokenizer._tokenizer, detokenizer_class=cls)
    w.eos_token_ids = []
    return w


def make_prompts(tokenizer: TokenizerWrapper, n: int = 20) -> list[list[int]]:
    """Corpus sentences plus random token sequences of assorted lengths (1 .. 40)."""
    rng = np.random.default_rng(1234)
    prompts = [tokenizer.encode(s) for s in TINY_CORPUS]
    lengths = [1, 2, 3, 5, 8, 13, 21, 34, 40, 7, 11, 17, 29, 4]
    for length in lengths[: n - len(prompts)]:
        prompts.append(rng.integers(5, len(tokenizer), size=length).tolist())
    return prompts[:n]


_REF_CACHE: dict[tuple[int, tuple[int, ...], int], list[int]] = {}


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Plain target-only greedy decoding through mlx-lm; asserts clear logit margins."""
    key = (id(model), tuple(prompt), n)
    if key not in _REF_CACHE:
        out = []
        for tok, logprobs in generate_step(mx.array(prompt), model, max_tokens=n):
            top2 = mx.sort(logprobs)[-2:].tolist()
            assert top2[1] - top2[0] > MIN_MARGIN, "test model has a near-tie; change its seed"
            out.append(int(tok))
        _REF_CACHE[key] = out
    return _REF_CACHE[key]


def check_greedy(engine, prompt, max_tokens=MAX_TOKENS):
    res = engine.run(prompt, SamplingParams(max_tokens=max_tokens))
    ref = reference_greedy(engine.target, prompt, max_tokens)
    assert res.tokens == ref[: len(res.tokens)], (prompt, res.tokens, ref)
    eos = engine.tokenizer.eos_token_ids
    if res.finish_reason == "length":
        assert len(res.tokens) == max_tokens
    else:
        assert res.finish_reason == "stop" and res.tokens[-1] in eos
    return res


class _PosCache:
    """Minimal trimmable cache that only tracks the position."""

    def __init__(self) -> None:
        self.offset = 0

    @property
    def state(self):
        return ()

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n


class ScriptedModel:
    """Deterministic 'model': its logits at absolute position i point at ``sequence[i + 1]``.

    Used to drive the engine through exact token sequences (multi-byte text, stop strings,
    EOS) and to place rejections at known positions (a draft with a different script).
    """

    def __init__(self, sequence: list[int], vocab_size: int) -> None:
        self.sequence = list(sequence)
        self.vocab_size = vocab_size

    def make_cache(self):
        return [_PosCache()]

    def __call__(self, inputs, cache=None):
        length = inputs.shape[1]
        offset = cache[0].offset if cache else 0
        if cache:
            cache[0].offset += length
        last = len(self.sequence) - 1
        nxt = [self.sequence[min(offset + i + 1, last)] for i in range(length)]
        onehot = mx.array(np.eye(self.vocab_size, dtype=np.float32)[nxt])
        return (10.0 * onehot)[None]


def scripted_engine(tokenizer, prompt, target_text, draft_edits=(), k=3, adaptive=False):
    """Engine whose target emits ``target_text``; the draft differs at ``draft_edits``."""
    gen = tokenizer.encode(target_text, add_special_tokens=False)
    seq = list(prompt) + gen
    dseq = list(seq)
    vocab = len(tokenizer)
    for pos in draft_edits:  # pos = index in the generated tokens
        dseq[len(prompt) + pos] = (dseq[len(prompt) + pos] + 1) % vocab
    cfg = SpeculativeConfig(num_draft_tokens=k, adaptive=adaptive)
    engine = SpeculativeEngine(
        ScriptedModel(seq, vocab), ScriptedModel(dseq, vocab), tokenizer, cfg
    )
    return engine, gen


def stream(engine, prompt, params):
    result = GenerationResult()
    chunks = list(engine.generate(prompt, params, result))
    return chunks, result


# --------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_greedy_matches_target_fixed_k(tiny_tokenizer, tiny_target, tiny_draft, k):
    cfg = SpeculativeConfig(num_draft_tokens=k, adaptive=False)
    engine = SpeculativeEngine(tiny_target, tiny_draft, tiny_tokenizer, cfg)
    accepted = drafted = 0
    for prompt in make_prompts(tiny_tokenizer):
        res = check_greedy(engine, prompt)
        s = res.stats
        accepted += s.accepted
        drafted += s.drafted
        assert s.generation_tokens == len(res.tokens)
        assert s.prompt_tokens == len(prompt)
        assert sum(s.accepted_per_position) == s.accepted
        assert sum(s.drafted_per_position) == s.drafted
        assert len(s.drafted_per_position) <= k
        # prefill (if any) + one pass per round; a round without drafts only happens when
        # a single token is left before max_tokens
        assert s.target_passes - s.num_drafts - (len(prompt) > 1) in (0, 1)
        assert s.mean_accepted_length == pytest.approx(1 + s.accepted / s.num_drafts)
    assert 0 < accepted / drafted < 1


def test_greedy_matches_target_adaptive(tiny_tokenizer, tiny_target, tiny_draft):
    cfg = SpeculativeConfig(num_draft_tokens=2, min_draft_tokens=1, max_draft_tokens=6)
    engine = SpeculativeEngine(tiny_target, tiny_draft, tiny_tokenizer, cfg)
    lengths = set()
    for prompt in make_prompts(tiny_tokenizer):
        res = check_greedy(engine, prompt, max_tokens=40)
        lengths.add(len(res.stats.drafted_per_position))
        assert len(res.stats.drafted_per_position) <= 6
    assert max(lengths) > 2  # the draft length grew somewhere


def test_greedy_with_padded_draft_vocab_and_small_prefill_chunks(tiny_tokenizer, tiny_target):
    draft = perturbed_copy(tiny_target, seed=7, noise=0.1, extra_vocab=24)
    cfg = SpeculativeConfig(num_draft_tokens=3, adaptive=False, prefill_step_size=5)
    engine = SpeculativeEngine(tiny_target, draft, tiny_tokenizer, cfg)
    vocab = len(tiny_tokenizer)
    for prompt in make_prompts(tiny_tokenizer)[:10]:
        res = check_greedy(engine, prompt)
        assert all(r.draft_token < vocab for r in res.rejections)
    assert res.stats.accepted > 0


def test_draft_swap_between_requests(tiny_tokenizer, tiny_target, tiny_draft):
    engine = SpeculativeEngine(tiny_target, tiny_draft, tiny_tokenizer, SpeculativeConfig())
    prompt = make_prompts(tiny_tokenizer)[1]
    a = check_greedy(engine, prompt)
    engine.draft = make_tiny_llama(len(tiny_tokenizer), seed=99, num_hidden_layers=1)
    b = check_greedy(engine, prompt)
    engine.draft = tiny_target  # a perfect draft accepts everything
    c = check_greedy(engine, prompt)
    assert a.tokens == b.tokens == c.tokens
    assert c.stats.acceptance_rate == 1.0 and not c.rejections
    assert b.stats.acceptance_rate < a.stats.acceptance_rate


# --------------------------------------------------------------------------- rejections


def test_rejection_records_greedy(tiny_tokenizer, tiny_target, tiny_draft):
    cfg = SpeculativeConfig(num_draft_tokens=4, adaptive=False, top_logprobs=7)
    engine = SpeculativeEngine(tiny_target, tiny_draft, tiny_tokenizer, cfg)
    n_checked = 0
    for prompt in make_prompts(tiny_tokenizer)[:6]:
        res = check_greedy(engine, prompt)
        # at most one record per round; accepted + rejected never exceed drafted
        assert len(res.rejections) <= res.stats.num_drafts
        assert res.stats.accepted + len(res.rejections) <= res.stats.drafted
        positions = [r.position for r in res.rejections]
        assert positions == sorted(set(positions))
        for r in res.rejections:
            assert r.context_length == len(prompt) + r.position
            assert r.target_token == res.tokens[r.position]
            assert r.draft_token != r.target_token
            assert 0 < r.draft_prob <= 1
            assert len(r.top_ids) == len(r.top_logprobs) == 7
            assert r.top_ids[0] == r.target_token
            assert r.top_logprobs == sorted(r.top_logprobs, reverse=True)
            # raw target distribution at that position, straight from a plain forward pass
            ctx = mx.array(prompt + res.tokens[: r.position])[None]
            logits = tiny_target(ctx)[0, -1].astype(mx.float32)
            lp = (logits - mx.logsumexp(logits)).tolist()
            expect = sorted(range(len(lp)), key=lambda i: -lp[i])[:7]
            assert r.top_ids == expect
            assert r.top_logprobs == pytest.approx([lp[i] for i in expect], abs=1e-4)
            n_checked += 1
    assert n_checked > 5


def test_rejections_at_scripted_positions(tiny_tokenizer):
    prompt = tiny_tokenizer.encode("Hello")
    text = "the cat sat on the mat and the dog sat on the log"  # 18 tokens
    engine, gen = scripted_engine(tiny_tokenizer, prompt, text, draft_edits=(0, 2, 3, 9, 15), k=3)
    assert len(gen) == 18
    res = engine.run(prompt, SamplingParams(max_tokens=len(gen)))
    assert res.tokens == gen
    assert [r.position for r in res.rejections] == [0, 2, 3, 9, 15]
    for r in res.rejections:
        assert r.target_token == gen[r.position] == r.top_ids[0]
        assert r.draft_token == (gen[r.position] + 1) % len(tiny_tokenizer)
        assert r.context_length == len(prompt) + r.position
    # rounds (k=3): [0x] [1 2x] [3x] [4 5 6 +7] [8 9x] [10 11 12 +13] [14 15x] [16 +17]
    # (the last round drafts 1 token: only 2 remain before max_tokens)
    s = res.stats
    assert (s.num_drafts, s.drafted, s.accepted) == (8, 22, 10)
    assert s.accepted_per_position == [6, 2, 2]
    assert s.drafted_per_position == [8, 7, 7]
    assert s.target_passes == 1 + 8
    assert s.mean_accepted_length == pytest.approx(1 + 10 / 8)


def test_record_rejections_off(tiny_tokenizer, tiny_target, tiny_draft):
    prompt = make_prompts(tiny_tokenizer)[2]
    on = SpeculativeEngine(
        tiny_target, tiny_draft, tiny_tokenizer, SpeculativeConfig(adaptive=False)
    ).run(prompt, SamplingParams(max_tokens=MAX_TOKENS))
    off = SpeculativeEngine(
        tiny_target,
        tiny_draft,
        tiny_tokenizer,
        SpeculativeConfig(adaptive=False, record_rejections=False),
    ).run(prompt, SamplingParams(max_tokens=MAX_TOKENS))
    assert on.tokens == off.tokens and on.rejections and not off.rejections
    assert on.stats.accepted == off.stats.accepted


def test_bfloat16_models_smoke(tiny_tokenizer):
    """Real checkpoints are bf16: bookkeeping converts rows to float32 (numpy has no bf16)."""
    target = make_tiny_llama(len(tiny_tokenizer), seed=0)
    draft = perturbed_copy(target, seed=1, noise=0.1)
    target.set_dtype(mx.bfloat16)
    draft.set_dtype(mx.bfloat16)
    engine = SpeculativeEngine(target, draft, no_eos(tiny_tokenizer), SpeculativeConfig())
    prompt = make_prompts(tiny_tokenizer)[0]
    for params in (SamplingParams(max_tokens=20), SamplingParams(temperature=1, seed=0)):
        params.max_tokens = 20
        res = engine.run(prompt, params)
        assert len(res.tokens) == 20 and res.rejections
        for r in res.rejections:
            assert 0 < r.draft_prob <= 1 and len(r.top_ids) == 20
            assert r.target_token == res.tokens[r.position]


# --------------------------------------------------------------------------- sampling


def _np_process(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    x = logits.astype(np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    if 0 < top_k < len(p):
        thr = np.sort(p)[-top_k]
        p = np.where(p >= thr, p, 0)
        p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]
        keep = order[before < top_p]
        mask = np.zeros_like(p, dtype=bool)
        mask[keep] = True
        p = np.where(mask, p, 0)
        p /= p.sum()
    return p


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 10, 0.6)]
)
def test_process_logits_matches_numpy(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 2
    got = np.exp(np.array(process_logits(mx.array(logits), temperature, top_k, top_p)))
    for row, g in zip(logits, got, strict=True):
        np.testing.assert_allclose(g, _np_process(row, temperature, top_k, top_p), atol=1e-5)


# The distribution test for speculative sampling is tests/core/test_lossless_sampling.py.


def test_seeded_sampling_is_reproducible(tiny_tokenizer, tiny_target, tiny_draft):
    engine = SpeculativeEngine(tiny_target, tiny_draft, tiny_tokenizer, SpeculativeConfig())
    prompt = make_prompts(tiny_tokenizer)[0]

    def sample(seed):
        params = SamplingParams(temperature=1.0, top_p=0.9, seed=seed, max_tokens=MAX_TOKENS)
        return engine.run(prompt, params)

    a, b, c = sample(11), sample(11), sample(12)
    assert a.tokens == b.tokens
    assert [r.to_dict() for r in a.rejections] == [r.to_dict() for r in b.rejections]
    assert a.tokens != c.tokens
    assert 0 < a.stats.acceptance_rate < 1
    for r in a.rejections:
        assert r.target_token == a.tokens[r.position]
        assert r.top_ids and r.top_logprobs[0] <= 0


# --------------------------------------------------------------------------- stopping & text


def test_multibyte_streaming(tiny_tokenizer):
    text = "Hi café 🙂 naïve → done"
    for tok in (tiny_tokenizer, no_eos(tiny_tokenizer, naive=True)):
        prompt = tok.encode("Hello")
        engine, gen = scripted_engine(tok, prompt, text, draft_edits=(1, 4, 5, 9, 12), k=3)
        assert len(gen) > len(text) - 3  # multi-byte chars are split across tokens
        chunks, res = stream(engine, prompt, SamplingParams(max_tokens=len(gen)))
        deltas = [c.text for c in chunks]
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == tok.decode(res.tokens) == text == res.text
        assert [t for c in chunks for t in c.tokens] == res.tokens == gen
        assert chunks[-1].finish_reason == "length" and chunks[-1].result is res
        assert all(c.finish_reason is None for c in chunks[:-1])


@pytest.mark.parametrize(
    "stop,expected",
    [
        (["sat"], "the cat "),
        (["t s"], "the ca"),
        (["mat", "cat"], "the "),
        (["sat on thx"], "the cat sat on the mat and more"),  # prefix held back, then released
        (["e"], "th"),
    ],
)
def test_stop_strings(tiny_tokenizer, stop, expected):
    full = "the cat sat on the mat and more"
    prompt = tiny_tokenizer.encode("Hello")
    engine, gen = scripted_engine(tiny_tokenizer, prompt, full, draft_edits=(2, 5), k=2)
    chunks, res = stream(engine, prompt, SamplingParams(max_tokens=len(gen), stop=stop))
    assert "".join(c.text for c in chunks) == expected == res.text
    if expected == full:
        assert res.finish_reason == "length" and res.tokens == gen
    else:
        assert res.finish_reason == "stop" and chunks[-1].finish_reason == "stop"
        # generation ended at the token that completed the stop string
        assert res.tokens == gen[: len(res.tokens)]
        assert any(s in tiny_tokenizer.decode(res.tokens) for s in stop)
        assert not any(s in tiny_tokenizer.decode(res.tokens[:-1]) for s in stop)
    for c in chunks:  # nothing of the stop string is ever streamed
        assert not any(s in c.text for s in stop if expected != full)


def test_eos_stops(tiny_tokenizer):
    prompt = tiny_tokenizer.encode("Hello")
    eos = tiny_tokenizer.eos_token_id
    gen = tiny_tokenizer.encode("the cat sat") + [eos] + tiny_tokenizer.encode(" on the mat")
    seq = prompt + gen
    vocab = len(tiny_tokenizer)
    for k in (1, 3, 6):
        engine = SpeculativeEngine(
            ScriptedModel(seq, vocab),
            ScriptedModel(seq, vocab),
            tiny_tokenizer,
            SpeculativeConfig(num_draft_tokens=k, adaptive=False),
        )
        chunks, res = stream(engine, prompt, SamplingParams(max_tokens=50))
        n = gen.index(eos) + 1
        assert res.tokens == gen[:n] and res.finish_reason == "stop"
        assert res.text == "".join(c.text for c in chunks) == "the cat sat"
        assert res.stats.generation_tokens == n


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 7, 16])
def test_max_tokens(tiny_tokenizer, tiny_target, tiny_draft, max_tokens):
    for adaptive in (False, True):
        cfg = SpeculativeConfig(num_draft_tokens=4, adaptive=adaptive)
        engine = SpeculativeEngine(tiny_target, tiny_draft, no_eos(tiny_tokenizer), cfg)
        for prompt in make_prompts(tiny_tokenizer)[:3]:
            res = engine.run(prompt, SamplingParams(max_tokens=max_tokens))
            assert len(res.tokens) == max_tokens and res.finish_reason == "length"
            assert res.tokens == reference_greedy(tiny_target, prompt, MAX_TOKENS)[:max_tokens]
            res = engine.run(prompt, SamplingParams(temperature=1, seed=1, max_tokens=max_tokens))
            assert len(res.tokens) == max_tokens and res.finish_reason == "length"


def test_context_limit(tiny_tokenizer, tiny_target, tiny_draft):
    cfg = SpeculativeConfig(num_draft_tokens=4, adaptive=False, max_context=30)
    engine = SpeculativeEngine(tiny_target, tiny_draft, no_eos(tiny_tokenizer), cfg)
    prompt = list(range(10, 35))  # 25 tokens
    res = engine.run(prompt, SamplingParams(max_tokens=20))
    assert len(res.tokens) == 5 and res.finish_reason == "length"
    assert res.tokens == reference_greedy(tiny_target, prompt, 5)
    with pytest.raises(GenerationError):
        engine.generate(list(range(10, 40)), SamplingParams(max_tokens=5))


# --------------------------------------------------------------------------- robustness


@pytest.mark.parametrize(
    "prompt,params",
    [
        ([], SamplingParams()),
        ([1, 2, 10_000], SamplingParams()),
        ([1, -2], SamplingParams()),
        ([1, 2], SamplingParams(temperature=-0.1)),
        ([1, 2], SamplingParams(temperature=float("nan"))),
        ([1, 2], SamplingParams(top_p=0.0)),
        ([1, 2], SamplingParams(top_p=1.5)),
        ([1, 2], SamplingParams(top_k=-1)),
        ([1, 2], SamplingParams(top_k=2.5)),
        ([1, 2], SamplingParams(max_tokens=0)),
        ([1, 2], SamplingParams(max_tokens=10**9)),
        ([1, 2], SamplingParams(seed="x")),
        ([1, 2], SamplingParams(stop="abc")),
        ([1, 2], SamplingParams(stop=[""])),
        ([1] * 600, SamplingParams()),
        ("not tokens", SamplingParams()),
    ],
)
def test_bad_input_raises_before_touching_caches(
    tiny_tokenizer, tiny_target, tiny_draft, prompt, params
):
    cfg = SpeculativeConfig(max_context=512)
    engine = SpeculativeEngine(tiny_target, tiny_draft, tiny_tokenizer, cfg)
    with pytest.raises(GenerationError):
        engine.generate(prompt, params)  # raised eagerly, not on first next()
    assert issubclass(GenerationError, ValueError)
    check_greedy(engine, make_prompts(tiny_tokenizer)[3])  # engine still healthy


def test_invalid_config():
    with pytest.raises(ValueError):
        SpeculativeEngine(
            None, None, None, SpeculativeConfig(min_draft_tokens=3, max_draft_tokens=2)
        )
    with pytest.raises(ValueError):
        SpeculativeEngine(None, None, None, SpeculativeConfig(num_draft_tokens=-1))


def test_close_mid_stream_then_new_request(tiny_tokenizer, tiny_target, tiny_draft):
    cfg = SpeculativeConfig(num_draft_tokens=2, adaptive=False)
    engine = SpeculativeEngine(tiny_target, tiny_draft, no_eos(tiny_tokenizer), cfg)
    prompts = make_prompts(tiny_tokenizer)
    result = GenerationResult()
    gen = engine.generate(prompts[4], SamplingParams(max_tokens=200), result)
    next(gen)
    next(gen)
    gen.close()
    assert result.finish_reason == "cancelled"
    assert result.stats.num_drafts == 2 and len(result.tokens) <= 6
    assert result.stats.generation_tokens == len(result.tokens)
    assert all(r.position < len(result.tokens) and r.top_ids for r in result.rejections)
    check_greedy(engine, prompts[5])
    check_greedy(engine, prompts[4])


def test_stats_dict(tiny_tokenizer, tiny_target, tiny_draft):
    engine = SpeculativeEngine(tiny_target, tiny_draft, tiny_tokenizer, SpeculativeConfig())
    res = engine.run(make_prompts(tiny_tokenizer)[0], SamplingParams(max_tokens=MAX_TOKENS))
    d = res.stats.to_dict()
    for key in (
        "prompt_tokens",
        "generation_tokens",
        "drafted",
        "accepted",
        "num_drafts",
        "acceptance_rate",
        "mean_accepted_length",
        "accepted_per_position",
        "target_passes",
        "prompt_tps",
        "generation_tps",
    ):
        assert key in d
    assert d["acceptance_rate"] == pytest.approx(d["accepted"] / d["drafted"])
    assert d["generation_tps"] > 0 and d["prompt_tps"] > 0


def test_bench_speed(tiny_tokenizer, tiny_target, tiny_draft):
    from daemon.bench.speed import bench_speed

    prompts = ["hello there", [{"role": "user", "content": "the cat sat"}]]
    out = bench_speed(
        tiny_target, tiny_draft, tiny_tokenizer, prompts, max_tokens=12, num_draft_tokens=3
    )
    for row in ("target_only", "mlx_lm_speculative", "specd_fixed", "specd_adaptive"):
        assert out[row]["tokens_per_s"] > 0 and "ratio_vs_target" in out[row]
        assert out[row]["identical_to_target"]
    for row in ("mlx_lm_speculative", "specd_fixed", "specd_adaptive"):
        assert 0 <= out[row]["acceptance_rate"] <= 1
        assert out[row]["mean_accepted_length"] >= 1
        assert 0 < out[row]["target_passes_per_token"] <= 1.5
    assert isinstance(out["bookkeeping_overhead"], float)
    # each specd row keeps what its engine's round policy measured (the cost curve behind it)
    assert out["specd_adaptive"]["measured"]["verify_s"]["1"] > 0


def test_bench_speed_repeats_rows_and_adds_variants(tiny_tokenizer, tiny_target, tiny_draft):
    """Every row runs once per repetition, its ratio against the target of the same
    repetition; the row reports the median repetition and the spread; a variant is a row."""
    from daemon.bench.speed import Variant, bench_speed

    variant = Variant.parse("max_proposal_tokens=2,speculative.lookup=false")
    assert variant.changes == {"max_proposal_tokens": 2, "lookup": False}
    out = bench_speed(
        tiny_target,
        tiny_draft,
        tiny_tokenizer,
        ["hello there", "the cat sat"],
        max_tokens=8,
        num_draft_tokens=3,
        repeat=3,
        variants=[variant],
    )
    assert out["repeat"] == 3
    row = out[variant.row]
    assert variant.row == "specd_adaptive[max_proposal_tokens=2,lookup=False]"
    assert row["identical_to_target"] and "lookup" not in row["drafted_by_source"]
    for name in ("target_only", "mlx_lm_speculative", "specd_adaptive", variant.row):
        r = out[name]
        assert r["runs"] == 3 and len(r["ratio_runs"]) == 3 and len(r["tokens_per_s_runs"]) == 3
        assert r["ratio_min"] <= r["ratio_vs_target"] <= r["ratio_max"]
        assert r["ratio_vs_target"] == sorted(r["ratio_runs"])[1]  # the median repetition
    assert out["target_only"]["ratio_runs"] == [1.0, 1.0, 1.0]
    # only the rows asked for (and the target, every ratio's base)
    few = bench_speed(
        tiny_target,
        tiny_draft,
        tiny_tokenizer,
        ["hello there"],
        max_tokens=6,
        num_draft_tokens=3,
        rows=["specd_lookup"],
    )
    assert {k for k, v in few.items() if isinstance(v, dict) and "runs" in v} == {
        "target_only",
        "specd_lookup",
    }


@pytest.mark.parametrize(
    "text", ["max_proposal_tokens", "nonsense=3", "max_proposal_tokens=0", "lookup=maybe", ""]
)
def test_bench_speed_variant_errors_name_the_setting(text: str) -> None:
    from daemon.bench.speed import Variant
    from daemon.errors import ConfigError

    with pytest.raises(ConfigError, match="--variant"):
        Variant.parse(text)


def test_generation_stats_accumulate_sums_counts_and_positions() -> None:
    total = GenerationStats()
    total.accumulate(
        GenerationStats(
            generation_tokens=5,
            drafted=4,
            accepted=2,
            num_drafts=2,
            accepted_per_position=[2],
            drafted_per_position=[2, 2],
        )
    )
    total.accumulate(
        GenerationStats(
            generation_tokens=3,
            drafted=2,
            accepted=2,
            num_drafts=1,
            accepted_per_position=[1, 1],
            drafted_per_position=[1, 1],
        )
    )
    assert (total.generation_tokens, total.drafted, total.accepted, total.num_drafts) == (
        8,
        6,
        4,
        3,
    )
    assert total.accepted_per_position == [3, 1] and total.drafted_per_position == [3, 3]
    assert total.acceptance_rate == 4 / 6 and total.mean_accepted_length == 1 + 4 / 3


def test_autocomplete_workload_is_generated_and_benched_raw(
    tiny_tokenizer, tiny_target, tiny_draft
):
    """The workload comes from the installed standard library, the same on every run; bench
    speed sends it raw (no chat template)."""
    from daemon.bench.speed import bench_speed
    from daemon.bench.workloads import autocomplete_prompts

    prompts = autocomplete_prompts(3)
    assert prompts == autocomplete_prompts(3) and len(set(prompts)) == 3
    assert all(300 <= len(p) and not p.endswith("\n") for p in prompts)  # mid-line
    short = [p[-60:] for p in prompts]
    out = bench_speed(
        tiny_target, tiny_draft, tiny_tokenizer, short, max_tokens=8, num_draft_tokens=3, raw=True
    )
    assert out["target_only"]["tokens"] > 0 and out["specd_adaptive"]["identical_to_target"]
    assert out["num_prompts"] == 3
