"""Constrained decoding (llguidance): valid output, and speculation stays lossless under it."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper

from daemon.core.constraints import Constraint, json_schema_grammar
from daemon.core.drafting import SuffixIndex
from daemon.core.engine import SamplingParams, SpeculativeConfig, SpeculativeEngine
from daemon.core.policy import CONTINUED, SpeculationPolicy
from daemon.errors import GenerationError
from tests.helpers import TINY_CORPUS, perturbed_copy

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "kind": {"enum": ["cat", "dog", "the cat sat"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["ok", "kind", "n"],
    "additionalProperties": False,
}


def constrained_greedy(model, tok: TokenizerWrapper, prompt: list[int], n: int) -> list[int]:
    """The reference: one full forward pass per token, logits masked, argmax."""
    c = Constraint.json_schema(tok, SCHEMA)
    vocab = model.args.vocab_size
    out: list[int] = []
    while len(out) < n and not c.done:
        logits = model(mx.array(prompt + out)[None])[0, -1, :vocab]
        logits = mx.where(mx.array(c.mask(vocab)), logits, -mx.inf)
        t = int(mx.argmax(logits).item())
        out.append(t)
        if t in tok.eos_token_ids:
            break
        c.consume([t])
    return out


@pytest.fixture
def engine(tiny_tokenizer, tiny_target) -> SpeculativeEngine:
    draft = perturbed_copy(tiny_target, seed=1, noise=0.2)
    suffix = SuffixIndex(1 << 12)
    suffix.add(tiny_tokenizer.encode('{"ok": true, "kind": "the cat sat", "n": 7}'))
    cfg = SpeculativeConfig(
        num_draft_tokens=3, max_draft_tokens=5, lookup=True, cost_aware=True, max_proposal_tokens=8
    )
    return SpeculativeEngine(tiny_target, draft, tiny_tokenizer, cfg, suffix=suffix)


@pytest.mark.parametrize("continued", [False, True])
def test_greedy_constrained_output_is_the_targets_and_valid(
    engine, tiny_tokenizer, monkeypatch, continued
) -> None:
    if continued:  # every proposal that runs out continued by the model, under the mask
        monkeypatch.setattr(SpeculationPolicy, "rate_continued", lambda self, *a: 1e9)
        engine.config.continue_proposals = True
    sources: set[str] = set()
    for text in TINY_CORPUS[:6]:
        prompt = tiny_tokenizer.encode(text)
        c = Constraint.json_schema(tiny_tokenizer, SCHEMA)
        res = engine.run(prompt, SamplingParams(max_tokens=60), constraint=c)
        assert res.tokens == constrained_greedy(engine.target, tiny_tokenizer, prompt, 60)
        assert res.finish_reason == "stop", res
        value = json.loads(res.text)
        assert (
            set(value) == {"ok", "kind", "n"}
            and value["kind"] in SCHEMA["properties"]["kind"]["enum"]
        )
        assert 0 <= value["n"] <= 99
        sources |= set(res.stats.drafted_by_source)
    assert "model" in sources or "suffix" in sources  # speculation did run under the mask
    assert not continued or CONTINUED in sources


def test_sampled_constrained_output_is_always_valid(engine, tiny_tokenizer) -> None:
    for seed in range(12):
        c = Constraint.json_schema(tiny_tokenizer, SCHEMA)
        params = SamplingParams(temperature=1.5, seed=seed, max_tokens=60)
        res = engine.run(tiny_tokenizer.encode(TINY_CORPUS[seed % 4]), params, constraint=c)
        assert res.finish_reason == "stop"
        assert json.loads(res.text)["ok"] in (True, False)


def test_bad_schemas_are_refused_with_the_reason() -> None:
    with pytest.raises(GenerationError, match="objectx"):
        json_schema_grammar({"type": "objectx"})
