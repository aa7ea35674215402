"""Speculative sampling is lossless: the engine's samples are distributed as the target's.

The test (`check_distribution`) samples ``N`` continuations of ``LENGTH`` tokens with adaptive
draft length and top-k / top-p on, and checks every position, not only the first round: for
each position ``t`` and each prefix seen often enough, the counts of the next token must follow
the target's own processed distribution p(. | prompt + prefix), computed independently here
(numpy, from the target's raw logits). Per position, the chi-square statistics of all its
prefixes are summed (asymptotically chi-square with the summed degrees of freedom); a position
fails when its sum passes the ``ALPHA / LENGTH`` quantile (Bonferroni over positions, family
alpha 1e-3). Later positions are reached through accepted runs, rejections with a residual
sample, bonus tokens after a fully accepted round, and several rounds with their own keys and
trimmed caches, so each of those rules is under test.

Power: a deviation of total variation ``d`` in the next-token distribution after a prefix seen
``n`` times adds at least ``4 n d^2`` to the non-centrality of that position's statistic
(chi-square divergence >= 4 TV^2). At the first position (n = N = 3000, 2 degrees of freedom
with top-k 3, critical value 16.5 at alpha 1e-3 / 6) that is 30 for d = 0.05, detected with
probability ~0.9, and > 0.99 for d >= 0.07. The broken variants below deviate far more than
that, and the last tests show that each of them is rejected. Those sample ``N_SMALL`` = 1000:
there the weakest variant's statistic is still 2.3 times its critical value (stale history;
wrong residual 2.5, reused key 2.9), several standard deviations clear, and the samples are
seeded, so the outcome does not vary from run to run.

The broken variants live here, not in the engine: they replace `round_keys`,
`verify_sampled` and `trim_prompt_cache` in the engine's namespace for one test.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import trim_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from daemon.core import rounds as rounds_mod
from daemon.core.drafting import SuffixIndex
from daemon.core.engine import SamplingParams, SpeculativeConfig, SpeculativeEngine
from daemon.core.heads import prune_head
from daemon.core.policy import CONTINUED, SpeculationPolicy
from daemon.core.sampling import round_keys, verify_sampled
from tests.helpers import make_tiny_llama, perturbed_copy

VOCAB = 24
PROMPT = [7, 19, 3, 20]
LENGTH = 6  # tokens per sample: several rounds at k = 1..4
N = 3000
N_SMALL = 1000  # the broken variants (see the module docstring)
ALPHA = 1e-3
MIN_EXPECTED = 5.0  # pool a prefix's cells expected below this into one


# --------------------------------------------------------------------------- the reference


def np_processors(logits: np.ndarray, history: list[int], control: dict) -> np.ndarray:
    """The logits processors, by numpy from their definitions (mlx-lm's order): bias, then
    the repetition, presence and frequency penalties over their windows of ``history``."""
    x = logits.astype(np.float64)
    for t, b in control.get("logit_bias", {}).items():
        x[t] += b
    pen = control.get("repetition_penalty", 0)
    if pen not in (0, 1):
        for t in set(history[-control.get("repetition_context_size", 20) :]):
            x[t] = x[t] * pen if x[t] < 0 else x[t] / pen
    for t in set(history[-control.get("presence_context_size", 20) :]):
        x[t] -= control.get("presence_penalty", 0)
    for t in history[-control.get("frequency_context_size", 20) :]:
        x[t] -= control.get("frequency_penalty", 0)
    return x


def np_process(
    logits: np.ndarray,
    temperature: float,
    top_k: int,
    top_p: float,
    history: list[int] | None = None,
    control: dict | None = None,
) -> np.ndarray:
    """The target's sampling distribution, by numpy: the processors, temperature, top-k,
    top-p (ties kept), min-p."""
    control = control or {}
    x = np_processors(logits, history or [], control) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    if 0 < top_k < len(p):
        p = np.where(p >= np.sort(p)[-top_k], p, 0)
        p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]
        keep = np.zeros_like(p, dtype=bool)
        keep[order[before < top_p]] = True
        p = np.where(keep, p, 0)
        p /= p.sum()
    min_p = control.get("min_p", 0)
    if min_p:
        p = np.where(p >= min_p * p.max(), p, 0)
        p /= p.sum()
    return p


def chi2_quantile(df: int, alpha: float) -> float:
    """Wilson-Hilferty approximation of the upper ``alpha`` quantile of chi-square(df)."""
    z = _normal_quantile(1 - alpha)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _normal_quantile(q: float) -> float:
    lo, hi = -10.0, 10.0
    for _ in range(100):  # bisection on the normal CDF
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass
class PositionTest:
    position: int
    chi2: float
    df: int
    critical: float
    prefixes: int
    outside_support: int  # tokens sampled where the target gives probability 0

    @property
    def rejected(self) -> bool:
        return self.outside_support > 0 or (self.df > 0 and self.chi2 > self.critical)


def distribution_tests(
    target,
    samples: list[list[int]],
    temperature: float,
    top_k: int,
    top_p: float,
    control: dict | None = None,
) -> list[PositionTest]:
    """One chi-square test per position over the prefixes seen at least 20 times."""
    by_prefix: dict[tuple[int, ...], Counter[int]] = defaultdict(Counter)
    for s in samples:
        assert len(s) == LENGTH
        for t in range(LENGTH):
            by_prefix[tuple(s[:t])][s[t]] += 1
    tests = []
    for t in range(LENGTH):
        chi2, df, used, outside = 0.0, 0, 0, 0
        for prefix, counts in by_prefix.items():
            n = sum(counts.values())
            if len(prefix) != t or n < 20:
                continue
            logits = np.array(target(mx.array(PROMPT + list(prefix))[None])[0, -1, :VOCAB])
            history = PROMPT + list(prefix)
            p = np_process(logits, temperature, top_k, top_p, history, control)
            outside += sum(c for x, c in counts.items() if p[x] == 0)
            expected = n * p
            big = [x for x in range(VOCAB) if expected[x] >= MIN_EXPECTED]
            small_e = sum(expected[x] for x in range(VOCAB) if x not in big)
            small_o = sum(c for x, c in counts.items() if x not in big)
            stat = sum((counts[x] - expected[x]) ** 2 / expected[x] for x in big)
            cells = len(big)
            if small_e > 0:
                stat += (small_o - small_e) ** 2 / small_e
                cells += 1
            if cells > 1:
                chi2 += stat
                df += cells - 1
                used += 1
        critical = chi2_quantile(df, ALPHA / LENGTH) if df else math.inf
        tests.append(PositionTest(t, chi2, df, critical, used, outside))
    return tests


# --------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def models(tiny_tokenizer: TokenizerWrapper):
    target = make_tiny_llama(
        VOCAB, seed=3, hidden_size=32, num_hidden_layers=1, intermediate_size=64, lm_head_scale=4
    )
    draft = perturbed_copy(target, seed=4, noise=0.3, extra_vocab=4)  # padded draft vocab
    tok = TokenizerWrapper(
        tiny_tokenizer._tokenizer, detokenizer_class=type(tiny_tokenizer._detokenizer)
    )
    tok.eos_token_ids = []  # always LENGTH tokens
    return target, draft, tok


def sample(
    models,
    temperature: float,
    top_k: int,
    top_p: float,
    strict: bool = True,
    cfg: SpeculativeConfig | None = None,
    suffix: SuffixIndex | None = None,
    seeded: bool = True,
    control: dict | None = None,
    n: int = N,
):
    target, draft, tok = models
    cfg = cfg or SpeculativeConfig(
        num_draft_tokens=2, adaptive=True, min_draft_tokens=1, max_draft_tokens=4
    )
    engine = SpeculativeEngine(target, draft, tok, cfg, suffix=suffix)
    samples, drafted, accepted, full_rounds, rounds = [], 0, 0, 0, 0
    by_source: Counter[str] = Counter()
    random.seed(12345)  # the engine draws an unseeded request's key from `random`
    for seed in range(n):
        params = SamplingParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed if seeded else None,
            max_tokens=LENGTH,
            **(control or {}),
        )
        res = engine.run(PROMPT, params)
        samples.append(res.tokens)
        s = res.stats
        drafted += s.drafted
        accepted += s.accepted
        rounds += s.num_drafts
        full_rounds += s.num_drafts - len(res.rejections)  # rounds that ended with a bonus token
        by_source.update(s.drafted_by_source)
        for r in res.rejections:  # (a broken rule may break this too: only the test counts)
            assert not strict or r.target_token == res.tokens[r.position] != r.draft_token
    return samples, {
        "acceptance": accepted / drafted,
        "bonus_rounds": full_rounds / rounds,
        "rounds_per_sample": rounds / n,
        "drafted_by_source": dict(by_source),
    }


CONFIGS = [(1.0, 3, 1.0), (1.2, 0, 0.85)]  # top-k; top-p over the whole vocabulary


@pytest.fixture(scope="module")
def plain_samples(models) -> dict[tuple[float, int, float], tuple[list[list[int]], dict]]:
    """Samples of the default engine per configuration, drawn once for the module."""
    return {}


def plain(models, samples_by_config, config):
    if config not in samples_by_config:
        samples_by_config[config] = sample(models, *config)
    return samples_by_config[config]


@pytest.mark.parametrize("temperature,top_k,top_p", CONFIGS)
def test_sampled_output_is_distributed_as_the_target(
    models, plain_samples, temperature, top_k, top_p
):
    samples, stats = plain(models, plain_samples, (temperature, top_k, top_p))
    # The rounds this test needs happened often: rejections, bonus tokens, several rounds.
    assert 0.2 < stats["acceptance"] < 0.9, stats
    assert stats["bonus_rounds"] > 0.1, stats
    assert stats["rounds_per_sample"] > 2, stats
    tests = distribution_tests(models[0], samples, temperature, top_k, top_p)
    assert all(t.df > 0 for t in tests), tests
    assert not [t for t in tests if t.rejected], tests


def hybrid_samples(models, plain_samples, max_draft_tokens: int = 4, continued: bool = False):
    """Samples of cost-aware rounds over lookup, a suffix index of the target's own samples
    (the proposals will often be right) and the model draft, unseeded (a seeded request never
    drafts from the suffix index or the policy)."""
    temperature, top_k, top_p = 1.0, 3, 1.0
    seeds, _ = plain(models, plain_samples, (temperature, top_k, top_p))
    suffix = SuffixIndex(budget=1 << 16)
    for s in seeds[:300]:
        suffix.add(PROMPT + s)
    cfg = SpeculativeConfig(
        num_draft_tokens=2,
        min_draft_tokens=1,
        max_draft_tokens=max_draft_tokens,
        lookup=True,
        cost_aware=True,
        max_proposal_tokens=4,
        # continued: one copied token per matched token, so proposals run out before a
        # round's limit (a sample is 6 tokens long) and the model goes on after them
        tokens_per_match=1 if continued else 2,
        continue_proposals=continued,
    )
    return sample(models, temperature, top_k, top_p, cfg=cfg, suffix=suffix, seeded=False)


def test_proposal_and_hybrid_rounds_keep_the_distribution(models, plain_samples) -> None:
    """Lookup and suffix proposals are verified as point masses (q = 1 on the proposed
    token), and the cost-aware policy mixes them with model drafts and plain target steps."""
    temperature, top_k, top_p = 1.0, 3, 1.0
    samples, stats = hybrid_samples(models, plain_samples)
    used = stats["drafted_by_source"]
    assert used.get("suffix", 0) > 1000 and used.get("model", 0) > 0, stats
    assert 0.2 < stats["acceptance"], stats
    tests = distribution_tests(models[0], samples, temperature, top_k, top_p)
    assert not [t for t in tests if t.rejected], tests


def test_a_pruned_draft_head_keeps_the_distribution(models) -> None:
    """A draft whose head covers half the vocabulary has q = 0 on the other half, tokens
    the target does sample: they come only from residual and bonus samples."""
    target, _, tok = models
    draft = perturbed_copy(target, seed=4, noise=0.3, extra_vocab=4)
    prune_head(draft, list(range(0, VOCAB, 2)))
    temperature, top_k, top_p = 1.0, 3, 1.0
    samples, stats = sample((target, draft, tok), temperature, top_k, top_p)
    assert 0.1 < stats["acceptance"] < 0.9, stats
    assert any(t % 2 for s in samples for t in s)  # tokens the draft cannot propose
    tests = distribution_tests(target, samples, temperature, top_k, top_p)
    assert not [t for t in tests if t.rejected], tests


# Each logits processor and min-p: p and q processed alike at every position of a round.
CONTROLS = {
    "repetition": {"repetition_penalty": 2.0, "repetition_context_size": 4},
    "presence and frequency": {
        "presence_penalty": 1.0,
        "presence_context_size": 3,
        "frequency_penalty": 0.8,
        "frequency_context_size": 6,
    },
    "logit bias and min-p": {"logit_bias": {5: 2.0, 11: 1.5, 2: -3.0}, "min_p": 0.05},
}


@pytest.mark.parametrize("name", list(CONTROLS))
def test_each_control_keeps_the_distribution(models, name) -> None:
    control = CONTROLS[name]
    samples, stats = sample(models, 1.0, 0, 1.0, control=control)
    assert 0.2 < stats["acceptance"] < 0.95, stats
    tests = distribution_tests(models[0], samples, 1.0, 0, 1.0, control)
    assert all(t.df > 0 for t in tests), tests
    assert not [t for t in tests if t.rejected], tests
    # the control matters here: the unprocessed target is rejected by the same test
    plain = distribution_tests(models[0], samples, 1.0, 0, 1.0)
    assert [t for t in plain if t.rejected], (name, plain)


# --------------------------------------------------------------------------- broken variants


def bonus_is_argmax(lp, q_lp, drafted, accept_key, sample_key):
    """Bonus token from argmax(p) instead of a sample of p."""
    accept, qx, choice = verify_sampled(lp, q_lp, drafted, accept_key, sample_key)
    k = drafted.shape[0]
    return accept, qx, mx.concatenate([choice[:k], mx.argmax(lp[k:], axis=-1)])


def residual_is_p(lp, q_lp, drafted, accept_key, sample_key):
    """After a rejection, resample from p instead of normalise(max(0, p - q))."""
    accept, qx, _ = verify_sampled(lp, q_lp, drafted, accept_key, sample_key)
    return accept, qx, mx.random.categorical(lp, key=sample_key)


def key_reused(key, k):
    """Every round starts from the same key."""
    _, keys = round_keys(key, k)
    return key, keys


def trims_one_short(cache, n):
    """Rewind the caches by one position too few (a rejected token's state stays)."""
    return trim_prompt_cache(cache, max(n - 1, 0))


BROKEN: dict[str, tuple[str, Callable]] = {
    "wrong bonus token": ("verify_sampled", bonus_is_argmax),
    "wrong residual": ("verify_sampled", residual_is_p),
    "reused random key": ("round_keys", key_reused),
    "mis-trimmed cache": ("trim_prompt_cache", trims_one_short),
}


def stale_history(processors, history, logits, drafted=None, offset=0):
    """Every row of a round processed with the history before the round (its own earlier
    draft tokens left out)."""
    return rounds_mod_apply(processors, history, logits, None, 0)


rounds_mod_apply = rounds_mod.apply_processors


@pytest.mark.slow
def test_a_stale_history_is_rejected(models, monkeypatch) -> None:
    """Processing p and q alike is not enough: each row needs the tokens before it."""
    control = CONTROLS["repetition"]
    monkeypatch.setattr(rounds_mod, "apply_processors", stale_history)
    samples, _ = sample(models, 1.0, 0, 1.0, strict=False, control=control, n=N_SMALL)
    tests = distribution_tests(models[0], samples, 1.0, 0, 1.0, control)
    assert [t for t in tests if t.rejected], tests


@contextmanager
def broken(monkeypatch: pytest.MonkeyPatch, name: str) -> Iterator[None]:
    attr, fn = BROKEN[name]
    with monkeypatch.context() as m:
        m.setattr(rounds_mod, attr, fn)
        yield


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BROKEN))
def test_each_broken_rule_is_rejected(models, monkeypatch, name):
    temperature, top_k, top_p = CONFIGS[0]
    with broken(monkeypatch, name):
        samples, _ = sample(models, temperature, top_k, top_p, strict=False, n=N_SMALL)
    tests = distribution_tests(models[0], samples, temperature, top_k, top_p)
    assert [t for t in tests if t.rejected], (name, tests)


def test_proposals_continued_by_the_model_keep_the_distribution(
    models, plain_samples, monkeypatch
) -> None:
    """A round of a proposal's point masses and then the model's own samples (each position
    verified against its own draft distribution) is exact too; the policy is made to continue
    every proposal that runs out."""
    monkeypatch.setattr(SpeculationPolicy, "rate_continued", lambda self, *a: 1e9)
    temperature, top_k, top_p = 1.0, 3, 1.0
    samples, stats = hybrid_samples(models, plain_samples, max_draft_tokens=2, continued=True)
    assert stats["drafted_by_source"].get(CONTINUED, 0) > 1000, stats
    tests = distribution_tests(models[0], samples, temperature, top_k, top_p)
    assert not [t for t in tests if t.rejected], tests
