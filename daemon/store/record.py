"""What the replay buffer stores per request, and the rules that classify it.

`BufferRecord` is one served request. Before it is stored the buffer decides two things about
it, here, in every process the same way: its split (`assign_split`: train or holdout, by the
prompt's sha256) and whether it is a failure case (`draft_evidence` and
`daemon.core.records.is_failure_case`: what the adaptation loop trains on).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from daemon.core.records import Rejection, acceptance_rate

Split = Literal["train", "holdout"]
SPLITS = ("train", "holdout")
# ``draft_id`` of a row no user sent: a request the target wrote and answered (`specd warmup`).
# Such rows are train rows to learn from, never holdout (the gate judges real traffic) and
# never indexed for drafting (`ReplayBuffer.recent_outputs`).
SYNTHETIC_DRAFT = "synthetic"


@dataclass
class BufferRecord:
    """One served request. ``id``, ``split`` and ``is_failure`` are filled in by the buffer.

    Setting ``split`` or ``is_failure`` before submitting overrides the buffer's own assignment
    (imports, tests). ``rejections`` may hold any objects with `Rejection`'s attributes.
    """

    prompt_text: str
    prompt_tokens: list[int]
    output_text: str
    output_tokens: list[int]
    stats: dict
    rejections: list[Rejection]
    target_id: str
    draft_id: str
    adapter_version: int = 0
    created: float = field(default_factory=time.time)
    id: int | None = None
    split: str | None = None
    is_failure: bool | None = None
    used_for_training: str | None = None

    @classmethod
    def from_result(
        cls,
        prompt_text: str,
        prompt_tokens: Sequence[int],
        result: Any,
        target_id: str,
        draft_id: str,
        adapter_version: int = 0,
    ) -> BufferRecord:
        """The record of one finished request (a `daemon.core.engine.GenerationResult`)."""
        return cls(
            prompt_text=prompt_text,
            prompt_tokens=list(prompt_tokens),
            output_text=result.text,
            output_tokens=list(result.tokens),
            stats=result.stats.to_dict(),
            rejections=list(result.rejections),
            target_id=target_id,
            draft_id=draft_id,
            adapter_version=adapter_version,
        )

    @classmethod
    def synthetic(
        cls,
        request: str,
        prompt_tokens: Sequence[int],
        output_text: str,
        output_tokens: Sequence[int],
        target_id: str,
    ) -> BufferRecord:
        """A request the target wrote and its answer: a pending train row (`SYNTHETIC_DRAFT`)."""
        return cls(
            prompt_text=request,
            prompt_tokens=list(prompt_tokens),
            output_text=output_text,
            output_tokens=list(output_tokens),
            stats={},
            rejections=[],
            target_id=target_id,
            draft_id=SYNTHETIC_DRAFT,
            split="train",
            is_failure=True,
        )


def assign_split(prompt_text: str, holdout_fraction: float) -> Split:
    """``holdout`` for a stable ``holdout_fraction`` of prompts, chosen by the prompt's sha256.

    The same text always lands in the same split, in every process and on every machine.
    """
    digest = hashlib.sha256(prompt_text.encode("utf-8", "surrogatepass")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "holdout" if u < holdout_fraction else "train"


@dataclass(frozen=True)
class DraftCounts:
    """The numbers of a record's engine statistics (``BufferRecord.stats``, a JSON object) that
    the buffer judges and indexes it by. Stored statistics come from older versions and from
    imports too, so every field may be missing: None (``per_source`` False)."""

    drafted: int | None = None
    accepted: int | None = None
    acceptance_rate: float | None = None
    # The request's counts per drafting source were recorded (newer engines): the draft
    # model's own rounds (``model_drafted``/``model_accepted``) and the policy's estimate.
    per_source: bool = False
    model_drafted: int = 0
    model_accepted: int = 0
    draft_acceptance_estimate: float | None = None

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any]) -> DraftCounts:
        by_source = stats.get("drafted_by_source")
        # an empty split counts only when the policy's estimate was recorded beside it
        per_source = isinstance(by_source, dict) and bool(
            by_source or "draft_acceptance_estimate" in stats
        )
        model_drafted = int(by_source.get("model", 0)) if isinstance(by_source, dict) else 0
        model_accepted = 0
        if model_drafted:
            model_accepted = int((stats.get("accepted_by_source") or {}).get("model", 0))
        drafted, accepted = stats.get("drafted"), stats.get("accepted")
        rate, estimate = stats.get("acceptance_rate"), stats.get("draft_acceptance_estimate")
        return cls(
            drafted=None if drafted is None else int(drafted),
            accepted=None if accepted is None else int(accepted),
            acceptance_rate=None if rate is None else float(rate),
            per_source=per_source,
            model_drafted=model_drafted,
            model_accepted=model_accepted,
            draft_acceptance_estimate=None if estimate is None else float(estimate),
        )


def draft_evidence(counts: DraftCounts, rejections: int) -> tuple[float | None, int]:
    """What a failure case is judged on: (the draft model's acceptance, rejections seen).

    The model's own rounds when it drafted in the request (tokens proposed by lookup or the
    suffix index say nothing about the model the loop trains). When it did not draft because
    the cost-aware policy judged it not worth running, the policy's running estimate of its
    acceptance, which probes across requests measured, counts as one piece of evidence: a
    draft too poor to run is what training is for. Older records: the request's acceptance.
    """
    if counts.per_source:
        if counts.model_drafted:
            return acceptance_rate(counts.model_accepted, counts.model_drafted), rejections
        estimate = counts.draft_acceptance_estimate
        return (estimate, 1) if estimate is not None else (None, rejections)
    return stats_acceptance_rate(counts), rejections


def stats_acceptance_rate(counts: DraftCounts) -> float | None:
    """A stored request's acceptance: the engine's ``acceptance_rate``, else ``accepted /
    drafted``; None if nothing was drafted (the engine reports 0.0 there: no evidence)."""
    if counts.drafted == 0:
        return None
    if counts.acceptance_rate is not None:
        return counts.acceptance_rate
    if counts.drafted is None or counts.accepted is None:
        return None
    return acceptance_rate(counts.accepted, counts.drafted)
