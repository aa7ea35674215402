"""Model rounds gated by the draft's confidence (`daemon.core.confidence`): the decisions,
and that the output stays the target's, greedy token for token and sampled in distribution
(the chi-square harness of test_lossless_sampling), with a gate that decides on the drawn
token's own probability shown to fail it."""

from __future__ import annotations

import mlx.core as mx
import pytest

from daemon.core import rounds as rounds_mod
from daemon.core.confidence import Calibration, GatedRound, bucket, confidence_of, gated_rate
from daemon.core.engine import SamplingParams, SpeculativeConfig, SpeculativeEngine
from daemon.core.feature_draft import make_feature_draft
from daemon.core.policy import Choice, SpeculationPolicy
from tests.core import test_lossless_sampling as lossless
from tests.core.test_lossless_sampling import models  # noqa: F401  (the fixture)
from tests.helpers import make_tiny_llama, perturbed_copy


def verify(rows: int) -> float:  # a CPU's: each extra row 13% of a one-row pass
    return 1.0 + 0.13 * (rows - 1)


def draft(tokens: int) -> float:
    return 0.08 * tokens


def round_(limit: int = 4) -> GatedRound:
    return GatedRound(Calibration(), verify, draft, limit)


def test_a_confident_token_is_kept_and_an_unsure_one_dropped() -> None:
    g = round_()
    assert g.offer(0.97)  # acceptance ~0.975: worth 13% more
    assert g.more()
    assert not g.offer(0.05)  # ~0.05 would not pay for its row
    assert (g.kept, g.drafted) == (1, 2)
    assert not g.more()  # the round ends at a dropped token
    assert not round_().offer(0.02)  # a plain step: nothing verified


def test_a_round_stops_at_its_limit() -> None:
    g = round_(limit=2)
    assert g.offer(0.99) and g.more() and g.offer(0.99)
    assert not g.more()


def test_more_is_not_drafted_where_the_draft_is_rarely_right() -> None:
    cal = Calibration()
    cal.share = [1.0] + [0.0] * (len(cal.share) - 1)  # it is always unsure
    g = GatedRound(cal, verify, draft, 4)
    assert g.offer(0.99)
    assert not g.more()


def test_calibration_learns_from_reached_tokens_only() -> None:
    cal = Calibration()
    b_hi, b_lo = bucket(0.99), bucket(0.15)
    hi, lo = cal.accept[b_hi], cal.accept[b_lo]
    cal.observe([0.99, 0.15, 0.99], verified=2, accepted=0)  # the first rejected
    assert cal.accept[b_hi] < hi  # it was reached and wrong
    assert cal.accept[b_lo] == lo  # after a rejection: says nothing
    assert cal.tokens == 3 and cal.share[b_hi] > cal.share[b_lo]


def test_gated_rate_beats_plain_decoding_only_with_confident_tokens() -> None:
    cal = Calibration()
    plain = 1.0 / (verify(1) + draft(1))
    cal.share = [0.0] * (len(cal.share) - 1) + [1.0]  # always sure, and right
    assert gated_rate(cal, verify, draft) > 1.5 * plain
    cal.share = [1.0] + [0.0] * (len(cal.share) - 1)  # always unsure: the token's cost only
    assert gated_rate(cal, verify, draft) == pytest.approx(plain)


def test_confidence_is_the_largest_probability() -> None:
    logits = mx.array([0.0, 1.0, 3.0])
    assert confidence_of(logits).item() == pytest.approx(mx.softmax(logits).max().item())
    assert confidence_of(logits - mx.logsumexp(logits)).item() == pytest.approx(
        mx.softmax(logits).max().item()
    )


# --------------------------------------------------------------------------- engine


@pytest.fixture(scope="module", params=["model", "feature"])
def pair(tiny_tokenizer, request):
    """A token draft (a perturbed copy) or a feature draft (its drafted entries trimmed
    differently), each with a threshold its confidences fall on both sides of."""
    target = make_tiny_llama(len(tiny_tokenizer), seed=0)
    if request.param == "model":
        return target, perturbed_copy(target, seed=1, noise=0.3), tiny_tokenizer, 0.45
    return target, make_feature_draft(target), tiny_tokenizer, FEATURE_THRESHOLD


FEATURE_THRESHOLD = 0.42


def gated_config(**kw) -> SpeculativeConfig:
    return SpeculativeConfig(cost_aware=True, draft_confidence=True, max_draft_tokens=4, **kw)


class Spy:
    """What the gated rounds did: tokens drafted, kept, dropped."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, threshold: float | None) -> None:
        self.kept = self.dropped = 0
        spy = self
        offer = GatedRound.offer

        def counted(self: GatedRound, confidence: float) -> bool:
            keep = offer(self, confidence) if threshold is None else confidence >= threshold
            if keep and threshold is not None:  # the round's own bookkeeping, forced
                self.drafted += 1
                self.kept += 1
                self.confidences.append(confidence)
            elif threshold is not None:
                self.drafted += 1
                self.confidences.append(confidence)
            spy.kept += keep
            spy.dropped += not keep
            return keep

        monkeypatch.setattr(GatedRound, "offer", counted)
        if threshold is not None:  # as long as the draft is sure, it goes on
            monkeypatch.setattr(GatedRound, "more", lambda self: self.kept < self.limit)
        # every round a model round: the gate decides what is verified
        monkeypatch.setattr(SpeculationPolicy, "rate", lambda self, source, k, m=0: float(k))


def test_gated_greedy_output_is_the_targets(pair, monkeypatch) -> None:
    target, draft_model, tok, threshold = pair
    spy = Spy(monkeypatch, threshold=threshold)
    engine = SpeculativeEngine(target, draft_model, tok, gated_config())
    plain = SpeculativeEngine(target, draft_model, tok, SpeculativeConfig())
    for prompt in ([5, 6, 7, 8], [11, 3, 40, 9, 2]):
        params = SamplingParams(max_tokens=40)
        got = engine.run(prompt, params)
        assert got.tokens == plain.run(prompt, params).tokens
    assert spy.kept > 10 and spy.dropped > 10, (spy.kept, spy.dropped)


def test_the_live_gate_keeps_the_output_and_learns(pair) -> None:
    target, draft_model, tok, _ = pair
    engine = SpeculativeEngine(target, draft_model, tok, gated_config())
    plain = SpeculativeEngine(target, draft_model, tok, SpeculativeConfig())
    params = SamplingParams(max_tokens=48)
    assert engine.run([5, 6, 7, 8], params).tokens == plain.run([5, 6, 7, 8], params).tokens
    assert engine.policy.calibration.tokens > 0


# --------------------------------------------------------------------------- sampled


def sampled_by_token(dist: mx.array, key: mx.array | None) -> tuple[mx.array, mx.array]:
    """Broken: the confidence of the token drawn, not of the distribution."""
    tok, _ = PICK(dist, key)
    return tok, mx.exp(dist[tok] - mx.logsumexp(dist))


PICK = rounds_mod.pick
THRESHOLD = 0.55  # the tiny draft's confidences fall on both sides of it


def gated_samples(pair_models, monkeypatch, n: int = lossless.N):
    spy = Spy(monkeypatch, threshold=THRESHOLD)
    temperature, top_k, top_p = lossless.CONFIGS[0]
    samples, stats = lossless.sample(
        pair_models, temperature, top_k, top_p, strict=False, cfg=gated_config(), seeded=False, n=n
    )
    return samples, stats, spy


def test_gated_sampled_output_is_distributed_as_the_target(models, monkeypatch) -> None:  # noqa: F811
    samples, stats, spy = gated_samples(models, monkeypatch)
    assert spy.kept > 1000 and spy.dropped > 1000, (spy.kept, spy.dropped)
    temperature, top_k, top_p = lossless.CONFIGS[0]
    tests = lossless.distribution_tests(models[0], samples, temperature, top_k, top_p)
    assert not [t for t in tests if t.rejected], tests


@pytest.mark.slow
def test_a_gate_on_the_drawn_token_is_caught(models, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setattr(rounds_mod, "pick", sampled_by_token)
    samples, _, spy = gated_samples(models, monkeypatch, n=lossless.N_SMALL)
    temperature, top_k, top_p = lossless.CONFIGS[0]
    tests = lossless.distribution_tests(models[0], samples, temperature, top_k, top_p)
    assert [t for t in tests if t.rejected], tests


def test_status_shows_the_calibration_only_when_gated() -> None:
    policy = SpeculationPolicy(4, 16, confident=True)
    policy.calibration.observe([0.99], verified=1, accepted=1)
    shown = policy.measured().to_dict()["confidence"]
    assert isinstance(shown, dict) and shown["tokens"] == 1
    assert len(shown["acceptance"]) == len(shown["edges"]) + 1
    assert "confidence" not in SpeculationPolicy(4, 16).measured().to_dict()


def test_a_probe_is_not_gated() -> None:
    """A probe measures a verified token (its row's cost, its acceptance), which the gate's
    own decisions rest on: a gate that dropped it could keep a stale cost forever."""
    policy = SpeculationPolicy(4, 16, confident=True)
    policy.new_request(1)
    # a 2-row pass once timed in a slow moment
    policy.verify_s, policy.draft_token_s = {1: 1.0, 2: 5.0}, 0.1
    assert policy.choose(None, 64) == Choice("none", 0)
    policy._since_model, policy._since_model_s = 16, 1e9
    probe = policy.choose(None, 64)
    assert (probe.source, probe.k, probe.gated) == ("model", 1, False)
    policy.verify_s[2] = 1.05  # cheap again: a gated round, planned at the most
    assert policy.choose(None, 64) == Choice("model", 4, gated=True)
