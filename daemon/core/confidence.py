"""The draft's confidence: which of a model round's draft tokens are worth verifying.

A draft right on half the tokens is not right on half of each: where its own distribution
is peaked it is mostly right, where it is flat mostly wrong (EAGLE-2 drafts by this). On a
machine where each verified row costs (a CPU, a quantized target on Metal), a wrong token's
row is paid for nothing, so a model round (``speculative.draft_confidence``) drafts a token,
looks at the draft's probability of its most likely token there, and keeps the token for
verification only where the acceptance that confidence predicts pays for its row; it drafts
another only where one more may pay. The token dropped was drafted (its cost is spent) but
not verified.

Lossless, greedy or sampled: whether position ``i`` is verified depends on the draft's
*distribution* at ``i`` (its largest probability) and on tokens drafted before ``i``, never on
the token sampled at ``i``. So the token verified there is still drawn from ``q``, which the
acceptance test assumes, and a position not verified is the target's own sample. (Deciding on
the sampled token's probability would verify a biased sample; tests/core/test_confidence.py
shows the chi-square test catching that.)

How well a confidence predicts acceptance is measured as the engine runs, per bucket of
confidence, as moving averages started at the bucket's middle (a calibrated draft's
acceptance), with how often drafted tokens fall in each bucket.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

# bucket upper edges: finer near 1, where a verified row most often pays
EDGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
EMA = 0.05


def bucket(confidence: float) -> int:
    return bisect.bisect_right(EDGES, confidence)


def _middles() -> list[float]:
    bounds = (0.0, *EDGES, 1.0)
    return [(lo + hi) / 2 for lo, hi in zip(bounds, bounds[1:], strict=False)]


def confidence_of(logits: mx.array) -> mx.array:
    """The largest probability of the distribution ``logits`` (1-D, unnormalised or log
    probabilities) defines: what the drafter thinks of its most likely token."""
    return mx.exp(mx.max(logits) - mx.logsumexp(logits))


@dataclass
class Calibration:
    """Acceptance of a verified draft token per confidence bucket (given the tokens before it
    were accepted), and the share of drafted tokens per bucket."""

    accept: list[float] = field(default_factory=_middles)
    share: list[float] = field(default_factory=lambda: [1.0 / (len(EDGES) + 1)] * (len(EDGES) + 1))
    tokens: int = 0  # draft tokens observed

    def copy(self) -> Calibration:
        return Calibration(list(self.accept), list(self.share), self.tokens)

    def to_dict(self) -> dict[str, object]:
        return {
            "edges": list(EDGES),
            "acceptance": [round(a, 4) for a in self.accept],
            "share": [round(s, 4) for s in self.share],
            "tokens": self.tokens,
        }

    def observe(self, confidences: list[float], verified: int, accepted: int) -> None:
        """A round's drafted tokens' confidences; the first ``verified`` were verified and
        the first ``accepted`` of those accepted."""
        for i, c in enumerate(confidences):
            b = bucket(c)
            self.tokens += 1
            for j in range(len(self.share)):
                self.share[j] += EMA * ((1.0 if j == b else 0.0) - self.share[j])
            if i < verified and i <= accepted:  # reached: its fate says something
                self.accept[b] += EMA * ((1.0 if i < accepted else 0.0) - self.accept[b])


@dataclass
class GatedRound:
    """One model round's keep-or-stop decisions, priced by ``verify(rows)`` and
    ``draft(tokens)`` (seconds, the policy's measured costs)."""

    calibration: Calibration
    verify: Callable[[int], float]
    draft: Callable[[int], float]
    limit: int  # at most this many tokens verified
    kept: int = 0
    drafted: int = 0
    reach: float = 1.0  # the chance every kept token is accepted
    expected: float = 1.0  # expected tokens the round emits (the target's own included)
    confidences: list[float] = field(default_factory=list)

    def _rate(self, expected: float, kept: int, drafted: int) -> float:
        return expected / (self.verify(kept + 1) + self.draft(drafted))

    def offer(self, confidence: float) -> bool:
        """A token was drafted with this confidence: keep it for verification?"""
        self.confidences.append(confidence)
        return self.take(self.calibration.accept[bucket(confidence)])

    def take(self, a: float) -> bool:
        """A token was drafted whose acceptance is ``a``: keep it for verification?"""
        self.drafted += 1
        gain = self.expected + self.reach * a
        keep = self._rate(gain, self.kept + 1, self.drafted) > self._rate(
            self.expected, self.kept, self.drafted
        )
        if keep:
            self.kept += 1
            self.reach *= a
            self.expected = gain
        return keep

    def more(self) -> bool:
        """Draft another? Where one more, kept or dropped as its confidence will say, is
        expected to raise the round's tokens per second."""
        if self.kept < self.drafted or self.kept >= self.limit:
            return False
        stop = self._rate(self.expected, self.kept, self.drafted)
        cal = self.calibration
        go = 0.0
        for share, a in zip(cal.share, cal.accept, strict=True):
            kept = self._rate(self.expected + self.reach * a, self.kept + 1, self.drafted + 1)
            dropped = self._rate(self.expected, self.kept, self.drafted + 1)
            go += share * max(kept, dropped)
        return go > stop


def gated_rate(
    calibration: Calibration, verify: Callable[[int], float], draft: Callable[[int], float]
) -> float:
    """Expected tokens per second of a model round's first token under the gate: drafted,
    then verified where its confidence says it pays (later tokens not counted)."""
    tokens = seconds = 0.0
    for share, a in zip(calibration.share, calibration.accept, strict=True):
        first = GatedRound(calibration, verify, draft, 1)
        first.take(a)  # the round's own decision for a token of this bucket
        tokens += share * first.expected
        seconds += share * (verify(first.kept + 1) + draft(first.drafted))
    return tokens / seconds


__all__ = ["Calibration", "GatedRound", "bucket", "confidence_of", "gated_rate"]
