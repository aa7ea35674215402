"""What one generation produced, as plain data: no storage, no serving.

The engine fills these in; the buffer stores them, the HTTP API and metrics report them, the
collector and the adaptation loop count them. The definitions that every one of those rooms
needs live here once:

- ``acceptance_rate`` = accepted / drafted (vLLM's definition); ``None`` when nothing was
  drafted, because a request with no drafts is no evidence about the draft either way.
- a *failure case* is a request whose acceptance is below ``buffer.failure_threshold`` with at
  least one rejected draft token: what the adaptation loop trains on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


def acceptance_rate(accepted: int, drafted: int) -> float | None:
    """accepted / drafted; None when nothing was drafted."""
    return accepted / drafted if drafted else None


def is_failure_case(rate: float | None, num_rejections: int, failure_threshold: float) -> bool:
    """A request the draft did badly on: acceptance below the threshold and something rejected."""
    return num_rejections > 0 and rate is not None and rate < failure_threshold


@dataclass
class TokenLogprob:
    """An emitted token's log-probability under the target's distribution after the request's
    logits processors (and grammar mask), at temperature 1 (mlx-lm's definition), and the
    ``top`` most likely tokens there as ``(token, logprob)``, most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def top_ids(row: np.ndarray, k: int) -> np.ndarray:
    """The ids of the ``k`` largest values of ``row``, largest first (ties in id order)."""
    k = min(k, row.size)
    ids = np.argpartition(row, row.size - k)[row.size - k :]
    return ids[np.argsort(-row[ids], kind="stable")]


def token_logprobs(rows: Any, tokens: list[int], n: int) -> list[TokenLogprob]:
    """`TokenLogprob` of ``tokens[i]`` from log-probability row ``i`` (a float32 array the
    host can read: numpy or an evaluated MLX array)."""
    arr = np.asarray(rows)
    out = []
    for i, t in enumerate(tokens):
        row = arr[i]
        top = [(int(j), float(row[j])) for j in top_ids(row, n)] if n else []
        out.append(TokenLogprob(int(t), float(row[t]), top))
    return out


@dataclass
class Rejection:
    """One draft token the target rejected: the record the engine produces and the buffer stores.

    ``position`` indexes the output tokens where the target's token (``target_token``) was
    emitted instead of ``draft_token``; ``context_length`` = prompt tokens + generated tokens
    before it. ``draft_prob`` is q(draft_token) under the draft's processed distribution
    (temperature > 0) or its raw softmax (temperature 0, where the processed one is a point
    mass). ``top_ids``/``top_logprobs`` are the target's raw (temperature 1, before top-k/top-p)
    top-k log-probabilities at that position, most likely first.
    """

    position: int
    context_length: int
    draft_token: int
    draft_prob: float
    target_token: int
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationStats:
    """Per-request statistics (see the module docstring for the counting rules)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the prompt cache covered (not prefilled again)
    generation_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    num_drafts: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    target_passes: int = 0
    draft_passes: int = 0
    # per drafting source ("model", "lookup", "suffix"): tokens drafted and accepted
    drafted_by_source: dict[str, int] = field(default_factory=dict)
    accepted_by_source: dict[str, int] = field(default_factory=dict)
    # The cost-aware policy's running estimate of the draft model's acceptance when the
    # request ended (None without the policy): evidence about the draft even for a request
    # whose rounds it did not draft because it was not worth running.
    draft_acceptance_estimate: float | None = None
    prompt_time: float = 0.0
    generation_time: float = 0.0
    # tokens decoded in a batch with other requests (daemon.core.batch): no drafting there
    batched_tokens: int = 0

    def accumulate(self, other: GenerationStats) -> None:
        """Add ``other``'s counts and times to these (totals over several requests)."""
        for name in (
            "prompt_tokens", "cached_tokens", "generation_tokens", "drafted", "accepted",
            "num_drafts",
            "target_passes", "draft_passes", "prompt_time", "generation_time", "batched_tokens",
        ):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for source, n in other.drafted_by_source.items():
            self.count_source(source, n, other.accepted_by_source.get(source, 0))
        for mine, theirs in (
            (self.accepted_per_position, other.accepted_per_position),
            (self.drafted_per_position, other.drafted_per_position),
        ):
            mine.extend([0] * (len(theirs) - len(mine)))
            for i, n in enumerate(theirs):
                mine[i] += n

    def count_source(self, source: str, drafted: int, accepted: int) -> None:
        self.drafted_by_source[source] = self.drafted_by_source.get(source, 0) + drafted
        self.accepted_by_source[source] = self.accepted_by_source.get(source, 0) + accepted

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (0 when nothing was drafted: the HTTP usage field is a number)."""
        return acceptance_rate(self.accepted, self.drafted) or 0.0

    @property
    def mean_accepted_length(self) -> float:
        """1 + accepted / num_drafts: tokens emitted per verification round (vLLM's metric)."""
        return 1.0 + self.accepted / self.num_drafts if self.num_drafts else 1.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_time if self.prompt_time > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        if self.generation_time <= 0:
            return 0.0
        return self.generation_tokens / self.generation_time

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            acceptance_rate=self.acceptance_rate,
            mean_accepted_length=self.mean_accepted_length,
            prompt_tps=self.prompt_tps,
            generation_tps=self.generation_tps,
        )
        return d


@dataclass
class GenerationResult:
    """Everything about one request; filled in while the engine runs it
    (`daemon.core.engine.SpeculativeEngine.generate`).

    ``finish_reason`` is ``"stop"`` (EOS or stop string), ``"length"`` (max_tokens or the
    context limit), ``"cancelled"`` (the consumer closed the generator) or ``"error"``.
    ``tokens`` are all generated tokens, including an EOS token and the tokens of a matched
    stop string; ``text`` excludes both.
    """

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)
    rejections: list[Rejection] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when asked


@dataclass
class GenerationChunk:
    """A streamed piece of output: the text delta and the tokens accepted since the last chunk.

    The final chunk has ``finish_reason`` set ("stop" or "length") and ``result`` pointing
    to the complete :class:`GenerationResult`.
    """

    text: str
    tokens: list[int]
    finish_reason: str | None = None
    result: GenerationResult | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens', when asked
