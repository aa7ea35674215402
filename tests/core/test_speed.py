"""Expected speed from teacher-forced matches (what the speed gate compares)."""

from __future__ import annotations

import random

import pytest

from daemon.core.policy import SpeculationPolicy
from daemon.core.speed import StepCosts, compare, estimate, round_walk

# a CPU-like pair: extra verify rows cost, a draft token is a fifth of a target step
COSTS = StepCosts(target=1.0, verify=[1.1 + 0.1 * k for k in range(1, 9)], draft=0.2)


def rows(rate: float, n: int = 30, length: int = 80, seed: int = 0) -> list[list[bool]]:
    rng = random.Random(seed)
    return [[rng.random() < rate for _ in range(length)] for _ in range(n)]


def test_round_walk_counts_rounds() -> None:
    assert round_walk([], 3) == 0
    assert round_walk([False] * 5, 3) == 5  # every round emits the target's token only
    assert round_walk([True] * 8, 3) == 2  # 3 accepted + 1 per round
    # accepted 2 (stop at the miss), then the correction; then 1 accepted of the last two
    assert round_walk([True, True, False, True, False], 4) == 2


def test_estimate_picks_the_best_length_or_none() -> None:
    none = estimate(rows(0.0), COSTS)
    assert none.k == 0 and none.speedup == 1.0  # drafting never pays: the target alone
    perfect = estimate([[True] * 80] * 5, COSTS)
    # k tokens + 1 per round at cost 1.1 + 0.1 k + 0.2 k: the longest k pays most here
    assert perfect.k == 8
    assert perfect.speedup == pytest.approx(80 / (9 * (1.1 + 0.8 + 1.6)), rel=0.02)
    mid = estimate(rows(0.6), COSTS)
    assert 1 <= mid.k < 8 and 1.0 < mid.speedup < perfect.speedup


def test_compare_is_paired_and_bounded() -> None:
    before = rows(0.3, seed=1)
    better = compare(before, rows(0.7, seed=2), COSTS, confidence=0.9)
    assert better.better and better.lower > 0 and better.delta > better.lower
    same = compare(before, before, COSTS)
    assert not same.better and same.delta == 0
    worse = compare(rows(0.7, seed=2), rows(0.4, seed=3), COSTS)
    assert not worse.better and worse.delta < 0
    # drafting does not pay at 0.3 either way: both are the target alone, no gain
    assert compare(before, rows(0.1, seed=3), COSTS).delta == 0
    # a small gain on 3 noisy rows is not enough evidence
    tiny = compare(rows(0.5, n=3, seed=4), rows(0.52, n=3, seed=5), COSTS)
    assert not tiny.better
    with pytest.raises(ValueError):
        compare(before, before[:-1], COSTS)


def test_costs_come_from_the_live_policy_once_measured() -> None:
    policy = SpeculationPolicy(8, 16)
    assert StepCosts.from_policy(policy) is None
    policy.verify_s[1] = 0.07
    policy.verify_s[4] = 0.09
    policy.draft_token_s = 0.01
    costs = StepCosts.from_policy(policy)
    assert costs is not None and costs.source == "service"
    assert costs.target == pytest.approx(0.07) and costs.verify[2] == pytest.approx(0.09)
    assert StepCosts.from_dict(costs.to_dict()).verify == pytest.approx(costs.verify, abs=1e-6)


def test_measured_costs_time_every_row_count_in_turn_within_each_repetition() -> None:
    """The row counts are interleaved, so a load that changes while they are timed moves all
    of them alike (their ratios price the gate's rounds)."""
    from daemon.core.speed import MAX_K, measure_costs
    from tests.helpers import make_tiny_llama

    target = make_tiny_llama(64, seed=1)
    draft = make_tiny_llama(64, seed=2, num_hidden_layers=1)
    calls: list[int] = []

    class Counted:
        def __init__(self, model) -> None:
            self.model = model
            self.layers = model.layers

        def __call__(self, inputs, cache=None):
            if inputs.shape[1] <= MAX_K + 1:  # not the context that primes a cache
                calls.append(int(inputs.shape[1]))
            return self.model(inputs, cache=cache)

    costs = measure_costs(Counted(target), draft, context=16, repeats=3)
    assert calls == list(range(1, MAX_K + 2)) * 3
    assert len(costs.verify) == MAX_K and costs.target > 0 and costs.draft > 0


def test_a_feature_drafts_later_tokens_are_priced_apart() -> None:
    """A round's first feature-draft token goes through the fold of the target's layers, the
    later ones read the draft's own output: each is timed, and a round costs its first token
    once and the later price for the rest."""
    from daemon.core.feature_draft import make_feature_draft
    from daemon.core.speed import measure_costs
    from tests.helpers import make_tiny_llama

    costs = StepCosts(target=1.0, verify=[1.2] * 8, draft=0.2, draft_next=0.1)
    assert costs.round_cost(3) == pytest.approx(1.2 + 0.2 + 2 * 0.1)
    assert StepCosts(1.0, [1.2] * 8, 0.2).round_cost(3) == pytest.approx(1.2 + 3 * 0.2)
    assert StepCosts.from_dict(costs.to_dict()).draft_next == pytest.approx(0.1)
    assert StepCosts.from_dict(COSTS.to_dict()).draft_next is None  # files written before

    target = make_tiny_llama(64, seed=1)
    tapped = measure_costs(target, make_feature_draft(target, taps=(0,)), context=16, repeats=3)
    assert tapped.draft_next is not None and tapped.draft_next > 0
    plain = measure_costs(target, make_tiny_llama(64, seed=2, num_hidden_layers=1), 16, 3)
    assert plain.draft_next is None  # a model draft's tokens all cost the same
