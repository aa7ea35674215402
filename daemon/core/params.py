"""What a request asks of the engine and how the engine is set up: `SamplingParams` (per
request, validated before any cache exists) and `SpeculativeConfig` (per engine, from the
``speculative`` config section)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from daemon.errors import GenerationError

__all__ = ["SamplingParams", "SpeculativeConfig"]


def is_int(x: Any) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SamplingParams:
    """Per-request sampling parameters.

    ``temperature == 0`` is greedy decoding; ``top_k == 0``, ``top_p == 1`` and
    ``min_p == 0`` disable those filters.  ``stop`` strings end generation and are not part of
    the returned text. The logits processors (mlx-lm's: an additive ``logit_bias`` by token
    id, and the repetition / presence / frequency penalties over the last ``*_context_size``
    tokens, prompt included; 0 is off) change the target's distribution, greedy included;
    the engine applies them to the draft's too (`daemon.core.sampling`).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    min_p: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    repetition_penalty: float = 0.0
    repetition_context_size: int = 20
    presence_penalty: float = 0.0
    presence_context_size: int = 20
    frequency_penalty: float = 0.0
    frequency_context_size: int = 20
    # None: no log-probabilities; n >= 0: each token's and its n most likely alternatives'
    logprobs: int | None = None

    @property
    def processed(self) -> bool:
        """Whether logits processors apply (`daemon.core.sampling.logits_processors`)."""
        return bool(
            self.logit_bias
            or self.repetition_penalty not in (0, 1)
            or self.presence_penalty
            or self.frequency_penalty
        )

    def validate(self, max_context: int | None = None) -> None:
        """Raise :class:`GenerationError` if a value is missing or out of range."""
        if not _is_number(self.temperature) or self.temperature < 0:
            raise GenerationError(
                f"temperature must be a finite number >= 0, got {self.temperature!r}"
            )
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.logprobs is not None and (not is_int(self.logprobs) or self.logprobs < 0):
            raise GenerationError(f"logprobs must be None or an integer >= 0: {self.logprobs!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise GenerationError(f"min_p must be in [0, 1], got {self.min_p!r}")
        self._validate_processors()
        if self.seed is not None and not is_int(self.seed):
            raise GenerationError(f"seed must be an integer or None, got {self.seed!r}")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise GenerationError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if max_context is not None and self.max_tokens > max_context:
            raise GenerationError(
                f"max_tokens ({self.max_tokens}) exceeds the model context ({max_context})"
            )
        if isinstance(self.stop, str) or not isinstance(self.stop, (list, tuple)):
            raise GenerationError(f"stop must be a list of strings, got {self.stop!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise GenerationError(f"stop strings must be non-empty strings, got {s!r}")

    def _validate_processors(self) -> None:
        if not isinstance(self.logit_bias, dict):
            raise GenerationError(
                f"logit_bias must map token ids to numbers, got {self.logit_bias!r}"
            )
        for t, b in self.logit_bias.items():
            if not is_int(t) or t < 0 or not _is_number(b):
                raise GenerationError(f"logit_bias must map token ids to numbers, got {t!r}: {b!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty < 0:
            raise GenerationError(
                f"repetition_penalty must be a number >= 0, got {self.repetition_penalty!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)):
                value = getattr(self, name)
                raise GenerationError(f"{name} must be a finite number, got {value!r}")
        for name in ("repetition", "presence", "frequency"):
            size = getattr(self, f"{name}_context_size")
            if not is_int(size) or size < 1:
                raise GenerationError(f"{name}_context_size must be an integer >= 1, got {size!r}")


@dataclass
class SpeculativeConfig:
    """Engine configuration (shared by all requests).

    ``num_draft_tokens`` is the fixed draft length when ``adaptive`` is False and the
    starting length otherwise.  ``max_context`` bounds prompt + generated tokens (e.g. the
    target's ``max_position_embeddings``).  ``top_logprobs`` is the number of target
    log-probabilities kept per rejection; ``record_rejections=False`` disables rejection
    records entirely (used to measure their overhead).
    """

    num_draft_tokens: int = 4
    adaptive: bool = True
    min_draft_tokens: int = 1
    max_draft_tokens: int = 8
    top_logprobs: int = 20
    max_context: int | None = None
    prefill_step_size: int = 512
    record_rejections: bool = True
    # Drafting without a model (daemon.core.drafting) and the cost-aware choice of each round
    # (daemon.core.policy). Off here so that an engine built by hand drafts as configured;
    # the daemon's settings turn them on.
    lookup: bool = False
    cost_aware: bool = False
    model_draft: bool = True  # False: only proposals (benchmarks of one source)
    max_proposal_tokens: int = 16
    tokens_per_match: int = 2
    continue_proposals: bool = False  # cost_aware: the model draft may continue a proposal
    draft_confidence: bool = False  # cost_aware: model rounds gated by the draft's confidence

    @classmethod
    def from_settings(cls, spec: Any, max_context: int | None = None) -> SpeculativeConfig:
        """Build from the ``speculative`` config section (`daemon.config.SpeculativeSettings`)."""
        return cls(
            num_draft_tokens=spec.num_draft_tokens,
            adaptive=spec.adaptive,
            min_draft_tokens=spec.min_draft_tokens,
            max_draft_tokens=spec.max_draft_tokens,
            top_logprobs=spec.top_logprobs,
            max_context=max_context,
            lookup=spec.lookup,
            cost_aware=spec.cost_aware,
            max_proposal_tokens=spec.max_proposal_tokens,
            continue_proposals=spec.continue_proposals,
            draft_confidence=spec.draft_confidence,
        )

    def validate(self) -> None:
        """Raise ``ValueError`` on an inconsistent configuration."""
        if not is_int(self.num_draft_tokens) or self.num_draft_tokens < 0:
            raise ValueError("num_draft_tokens must be an integer >= 0")
        if not is_int(self.min_draft_tokens) or self.min_draft_tokens < 1:
            raise ValueError("min_draft_tokens must be an integer >= 1")
        if not is_int(self.max_draft_tokens) or self.max_draft_tokens < self.min_draft_tokens:
            raise ValueError("max_draft_tokens must be an integer >= min_draft_tokens")
        if not is_int(self.top_logprobs) or self.top_logprobs < 0:
            raise ValueError("top_logprobs must be an integer >= 0")
        if self.max_context is not None and (not is_int(self.max_context) or self.max_context < 2):
            raise ValueError("max_context must be None or an integer >= 2")
        if not is_int(self.prefill_step_size) or self.prefill_step_size < 1:
            raise ValueError("prefill_step_size must be an integer >= 1")
        if not is_int(self.max_proposal_tokens) or self.max_proposal_tokens < 1:
            raise ValueError("max_proposal_tokens must be an integer >= 1")
        if not is_int(self.tokens_per_match) or self.tokens_per_match < 1:
            raise ValueError("tokens_per_match must be an integer >= 1")
