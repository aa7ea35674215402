"""The prompt cache: reused KV caches change nothing in the output, only the prefill."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper

from daemon.core.drafting import SuffixIndex
from daemon.core.engine import (
    GenerationResult,
    SamplingParams,
    SpeculativeConfig,
    SpeculativeEngine,
)
from daemon.core.prompt_cache import PromptCache
from tests.helpers import TINY_CORPUS, perturbed_copy

CFG = dict(num_draft_tokens=3, min_draft_tokens=1, max_draft_tokens=5, lookup=True)


def no_eos(tokenizer: TokenizerWrapper) -> TokenizerWrapper:
    w = TokenizerWrapper(tokenizer._tokenizer, detokenizer_class=type(tokenizer._detokenizer))
    w.eos_token_ids = []
    return w


def conversation(tok: TokenizerWrapper, engine: SpeculativeEngine, turns: int = 4) -> list:
    """A client resending the history: each prompt is the last prompt, its answer and a new
    user text. Returns every turn's result."""
    results, prompt = [], []
    for i in range(turns):
        prompt = prompt + tok.encode(TINY_CORPUS[i % len(TINY_CORPUS)])
        res = engine.run(prompt, SamplingParams(max_tokens=12))
        results.append(res)
        prompt = prompt + res.tokens
    return results


@pytest.fixture
def pair(tiny_tokenizer, tiny_target):
    return tiny_target, perturbed_copy(tiny_target, seed=1, noise=0.2), no_eos(tiny_tokenizer)


def test_output_is_identical_with_and_without_the_cache(pair) -> None:
    target, draft, tok = pair
    plain = SpeculativeEngine(target, draft, tok, SpeculativeConfig(**CFG))
    cache = PromptCache(max_entries=4, max_bytes=1 << 30)
    cached = SpeculativeEngine(target, draft, tok, SpeculativeConfig(**CFG), prompt_cache=cache)
    want, got = conversation(tok, plain), conversation(tok, cached)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert all(r.stats.cached_tokens == 0 for r in want)
    assert got[0].stats.cached_tokens == 0
    for prev, res in zip(got, got[1:], strict=False):
        # everything the previous request verified is reused: its prompt and its answer
        # but the answer's last token (never fed to the target)
        assert res.stats.cached_tokens == prev.stats.prompt_tokens + len(prev.tokens) - 1
    st = cache.status()
    assert st["hits"] == 3 and st["misses"] == 1 and 0 < st["bytes"] <= 1 << 30
    assert st["cached_tokens"] == sum(r.stats.cached_tokens for r in got)


def test_sampled_with_a_seed_is_identical_too(pair) -> None:
    target, draft, tok = pair
    prompt = tok.encode(TINY_CORPUS[0] + " " + TINY_CORPUS[1])
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=16)
    plain = SpeculativeEngine(target, draft, tok, SpeculativeConfig(**CFG))
    cached = SpeculativeEngine(
        target, draft, tok, SpeculativeConfig(**CFG), prompt_cache=PromptCache(4, 1 << 30)
    )
    cached.run(prompt[:-3], params)  # leaves a cache that runs into the next prompt's middle
    res = cached.run(prompt, params)
    assert res.stats.cached_tokens > 0
    assert res.tokens == plain.run(prompt, params).tokens


def test_a_new_draft_never_reads_the_old_drafts_entries(pair) -> None:
    target, draft, tok = pair
    cache = PromptCache(4, 1 << 30)
    engine = SpeculativeEngine(target, draft, tok, SpeculativeConfig(**CFG), prompt_cache=cache)
    prompt = tok.encode(TINY_CORPUS[2])
    engine.run(prompt, SamplingParams(max_tokens=8))
    assert cache.fetch("draft", prompt)[0] is not None
    engine.draft = perturbed_copy(target, seed=9, noise=0.2)  # an adapter swap
    res = engine.run(prompt + [5, 6], SamplingParams(max_tokens=8))
    assert res.stats.cached_tokens > 0  # the target's entry still serves
    ref = SpeculativeEngine(target, engine.draft, tok, SpeculativeConfig(**CFG))
    assert res.tokens == ref.run(prompt + [5, 6], SamplingParams(max_tokens=8)).tokens

    # A swapped-in draft may be a new object at a collected one's address (ids are reused):
    # the engine tells drafts apart by a serial, so even the same object swapped in anew
    # starts with no draft entries.
    assert cache.fetch("draft", prompt + [5, 6])[0] is not None
    engine.draft = engine.draft
    engine.prompt_cache.use_draft(engine.draft_serial)
    assert cache.fetch("draft", prompt + [5, 6])[0] is None


def test_bounds_evict_and_zero_turns_it_off(pair) -> None:
    target, draft, tok = pair
    cache = PromptCache(max_entries=1, max_bytes=1 << 30)
    engine = SpeculativeEngine(target, draft, tok, SpeculativeConfig(**CFG), prompt_cache=cache)
    a, b = tok.encode(TINY_CORPUS[0]), tok.encode(TINY_CORPUS[3])
    engine.run(a, SamplingParams(max_tokens=4))
    engine.run(b, SamplingParams(max_tokens=4))
    assert cache.status()["entries"] == 1
    assert engine.run(a + [7], SamplingParams(max_tokens=4)).stats.cached_tokens == 0
    cache.resize(4, 1)  # one byte: nothing fits
    assert cache.nbytes <= 1
    off = PromptCache(0, 1 << 30)
    engine = SpeculativeEngine(target, draft, tok, SpeculativeConfig(**CFG), prompt_cache=off)
    engine.run(a, SamplingParams(max_tokens=4))
    assert engine.run(a, SamplingParams(max_tokens=4)).stats.cached_tokens == 0
    assert len(off) == 0


def test_a_cancelled_request_leaves_a_usable_cache(pair) -> None:
    target, draft, tok = pair
    cache = PromptCache(4, 1 << 30)
    engine = SpeculativeEngine(
        target, draft, tok, SpeculativeConfig(**CFG), suffix=SuffixIndex(0), prompt_cache=cache
    )
    prompt = tok.encode(TINY_CORPUS[1])
    gen = engine.generate(prompt, SamplingParams(max_tokens=30))
    seen = [t for _, chunk in zip(range(2), gen, strict=False) for t in chunk.tokens]
    gen.close()
    res = engine.run(prompt + seen, SamplingParams(max_tokens=10))
    assert res.stats.cached_tokens >= len(prompt)
    plain = SpeculativeEngine(target, draft, tok, SpeculativeConfig(**CFG))
    assert res.tokens == plain.run(prompt + seen, SamplingParams(max_tokens=10)).tokens
    assert mx.array(res.tokens).size == 10


def test_a_long_prefill_stops_between_chunks_when_closed(pair) -> None:
    """A request closed during its prefill stops at the next chunk; what was prefilled is
    kept for the same prompt's next attempt."""
    target, draft, tok = pair
    cache = PromptCache(4, 1 << 30)
    cfg = SpeculativeConfig(**CFG, prefill_step_size=8)
    engine = SpeculativeEngine(target, draft, tok, cfg, prompt_cache=cache)
    prompt = tok.encode(" ".join(TINY_CORPUS[:3]))
    assert len(prompt) > 24
    closed = GenerationResult()
    gen = engine.generate(prompt, SamplingParams(max_tokens=5), closed)
    first = next(gen)  # after the first prefill chunk
    assert first.text == "" and first.tokens == []
    gen.close()
    assert closed.finish_reason == "cancelled"
    res = engine.run(prompt, SamplingParams(max_tokens=5))
    assert res.stats.cached_tokens == 8  # the one chunk prefilled before the close
    plain = SpeculativeEngine(target, draft, tok, SpeculativeConfig(**CFG))
    assert res.tokens == plain.run(prompt, SamplingParams(max_tokens=5)).tokens
