"""Logits processors (penalties, logit bias) and min-p keep speculative decoding lossless.

Greedy: the engine's output (model drafts, lookup proposals, adaptive rounds) is token for
token the target-only decoding of mlx-lm's own `generate_step` with the same processors, and
differs from plain greedy decoding (the control does something). The same holds in a batch
(`daemon.core.batch`: mlx-lm's BatchGenerator calls the processors with each member's tokens).
The sampled distribution under each control is tested in `test_lossless_sampling`.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors

from daemon.core import rounds as rounds_mod
from daemon.core.engine import (
    GenerationError,
    SamplingParams,
    SpeculativeConfig,
    SpeculativeEngine,
)
from daemon.core.sampling import apply_processors, logits_processors, process_logits
from daemon.serving.worker import GenerationWorker
from tests.core.test_engine import MIN_MARGIN, make_prompts, no_eos, reference_greedy
from tests.helpers import perturbed_copy
from tests.serving.test_worker import serve_all, submit

N = 32

CONTROLS: dict[str, dict] = {
    "repetition": {"repetition_penalty": 1.6, "repetition_context_size": 12},
    "presence": {"presence_penalty": 2.0, "presence_context_size": 16},
    "frequency": {"frequency_penalty": 1.2, "frequency_context_size": 24},
    "logit_bias": {"logit_bias": {40: 14.0, 41: 13.0, 77: -100.0}},
    "all": {
        "repetition_penalty": 1.3,
        "presence_penalty": 0.8,
        "frequency_penalty": 0.6,
        "logit_bias": {40: 3.0},
        "min_p": 0.2,
    },
}


def reference(model, prompt: list[int], n: int, control: dict) -> list[int]:
    """Target-only greedy decoding by mlx-lm with mlx-lm's processors; clear margins."""
    processors = make_logits_processors(
        control.get("logit_bias"),
        control.get("repetition_penalty"),
        control.get("repetition_context_size", 20),
        control.get("presence_penalty"),
        control.get("presence_context_size", 20),
        control.get("frequency_penalty"),
        control.get("frequency_context_size", 20),
    )
    out = []
    steps = generate_step(mx.array(prompt), model, max_tokens=n, logits_processors=processors)
    for tok, logprobs in steps:
        top2 = mx.sort(logprobs)[-2:].tolist()
        assert top2[1] - top2[0] > MIN_MARGIN, "near-tie; change the prompt"
        out.append(int(tok))
    return out


@pytest.fixture(scope="module")
def engine(tiny_tokenizer, tiny_target) -> SpeculativeEngine:
    draft = perturbed_copy(tiny_target, seed=1, noise=0.2)
    cfg = SpeculativeConfig(num_draft_tokens=3, max_draft_tokens=6, lookup=True)
    return SpeculativeEngine(tiny_target, draft, no_eos(tiny_tokenizer), cfg)


PROMPTS = slice(4, 9)


@pytest.mark.parametrize("name", list(CONTROLS))
def test_greedy_output_is_the_targets_under_each_control(engine, tiny_target, name) -> None:
    control = CONTROLS[name]
    changed = drafted = 0
    for prompt in make_prompts(engine.tokenizer, 12)[PROMPTS]:
        res = engine.run(prompt, SamplingParams(max_tokens=N, **control))
        assert res.tokens == reference(tiny_target, prompt, N, control), (name, prompt)
        changed += res.tokens != reference_greedy(tiny_target, prompt, N)
        drafted += res.stats.drafted
        assert res.stats.accepted > 0  # the rounds did accept drafts under the processors
    assert changed >= 3, f"{name} barely changes the output: the test would not see it"
    assert drafted > 0


def test_a_stale_history_is_caught(engine, tiny_target, monkeypatch) -> None:
    """The broken variant: every row of a round processed with the history before the round
    (the round's earlier draft tokens left out). The greedy comparison sees it."""

    def stale(processors, history, logits, drafted=None, offset=0):
        return apply_processors(processors, history, logits, None, 0)

    monkeypatch.setattr(rounds_mod, "apply_processors", stale)
    control = CONTROLS["repetition"]
    wrong = 0
    for prompt in make_prompts(engine.tokenizer, 12)[PROMPTS]:
        res = engine.run(prompt, SamplingParams(max_tokens=N, **control))
        wrong += res.tokens != reference(tiny_target, prompt, N, control)
    assert wrong >= 1


def test_greedy_in_a_batch_is_the_targets(engine, tiny_target) -> None:
    control = CONTROLS["all"]
    prompts = make_prompts(engine.tokenizer, 12)[PROMPTS]
    spec = SpeculativeEngine(engine.target, engine.draft, engine.tokenizer, engine.config)
    worker = GenerationWorker(spec, queue_size=32, batch_size=4)
    results = serve_all(worker, [submit(worker, p, max_tokens=N, **control) for p in prompts])
    for prompt, res in zip(prompts, results, strict=True):
        assert res.tokens == reference(tiny_target, prompt, N, control), prompt
    assert sum(r.stats.batched_tokens for r in results) > 0


def test_processors_read_the_rounds_own_draft_tokens() -> None:
    """Row j of a round follows the history and the first j draft tokens."""
    params = SamplingParams(frequency_penalty=1.0, frequency_context_size=8)
    procs = logits_processors(params)
    logits = mx.zeros((3, 6))
    out = apply_processors(procs, [1, 1], logits, mx.array([2, 1], dtype=mx.uint32))
    assert out.tolist() == [
        [0, -2, 0, 0, 0, 0],
        [0, -2, -1, 0, 0, 0],
        [0, -3, -1, 0, 0, 0],
    ]
    # the context window slides over the draft tokens too
    params = SamplingParams(presence_penalty=1.0, presence_context_size=2)
    out = apply_processors(logits_processors(params), [3, 4], logits, mx.array([5, 0]))
    assert out.tolist()[2] == [-1, 0, 0, 0, 0, -1]


def test_min_p_filters_relative_to_the_top_token() -> None:
    lp = mx.log(mx.array([0.5, 0.3, 0.15, 0.05]))
    kept = mx.exp(process_logits(lp, 1.0, min_p=0.25)).tolist()
    assert kept[3] == 0 and kept[2] > 0 and abs(sum(kept) - 1) < 1e-6
    assert process_logits(lp, 1.0, min_p=0.0).tolist() == pytest.approx(lp.tolist(), abs=1e-6)


@pytest.mark.parametrize(
    "bad",
    [
        {"min_p": 1.5},
        {"repetition_penalty": -1.0},
        {"presence_penalty": float("nan")},
        {"frequency_context_size": 0},
        {"logit_bias": {-1: 2.0}},
        {"logit_bias": {"5": 2.0}},
    ],
)
def test_bad_processor_values_are_refused(bad) -> None:
    with pytest.raises(GenerationError):
        SamplingParams(**bad).validate()


def reference_logprobs(model, prompt: list[int], n: int, control: dict) -> list:
    """(token, logprob, top-5 ids) by mlx-lm's target-only decoding with the processors."""
    processors = logits_processors(SamplingParams(**control))
    out = []
    steps = generate_step(mx.array(prompt), model, max_tokens=n, logits_processors=processors)
    for tok, logprobs in steps:
        top = mx.argsort(-logprobs)[:5].tolist()
        out.append((int(tok), logprobs[int(tok)].item(), top, logprobs[mx.array(top)].tolist()))
    return out


def check_logprobs(res, ref) -> None:
    assert len(res.logprobs) == len(res.tokens) == len(ref)
    for lp, (tok, value, top, top_values) in zip(res.logprobs, ref, strict=True):
        assert lp.token == tok
        assert lp.logprob == pytest.approx(value, abs=1e-4)
        assert [t for t, _ in lp.top] == top
        assert [v for _, v in lp.top] == pytest.approx(top_values, abs=1e-4)


@pytest.mark.parametrize("name", ["all", "repetition"])
def test_logprobs_are_the_targets(engine, tiny_target, name) -> None:
    """Each emitted token's log-probability and its top alternatives, from the verification
    pass, equal mlx-lm's target-only ones (after the same processors), drafts or not."""
    control = CONTROLS[name]
    for prompt in make_prompts(engine.tokenizer, 12)[PROMPTS]:
        res = engine.run(prompt, SamplingParams(max_tokens=N, logprobs=5, **control))
        assert res.stats.accepted > 0
        check_logprobs(res, reference_logprobs(tiny_target, prompt, N, control))
    res = engine.run(prompt, SamplingParams(max_tokens=N))
    assert res.logprobs == []  # not asked: not computed


def test_logprobs_in_a_batch_are_the_targets(engine, tiny_target) -> None:
    control = CONTROLS["all"]
    prompts = make_prompts(engine.tokenizer, 12)[PROMPTS]
    spec = SpeculativeEngine(engine.target, engine.draft, engine.tokenizer, engine.config)
    worker = GenerationWorker(spec, queue_size=32, batch_size=4)
    handles = [submit(worker, p, max_tokens=N, logprobs=5, **control) for p in prompts]
    results = serve_all(worker, handles)
    for prompt, res in zip(prompts, results, strict=True):
        check_logprobs(res, reference_logprobs(tiny_target, prompt, N, control))
    assert sum(r.stats.batched_tokens for r in results) > 0
