"""The real default pair: SmolLM2-135M target with the default layer-skip draft."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from daemon.core.engine import SamplingParams, SpeculativeConfig, SpeculativeEngine
from daemon.core.prompts import encode_prompt

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Explain in one sentence what a hash table is.",
]
MAX_TOKENS = 32


def target_greedy(model, prompt: list[int], max_tokens: int, eos: set[int]) -> list[int]:
    out: list[int] = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        out.append(int(token))
        if int(token) in eos:
            break
    return out


def test_real_pair_greedy_equals_target(smollm_pair) -> None:
    pair = smollm_pair
    eos = set(pair.tokenizer.eos_token_ids)
    engines = [
        SpeculativeEngine(
            pair.target,
            pair.draft,
            pair.tokenizer,
            SpeculativeConfig(num_draft_tokens=k, adaptive=adaptive, max_context=pair.max_context),
        )
        for k, adaptive in ((3, False), (4, True))
    ]
    drafted = 0
    for text in PROMPTS:
        prompt = encode_prompt(pair.tokenizer, text)
        expected = target_greedy(pair.target, prompt, MAX_TOKENS, eos)
        for engine in engines:
            result = engine.run(prompt, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
            assert result.tokens == expected, text
            drafted += result.stats.drafted
            for rej in result.rejections:
                assert result.tokens[rej.position] == rej.target_token
                assert rej.draft_token != rej.target_token
                assert rej.top_ids[0] == rej.target_token  # greedy: the target's argmax
                assert len(rej.top_ids) == 20
    assert drafted > 0


def test_real_pair_high_acceptance_drafts_equal_target(smollm_pair) -> None:
    """Multi-token acceptance and cache trimming on the real 30-layer model.

    The default draft accepts a few percent of its tokens, so most rounds end at the first
    draft token. Two drafts that agree far more: all 30 layers (the target itself as a separate
    module tree: every drafted token is accepted, the bonus token ends each round) and the
    target without two middle layers (about half accepted: long accepted runs, then a rejection
    that trims both caches by several positions).
    """
    from daemon.core.models import make_layer_skip_draft

    pair = smollm_pair
    eos = set(pair.tokenizer.eos_token_ids)
    n = len(pair.target.layers)
    drafts = {
        "all-layers": (make_layer_skip_draft(pair.target, list(range(n))), 0.9),
        "skip-two-middle": (make_layer_skip_draft(pair.target, [*range(14), *range(16, n)]), 0.4),
    }
    for name, (draft, min_acceptance) in drafts.items():
        engine = SpeculativeEngine(
            pair.target,
            draft,
            pair.tokenizer,
            SpeculativeConfig(num_draft_tokens=4, adaptive=True, max_context=pair.max_context),
        )
        drafted = accepted = rejected_rounds = long_runs = 0
        for text in PROMPTS:
            prompt = encode_prompt(pair.tokenizer, text)
            expected = target_greedy(pair.target, prompt, MAX_TOKENS, eos)
            result = engine.run(prompt, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
            assert result.tokens == expected, (name, text)
            s = result.stats
            drafted += s.drafted
            accepted += s.accepted
            rejected_rounds += len(result.rejections)
            long_runs += sum(s.accepted_per_position[2:])  # accepted at the 3rd position or later
        assert drafted > 0 and accepted / drafted > min_acceptance, (name, accepted, drafted)
        assert long_runs > 0, name  # several draft tokens accepted in one round
        if name == "skip-two-middle":
            assert rejected_rounds > 0  # and rounds that trimmed the caches back


def test_real_pair_prompt_cache_changes_nothing(smollm_pair) -> None:
    """A 3-turn conversation with the prompt cache on gives the same answers as without."""
    from daemon.core.prompt_cache import PromptCache

    pair = smollm_pair
    cfg = dict(lookup=True, max_context=pair.max_context)
    plain = SpeculativeEngine(pair.target, pair.draft, pair.tokenizer, SpeculativeConfig(**cfg))
    cached = SpeculativeEngine(
        pair.target,
        pair.draft,
        pair.tokenizer,
        SpeculativeConfig(**cfg),
        prompt_cache=PromptCache(4, 1 << 30),
    )
    history: list[dict[str, str]] = []
    for i, text in enumerate(PROMPTS):
        history.append({"role": "user", "content": text})
        prompt = encode_prompt(pair.tokenizer, history)
        params = SamplingParams(temperature=0.0, max_tokens=24)
        want, got = plain.run(prompt, params), cached.run(prompt, params)
        assert got.tokens == want.tokens, text
        assert (got.stats.cached_tokens > 0) == (i > 0)
        history.append({"role": "assistant", "content": got.text})


SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 40},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
        "topic": {"enum": ["python", "geography", "math", "other"]},
    },
    "required": ["answer", "confidence", "topic"],
    "additionalProperties": False,
}


def test_real_pair_json_schema_output_is_always_valid(smollm_pair) -> None:
    """20 requests with a JSON schema on the 135M model: every answer parses and follows it."""
    import json

    from daemon.core.constraints import Constraint

    pair = smollm_pair
    engine = SpeculativeEngine(
        pair.target,
        pair.draft,
        pair.tokenizer,
        SpeculativeConfig(lookup=True, cost_aware=True, max_context=pair.max_context),
    )
    questions = [f"{p} Answer in JSON." for p in PROMPTS] + [
        f"Question {i}: what is {i} times {i + 3}? Reply as JSON." for i in range(17)
    ]
    for i, q in enumerate(questions):
        params = SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=100)
        c = Constraint.json_schema(pair.tokenizer, SCHEMA)
        res = engine.run(encode_prompt(pair.tokenizer, q), params, constraint=c)
        assert res.finish_reason == "stop", (q, res.text)
        value = json.loads(res.text)
        assert set(value) == {"answer", "confidence", "topic"}, res.text
        assert isinstance(value["answer"], str) and len(value["answer"]) <= 40
        assert (
            0 <= value["confidence"] <= 100
            and value["topic"] in SCHEMA["properties"]["topic"]["enum"]
        )
