"""Drafting without a model: the n-gram indexes, the cost-aware policy, and the engine's
rounds that use them (greedy output still token for token the target's)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import TokenizerWrapper

from daemon.core.drafting import ContextIndex, NgramIndex, Proposal, SuffixIndex, SuffixProposer
from daemon.core.engine import SamplingParams, SpeculativeConfig, SpeculativeEngine
from daemon.core.policy import (
    CONTINUED,
    PROBE_EVERY,
    PROBE_SHARE,
    Choice,
    SpeculationPolicy,
    evidence_key,
)
from tests.helpers import make_tiny_llama, perturbed_copy

# --------------------------------------------------------------------------- indexes


def test_longest_match_wins_and_continues_its_latest_occurrence() -> None:
    idx = NgramIndex()
    idx.add_document([1, 2, 3, 4, 5, 1, 2, 9, 9])
    p = idx.propose([7, 1, 2], max_tokens=8)
    assert p == Proposal([9, 9], "lookup", 2, 2)  # "1 2" last ended before 9 9
    p = idx.propose([3, 4], max_tokens=8)
    assert p is not None and p.tokens == [5, 1, 2, 9] and p.match == 2  # 2 tokens per match
    assert idx.propose([3, 4], max_tokens=1).tokens == [5]  # type: ignore[union-attr]
    assert idx.propose([42], max_tokens=8) is None


def test_documents_never_run_into_each_other() -> None:
    idx = NgramIndex()
    idx.add_document([1, 2, 3])
    idx.add_document([4, 5, 6])
    assert idx.propose([2, 3], 8) is None  # nothing follows 2 3 in its own document
    spanning = idx.propose([3, 4], 8)  # no "3 4" across the boundary: only "4" matches
    assert spanning is not None and spanning.match == 1 and spanning.tokens == [5, 6]
    assert idx.propose([4, 5], 8).tokens == [6]  # type: ignore[union-attr]


def test_context_index_copies_an_earlier_occurrence_not_its_own_end() -> None:
    ctx = ContextIndex([10, 11, 12, 13, 14, 10, 11])
    p = ctx.propose(4)
    assert p is not None and p.tokens == [12, 13, 14, 10] and p.source == "lookup"
    ctx.extend([12])
    p = ctx.propose(4)
    assert p is not None and p.tokens == [13, 14, 10, 11]
    assert ContextIndex([5, 6, 7]).propose(4) is None  # nothing repeats yet


def test_suffix_index_keeps_a_token_budget_and_evicts_the_oldest() -> None:
    s = SuffixIndex(budget=12)
    s.add([1, 2, 3, 4])
    s.add([5, 6, 7, 8])
    assert s.propose([1, 2], 8) == Proposal([3, 4], "suffix", 2, 1)
    s.add([9, 10, 11, 12])  # 4 + 4 + 4 tokens and 2 boundaries: over budget
    assert s.stats()["tokens"] <= 12 and s.stats()["outputs"] == 2
    assert s.propose([1, 2], 8) is None  # the oldest output is gone
    assert s.propose([9, 10], 8).tokens == [11, 12]  # type: ignore[union-attr]
    assert s.propose([11], 8) is None  # one shared token is not enough across requests
    off = SuffixIndex(budget=0)
    off.add([1, 2, 3])
    assert off.propose([1, 2], 8) is None and off.stats()["tokens"] == 0


def test_a_suffix_proposer_continues_the_requests_own_last_tokens() -> None:
    index = SuffixIndex(budget=1024)
    index.add([1, 2, 3, 4, 5, 6])
    source = SuffixProposer(index, [9, 9, 1, 2])
    first = source.propose(8, tokens_per_match=2)
    assert first is not None and first.tokens == [3, 4, 5, 6] and first.source == "suffix"
    source.extend([3, 4])  # verified since: the context moves on
    after = source.propose(8, tokens_per_match=2)
    assert after is not None and after.tokens == [5, 6]


# --------------------------------------------------------------------------- policy


def test_policy_prefers_what_pays_and_probes_the_model() -> None:
    pol = SpeculationPolicy(max_model_tokens=4, max_proposal_tokens=8)
    pol.new_request(draft_serial=1)
    # A CPU-like cost: each extra verified row costs 40% of a one-row pass; the draft 30%.
    for rows in range(1, 10):
        pol.verify_s[rows] = 1.0 + 0.4 * (rows - 1)
    pol.draft_token_s = 0.3
    for _ in range(50):  # the model draft is bad, lookups are good
        pol.stats("model").observe(2, 0)
        pol.observe(Choice("lookup", 6, [1, 2, 3, 4, 5, 6], match=3), 6, 3.0, None)
    assert pol.choose(None, remaining=100).source == "none"  # drafting would not pay
    good = Proposal([1, 2, 3, 4, 5, 6], "lookup", 3, 1)
    plan = pol.choose(good, remaining=100)
    assert plan.source == "lookup" and plan.k >= 4 and plan.tokens == good.tokens[: plan.k]
    assert pol.choose(good, remaining=3).k <= 2  # never past the tokens left
    seen = {pol.choose(None, remaining=100).source for _ in range(PROBE_EVERY + 1)}
    assert seen == {"none", "model"}  # a bad draft is still probed now and then
    pol.new_request(draft_serial=2)  # another draft (an adapter swap): its estimates start over
    assert pol.stats("model").accept[0] == 0.5


def _decode_with_a_useless_draft(
    pol: SpeculationPolicy, verify: list[float], draft: float
) -> float:
    """Seconds probes cost beyond plain decoding, as a share of 2,000 rounds' time, where the
    model draft is never right and no proposal comes."""
    spent = extra = 0.0
    for _ in range(2000):
        plan = pol.choose(None, remaining=100)
        t = verify[plan.k] + (draft * plan.k)
        spent += t
        extra += t - verify[0]
        pol.observe(plan, 0, verify[plan.k], draft * plan.k if plan.k else None)
    return extra / spent


def test_probes_cost_a_bounded_share_where_verifying_two_rows_costs_twice_one() -> None:
    """A quantized target on a GPU: two rows cost 2x one. Probing every 16 rounds would cost
    ~7% of the speed; probes are spaced so that they cost ~PROBE_SHARE of it."""
    steep = [1.0, 2.0, 2.2, 2.4, 2.6]
    pol = SpeculationPolicy(max_model_tokens=4, max_proposal_tokens=8)
    pol.new_request(draft_serial=1)
    share = _decode_with_a_useless_draft(pol, steep, 0.25)
    assert 0.5 * PROBE_SHARE < share < 1.5 * PROBE_SHARE
    assert pol.stats("model").rounds > 20  # still probed, only less often
    # where a probe costs little (a CPU: two rows 1.13x one), every PROBE_EVERY rounds as before
    flat = [1.0, 1.13, 1.2, 1.3, 1.4]
    cpu = SpeculationPolicy(max_model_tokens=4, max_proposal_tokens=8)
    cpu.new_request(draft_serial=1)
    _decode_with_a_useless_draft(cpu, flat, 0.1)
    assert cpu.stats("model").rounds >= 2000 // (PROBE_EVERY + 1)


def test_an_untimed_one_row_pass_is_not_priced_above_timed_longer_ones() -> None:
    """Only a long round has been timed (milliseconds): plain decoding must not look slower
    than drafting with a draft that is never right, or it is never chosen nor timed."""
    pol = SpeculationPolicy(max_model_tokens=4, max_proposal_tokens=8)
    pol.new_request(draft_serial=1)
    pol.observe(Choice("lookup", 8, [1] * 8, match=8), 8, 0.029, None)
    for _ in range(30):
        pol.observe(Choice("model", 1), 0, 0.0085, 0.001)
    assert pol.verify_cost(1) <= 0.0085
    assert pol.choose(None, remaining=100).source == "none"


def test_acceptance_is_tracked_per_match_length() -> None:
    pol = SpeculationPolicy(max_model_tokens=0, max_proposal_tokens=8)
    for rows in range(1, 10):
        pol.verify_s[rows] = 1.0 + 0.4 * (rows - 1)
    for _ in range(50):  # one-token matches are wrong, long matches right
        pol.observe(Choice("lookup", 4, [1, 2, 3, 4], match=1), 0, 2.6, None)
        pol.observe(Choice("lookup", 4, [1, 2, 3, 4], match=8), 4, 2.6, None)
    weak = Proposal([1, 2, 3, 4], "lookup", 1, 1)
    strong = Proposal([1, 2, 3, 4], "lookup", 8, 1)
    assert pol.choose(weak, remaining=100).source == "none"
    assert pol.choose(strong, remaining=100).k == 4
    assert evidence_key("lookup", 3) == evidence_key("lookup", 4) != evidence_key("lookup", 5)


def _gpu_like(pol: SpeculationPolicy) -> None:
    """Verifying more rows costs little, a draft token 5% of a pass (a bf16 GPU or Mac)."""
    for rows in range(1, 40):
        pol.verify_s[rows] = 1.0 + 0.02 * (rows - 1)
    pol.draft_token_s = 0.05


def test_the_policy_continues_a_proposal_that_runs_out_where_it_pays() -> None:
    pol = SpeculationPolicy(max_model_tokens=4, max_proposal_tokens=8)
    _gpu_like(pol)
    for _ in range(50):  # lookups right; after them the model's first token right, not its second
        pol.observe(Choice("lookup", 5, [1, 2, 3, 4], match=3, then=1), 5, 1.1, None)
        pol.observe(Choice("lookup", 6, [1, 2, 3, 4], match=3, then=2), 5, 1.1, None)
    assert pol.stats(CONTINUED).accept[0] > 0.9 > 0.1 > pol.stats(CONTINUED).accept[1]
    short = Proposal([1, 2, 3], "lookup", 3, 1)
    plan = pol.choose(short, remaining=100, continues=True)
    assert plan.tokens == short.tokens and plan.then == 1 and plan.k == 4
    assert pol.choose(short, remaining=100).then == 0  # a drafter that cannot continue
    fresh = SpeculationPolicy(max_model_tokens=4, max_proposal_tokens=8)
    _gpu_like(fresh)
    for _ in range(50):  # nothing measured after copies yet: the model's own rounds count
        fresh.observe(Choice("lookup", 3, [1, 2, 3], match=3), 3, 1.1, None)
        fresh.observe(Choice("model", 2), 0, 1.1, None)
    assert fresh.choose(short, remaining=100, continues=True).then == 0
    assert pol.choose(short, remaining=5, continues=True).k <= 4  # never past the tokens left
    cut = Proposal(list(range(1, 9)), "lookup", 3, 1)  # as long as a proposal may be: not run out
    assert pol.choose(cut, remaining=100, continues=True).then == 0
    # where verifying a row costs 40% of a pass and a draft token 30%, continuing does not pay
    for rows in range(1, 40):
        pol.verify_s[rows] = 1.0 + 0.4 * (rows - 1)
    pol.draft_token_s = 0.3
    assert pol.choose(short, remaining=100, continues=True).then == 0


def test_the_models_tokens_after_a_proposal_are_judged_only_when_reached() -> None:
    pol = SpeculationPolicy(max_model_tokens=4, max_proposal_tokens=8)
    rejected_early = Choice("lookup", 6, [1, 2, 3, 4], match=2, then=2)
    for _ in range(30):
        pol.observe(rejected_early, 1, 1.0, None)  # the copy failed at its second token
    assert pol.stats(CONTINUED).rounds == 0  # the model's tokens were never judged
    assert pol.stats("lookup").accept[1] < 0.1 and pol.stats("lookup").accept[0] > 0.9
    pol.observe(Choice("lookup", 6, [1, 2, 3, 4], match=2, then=2), 4, 1.0, None)
    assert pol.stats(CONTINUED).rounds == 1 and pol.stats(CONTINUED).accept[0] < 0.5
    assert pol.draft_token_s is None  # a continued round's draft time is no per-token figure
    pol.new_request(draft_serial=7)  # a new draft: its continuation estimates start over
    assert CONTINUED not in pol.sources


def test_policy_learns_costs_from_observations() -> None:
    pol = SpeculationPolicy(max_model_tokens=4, max_proposal_tokens=8)
    for _ in range(60):
        pol.observe(Choice("none", 0), 0, verify_s=0.07, draft_s=None)
        pol.observe(Choice("model", 2), 2, verify_s=0.10, draft_s=0.02)
    assert pol.verify_cost(1) == pytest.approx(0.07, rel=0.01)
    assert pol.verify_cost(2) == pytest.approx(0.085, rel=0.05)  # interpolated
    assert pol.draft_token_s == pytest.approx(0.01, rel=0.01)
    assert pol.stats("model").accept[0] > 0.9
    # what it measured, as /status and bench speed show it: the figures it decides by
    m = pol.measured(positions=3)
    assert m.verify_s == {1: pol.verify_cost(1), 3: pol.verify_cost(3)}
    assert m.draft_token_s == pol.draft_token_s
    assert m.acceptance["model"] == pol.stats("model").accept[:3]
    assert m.rounds == {"model": 60}  # sources that drafted (k = 0 rounds time the target)
    assert m.to_dict()["verify_s"] == {
        "1": round(pol.verify_cost(1), 6),
        "3": round(pol.verify_cost(3), 6),
    }


def test_costs_measured_under_contention_do_not_linger() -> None:
    """A training run doubles every pass's time for a while; a row count used only then keeps
    its old figure, which follows the one-row time back down once the contention ends."""
    pol = SpeculationPolicy(max_model_tokens=0, max_proposal_tokens=8)
    for _ in range(30):
        pol.observe(Choice("none", 0), 0, verify_s=0.14, draft_s=None)  # contended
        pol.observe(Choice("lookup", 4, [1, 2, 3, 4], match=2), 4, verify_s=0.20, draft_s=None)
    for _ in range(60):
        pol.observe(Choice("none", 0), 0, verify_s=0.07, draft_s=None)  # calm again
    assert pol.verify_cost(1) == pytest.approx(0.07, rel=0.02)
    assert pol.verify_cost(5) == pytest.approx(0.10, rel=0.05)  # not 0.20


# --------------------------------------------------------------------------- the engine


def reference(model, prompt: list[int], n: int) -> list[int]:
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


@pytest.mark.parametrize("cost_aware", [False, True])
def test_greedy_with_lookup_and_suffix_equals_the_target(tiny_tokenizer, cost_aware) -> None:
    vocab = len(tiny_tokenizer)
    target = make_tiny_llama(vocab, seed=0)
    draft = perturbed_copy(target, seed=1, noise=0.3)
    tok = TokenizerWrapper(
        tiny_tokenizer._tokenizer, detokenizer_class=type(tiny_tokenizer._detokenizer)
    )
    tok.eos_token_ids = []  # always 24 tokens
    # Prompts that repeat themselves (as edits do), and past outputs of the target to copy.
    base = [tok.encode(s) for s in ("def main():\n    print('hello')", "the cat sat on the mat")]
    prompts = [p + p[: len(p) // 2] for p in base] + [base[1], [5, 6, 7]]
    suffix = SuffixIndex(budget=4096)
    for p in prompts:
        suffix.add(reference(target, p, 24))
    cfg = SpeculativeConfig(
        num_draft_tokens=3, lookup=True, cost_aware=cost_aware, max_proposal_tokens=8
    )
    engine = SpeculativeEngine(target, draft, tok, cfg, suffix=suffix)
    sources: dict[str, int] = {}
    accepted: dict[str, int] = {}
    for p in prompts:
        res = engine.run(p, SamplingParams(max_tokens=24))
        assert res.tokens == reference(target, p, 24), p
        for s, n in res.stats.drafted_by_source.items():
            sources[s] = sources.get(s, 0) + n
            accepted[s] = accepted.get(s, 0) + res.stats.accepted_by_source[s]
        assert res.stats.drafted == sum(res.stats.drafted_by_source.values())
        assert all(r.position < len(res.tokens) for r in res.rejections)
    assert {"lookup", "suffix"} <= sources.keys(), sources
    assert accepted["suffix"] > 0 and accepted["lookup"] > 0, accepted


def test_a_proposal_continued_by_the_draft_model_equals_the_target(
    tiny_tokenizer, monkeypatch
) -> None:
    """Every proposal that runs out is continued (the policy made to want it): the output is
    still the target's and the model's tokens are counted apart. The draft is the target
    itself, so a model token is wrong only if the draft did not read the proposal first."""
    monkeypatch.setattr(SpeculationPolicy, "rate_continued", lambda self, *a: 1e9)
    vocab = len(tiny_tokenizer)
    target = make_tiny_llama(vocab, seed=0)
    draft = perturbed_copy(target, seed=1, noise=0.0)
    tok = TokenizerWrapper(
        tiny_tokenizer._tokenizer, detokenizer_class=type(tiny_tokenizer._detokenizer)
    )
    tok.eos_token_ids = []
    base = [tok.encode(s) for s in ("def main():\n    print('hello')", "the cat sat on the mat")]
    prompts = [p + p[: len(p) // 2] for p in base]
    cfg = SpeculativeConfig(
        num_draft_tokens=3, lookup=True, cost_aware=True, max_proposal_tokens=8,
        continue_proposals=True,
    )  # fmt: skip
    engine = SpeculativeEngine(target, draft, tok, cfg)
    drafted = accepted = 0
    for p in prompts:
        res = engine.run(p, SamplingParams(max_tokens=32))
        assert res.tokens == reference(target, p, 32), p
        drafted += res.stats.drafted_by_source.get(CONTINUED, 0)
        accepted += res.stats.accepted_by_source.get(CONTINUED, 0)
        assert res.stats.drafted == sum(res.stats.drafted_by_source.values())
        assert not res.rejections  # every model token reached was right
    assert drafted > 0 and 0 < accepted < drafted, (drafted, accepted)
    # off by the key: never continued
    engine.config.continue_proposals = False
    res = engine.run(prompts[0], SamplingParams(max_tokens=32))
    assert CONTINUED not in res.stats.drafted_by_source


def test_a_model_drafter_reads_a_proposal_then_keeps_to_what_was_verified(tiny_tokenizer) -> None:
    """`read` + `first` give the draft's logits after the proposal; after `settle` the next
    round's logits are those over exactly the verified tokens (its cache trimmed to them)."""
    from mlx_lm.models.cache import make_prompt_cache

    from daemon.core.drafters import ModelDrafter

    draft = make_tiny_llama(len(tiny_tokenizer), seed=3)

    def prefill(model, cache, tokens):
        mx.eval(model(tokens[None], cache=cache))

    def expected(tokens: list[int]) -> mx.array:
        return draft(mx.array(tokens)[None])[0, -1]

    prompt, proposal = [5, 9, 2, 7], [11, 12, 13]
    drafter = ModelDrafter(draft, make_prompt_cache(draft), prompt, prefill)
    drafter.read(proposal)
    first = drafter.first()
    assert mx.allclose(first, expected(prompt + proposal), atol=1e-4)
    d1 = int(mx.argmax(first).item())
    second = drafter.next(mx.array(d1))
    assert mx.allclose(second, expected(prompt + proposal + [d1]), atol=1e-4)
    d2 = int(mx.argmax(second).item())
    drafted = proposal + [d1, d2]
    for accepted in (1, 4):  # the copy rejected at its second token; the model's second token
        emitted = drafted[:accepted] + [99]
        probe = ModelDrafter(draft, make_prompt_cache(draft), prompt, prefill)
        probe.read(proposal)
        probe.first()
        probe.next(mx.array(d1))
        probe.settle(len(drafted), accepted, drafted, emitted, None)
        assert mx.allclose(probe.first(), expected(prompt + emitted), atol=1e-4), accepted
