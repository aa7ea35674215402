"""Expected speed of a draft on recorded traffic: what the adaptation gate compares.

Agreement alone does not say what users feel: a draft that agrees more but costs more per
token, or agrees on positions that never start a round, may serve slower. So a draft is scored
by the **expected tokens per second** of the pair on held-out rows, relative to the target
alone:

- Teacher-forced greedy matches per position (`daemon.core.evaluation`) give, for a round that
  drafts ``k`` tokens from position ``t``, the accepted count ``a`` (the matches from ``t`` on,
  at most ``k``) and the ``a + 1`` tokens it emits. Walking each row round by round gives its
  rounds for ``k`` (`round_walk`): exact for greedy decoding with a fixed ``k``.
- `StepCosts` are the measured seconds of a target pass over ``1`` and ``k + 1`` rows and of one
  draft token (the live engine's `SpeculationPolicy` measurements, or `measure_costs`).
- ``speedup(k) = sum(row tokens) * target / sum(rounds * (verify(k) + k * draft))``; a draft's
  score is its best ``k`` (the engine chooses each round's length, so this is a floor).

`compare` is the gate's paired test: the same holdout rows scored with the draft in service
and with the candidate, each at its own best ``k``, and a bootstrap over rows of the speedup
difference; the candidate is better with ``confidence`` when the difference's lower quantile
is above zero.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Comparison", "SpeedEstimate", "StepCosts", "compare", "estimate", "round_walk"]

MAX_K = 8
BOOTSTRAP = 1000


@dataclass
class StepCosts:
    """Seconds of a target pass over one row, over ``k + 1`` rows (``verify[k - 1]``, k = 1 ..)
    and of a round's first draft token; ``draft_next``: each later one where it differs (a
    feature draft's later tokens read its own output, without the fold of the target's
    layers), None where it is the same."""

    target: float
    verify: list[float]
    draft: float
    source: str = "measured"  # "service" (the live engine's figures) or "measured"
    draft_next: float | None = None

    def round_cost(self, k: int) -> float:
        if not k:
            return self.target
        later = self.draft if self.draft_next is None else self.draft_next
        return self.verify[k - 1] + self.draft + (k - 1) * later

    def to_dict(self) -> dict[str, Any]:
        out = {
            "target_s": round(self.target, 6),
            "verify_s": [round(v, 6) for v in self.verify],
            "draft_s": round(self.draft, 6),
            "source": self.source,
        }
        if self.draft_next is not None:
            out["draft_next_s"] = round(self.draft_next, 6)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepCosts:
        later = data.get("draft_next_s")
        return cls(
            target=float(data["target_s"]),
            verify=[float(v) for v in data["verify_s"]],
            draft=float(data["draft_s"]),
            source=str(data.get("source", "measured")),
            draft_next=None if later is None else float(later),
        )

    @classmethod
    def from_policy(cls, policy: Any, max_k: int = MAX_K) -> StepCosts | None:
        """The live engine's measurements (`daemon.core.policy.SpeculationPolicy`); None until
        it has timed the target's one-row pass and the draft."""
        if 1 not in policy.verify_s or policy.draft_token_s is None:
            return None
        return cls(
            target=policy.verify_cost(1),
            verify=[policy.verify_cost(k + 1) for k in range(1, max_k + 1)],
            draft=policy.draft_token_s,
            source="service",
        )


def round_walk(matches: Sequence[bool], k: int) -> int:
    """Rounds that emit a row's ``len(matches)`` tokens when every round drafts ``k``."""
    n, t, rounds = len(matches), 0, 0
    while t < n:
        a = 0
        while a < k and t + a < n and matches[t + a]:
            a += 1
        t += a + 1
        rounds += 1
    return rounds


@dataclass
class SpeedEstimate:
    """A draft's expected speed on some rows: best ``k``, the speedup there over the target
    alone, tokens per round, and the rows' rounds for that ``k`` (for the paired test)."""

    k: int
    speedup: float
    tokens_per_round: float
    rows: list[tuple[int, int]]  # (tokens, rounds) per row at k

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "speedup": round(self.speedup, 4),
            "tokens_per_round": round(self.tokens_per_round, 4),
        }


def _speedup(rows: Sequence[tuple[int, int]], k: int, costs: StepCosts) -> float:
    tokens = sum(t for t, _ in rows)
    seconds = sum(r for _, r in rows) * costs.round_cost(k)
    return tokens * costs.target / seconds if seconds > 0 else 1.0


def estimate(matches: Sequence[Sequence[bool]], costs: StepCosts) -> SpeedEstimate:
    """The best fixed draft length for these rows, and its speedup (``k = 0``: the target
    alone, 1.0, when no length pays)."""
    rows = [m for m in matches if len(m)]
    best = SpeedEstimate(0, 1.0, 1.0, [(len(m), len(m)) for m in rows])
    for k in range(1, len(costs.verify) + 1):
        at_k = [(len(m), round_walk(m, k)) for m in rows]
        s = _speedup(at_k, k, costs)
        if s > best.speedup:
            tokens, rounds = sum(t for t, _ in at_k), sum(r for _, r in at_k)
            best = SpeedEstimate(k, s, tokens / max(rounds, 1), at_k)
    return best


@dataclass
class Comparison:
    """The paired comparison of two drafts on the same rows."""

    before: SpeedEstimate
    after: SpeedEstimate
    delta: float  # speedup after - before
    lower: float  # the delta's (1 - confidence) bootstrap quantile
    confidence: float
    rows: int

    @property
    def better(self) -> bool:
        return self.lower > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "delta": round(self.delta, 4),
            "lower_bound": round(self.lower, 4),
            "confidence": self.confidence,
            "rows": self.rows,
        }


def compare(
    before: Sequence[Sequence[bool]],
    after: Sequence[Sequence[bool]],
    costs: StepCosts,
    confidence: float = 0.9,
    seed: int = 0,
    after_costs: StepCosts | None = None,
) -> Comparison:
    """``after`` against ``before`` (the same rows, in the same order); ``after_costs``: the
    candidate's, when its draft costs differ from the one in service (another kind)."""
    if len(before) != len(after):
        raise ValueError("compare needs the same rows before and after")
    a_costs = after_costs or costs
    b, a = estimate(before, costs), estimate(after, a_costs)
    rb, ra = b.rows, a.rows  # (tokens, rounds) per non-empty row, in the same order
    delta = a.speedup - b.speedup
    rng = random.Random(seed)
    deltas = []
    n = len(rb)
    for _ in range(BOOTSTRAP if n else 0):
        pick = [rng.randrange(n) for _ in range(n)]
        deltas.append(
            _speedup([ra[i] for i in pick], a.k, a_costs)
            - _speedup([rb[i] for i in pick], b.k, costs)
        )
    deltas.sort()
    lower = deltas[int((1 - confidence) * len(deltas))] if deltas else 0.0
    return Comparison(b, a, delta, lower, confidence, n)


def measure_costs(target: Any, draft: Any, context: int = 128, repeats: int = 5) -> StepCosts:
    """Time the pair here: target passes over 1 .. MAX_K + 1 rows and a round's first draft
    token (a feature draft that reads other layers: a later one too), after ``context``
    tokens, medians of ``repeats``. The row counts are timed in turn within each
    repetition, not one after another: a machine whose load changes while they are timed (a
    server beside a training run) moves all of them alike, so their ratios, which is what the
    gate prices rounds with, stay right."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    from daemon.core.feature_draft import is_feature_draft

    def primed(model: Any) -> list[Any]:
        cache = make_prompt_cache(model)
        mx.eval(model(mx.zeros((1, context), dtype=mx.uint32), cache=cache))
        return cache

    def timed(run: Any, cache: list[Any], rows: int) -> float:
        t0 = time.perf_counter()
        mx.eval(run())
        seconds = time.perf_counter() - t0
        trim_prompt_cache(cache, rows)
        return seconds

    def target_step(rows: int) -> float:
        cache = caches[rows]
        return timed(lambda: target(mx.ones((1, rows), dtype=mx.uint32), cache=cache), cache, rows)

    if is_feature_draft(draft):
        # one drafted token: one entry (the target's features, last token) through the fold
        # of any tapped layers, the layer and head: a round's first token, the dearest one
        width = int(draft.args.hidden_size) * (len(draft.taps) + 1)
        draft_cache = make_prompt_cache(draft)
        prefix = mx.ones((1, context), dtype=mx.uint32)
        mx.eval(draft.forward(mx.ones((1, context, width)), prefix, draft_cache))
        feature, token = mx.ones((1, 1, width)), mx.ones((1, 1), dtype=mx.uint32)
        own = mx.ones((1, 1, int(draft.args.hidden_size)))  # a later token reads its own

        def draft_token() -> Any:
            return draft.head(draft.forward(feature, token, draft_cache))

        def later_token() -> Any:
            return draft.head(draft.forward(own, token, draft_cache))

        later: Any = later_token if draft.taps else None  # untapped: the same computation
    else:
        draft_cache = primed(draft)

        def draft_token() -> Any:
            return draft(mx.ones((1, 1), dtype=mx.uint32), cache=draft_cache)

        later = None

    row_counts = range(1, MAX_K + 2)
    caches = {rows: primed(target) for rows in row_counts}
    times: dict[int, list[float]] = {rows: [] for rows in row_counts}
    draft_times: list[float] = []
    later_times: list[float] = []
    for _ in range(repeats):
        for rows in row_counts:
            times[rows].append(target_step(rows))
        draft_times.append(timed(draft_token, draft_cache, 1))
        if later is not None:
            later_times.append(timed(later, draft_cache, 1))

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    return StepCosts(
        target=median(times[1]),
        verify=[median(times[k + 1]) for k in range(1, MAX_K + 1)],
        draft=median(draft_times),
        draft_next=median(later_times) if later_times else None,
    )
