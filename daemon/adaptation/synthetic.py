"""Synthetic traffic: requests the target writes itself, answered by the target (`specd warmup`).

A feature draft is short of examples, not of capacity (docs/adaptation.md): what it learns is
"the token the target would put next", and any text the target writes itself teaches it that.
An instruction-tuned target given its chat template up to where a user message begins writes
a plausible user request (Magpie, Xu et al. 2024); sampled at temperature 1 to the message's
end token and then answered greedily, such a request is an example of exactly what a lossless
draft must predict, with no dataset and before any traffic. The requests are sampled, so they
are part of the prompt, never a label; the answer is the target's own.

Left alone, a small target writes general requests (travel plans, marketing) that teach a draft
serving code little. Given a real request and its answer as an earlier turn (``like``: train
rows of the traffic), the next request it writes is of the traffic's kind; it is answered alone,
as a request of its own.

Generated batched (mlx-lm's ``BatchGenerator``, as rehearsal is). The buffer stores them as
train rows the loop trains on (`daemon.store.record.SYNTHETIC_DRAFT`), never as holdout (the
gate judges real traffic only) and never in the suffix index (they are not what users send).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from daemon.adaptation.rehearsal import stream_batch
from daemon.store.buffer import ReplayBuffer
from daemon.store.record import BufferRecord

# A request shorter than this (tokens) is a greeting or a fragment, not a task to answer.
MIN_REQUEST = 6
# the fewest requests sampled together (a batch costs about as much as one sequence)
MIN_BATCH = 8
# batches in a row with no usable request before a target is judged unable to write any
MAX_EMPTY_BATCHES = 4
# Cut into the chat template where a message's text goes; no template writes these itself.
_SENTINEL = "\u2063specd-request\u2063"
_ANSWER = "\u2063specd-answer\u2063"
_NEXT = "\u2063specd-next\u2063"


@dataclass
class SyntheticRow:
    """A request the target wrote and its greedy answer (the stop token that ended it kept,
    as served answers keep it)."""

    request: str
    prompt_tokens: list[int]
    output_tokens: list[int]
    output_text: str


@dataclass
class SynthesisReport:
    rows: int = 0
    requests_sampled: int = 0
    dropped: int = 0  # unfinished within the limit, too short, or written twice
    copied: int = 0  # (of those dropped) a copy of the earlier turn's request it was shown
    answer_tokens: int = 0
    seconds: float = 0.0
    shown: int = 0  # rows of real traffic the requests were written after (0: general)
    max_output: int = 0  # answer tokens at most (write_rows: no more than the traffic's)
    seen: set[str] = field(default_factory=set, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.answer_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "seen"}
        return {**out, "seconds": round(self.seconds, 2)}


def request_header(tokenizer: Any) -> list[int]:
    """The chat template's tokens before a (first) user message's text: its default system
    prompt, if it has one, and the user header. ValueError for a model with no chat template:
    it has no notion of a request to write."""
    return _template_between(
        tokenizer,
        [{"role": "user", "content": _SENTINEL}],
        None,
        _SENTINEL,
        "the user's message",
        add_generation_prompt=True,
    )


def turn_header(tokenizer: Any) -> list[int]:
    """The chat template's tokens between an answer's text and the next user message's text:
    the answer's end and the next user header (ValueError as `request_header`)."""
    conversation = [
        {"role": "user", "content": _SENTINEL},
        {"role": "assistant", "content": _ANSWER},
        {"role": "user", "content": _NEXT},
    ]
    return _template_between(tokenizer, conversation, _ANSWER, _NEXT, "a second user message")


def _template_between(
    tokenizer: Any,
    messages: list[dict[str, str]],
    after: str | None,
    before: str,
    what: str,
    **kw: Any,
) -> list[int]:
    """The tokens of ``messages`` rendered by the chat template, between the marker ``after``
    (None: the start) and the marker ``before``; ValueError naming ``what`` where the
    rendering does not show them in that order."""
    if not getattr(tokenizer, "has_chat_template", False):
        raise ValueError("the target has no chat template: it cannot write requests")
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    text = text if isinstance(text, str) else ""
    start = 0 if after is None else text.find(after)
    end = text.find(before)
    if start < 0 or end < 0 or (after is not None and end < start):
        raise ValueError(f"the target's chat template does not show {what}")
    cut = text[start + len(after or "") : end]
    return [int(t) for t in tokenizer.encode(cut, add_special_tokens=False)]


def earlier_turn(
    prompt: Sequence[int], output: Sequence[int], turn: Sequence[int], stops: set[int]
) -> list[int]:
    """What the target writes the next request after: a real request's prompt (chat template
    applied) and its answer, whose own stop token ``turn`` (`turn_header`) writes again."""
    answer = list(output)
    if answer and answer[-1] in stops:
        answer.pop()
    return [*prompt, *answer, *turn]


def synthesize(
    target: nn.Module,
    tokenizer: Any,
    rows: int,
    *,
    batch_size: int = 64,
    max_request: int = 96,
    max_output: int = 128,
    stop_tokens: Sequence[int],
    seed: int = 0,
    like: Sequence[tuple[Sequence[int], Sequence[int]]] = (),
    report: SynthesisReport | None = None,
) -> Iterator[list[SyntheticRow]]:
    """``rows`` rows, a list per batch of ``batch_size`` sampled requests (each a user message
    sampled at temperature 1 after `request_header`, up to ``max_request`` tokens and a stop
    token; unfinished, shorter than ``MIN_REQUEST`` or already in ``report.seen``: dropped),
    each answered greedily with the chat template applied, up to ``max_output`` tokens.
    With ``like`` (real requests' prompt and output tokens), each request is sampled after one
    of them as an earlier turn (`earlier_turn`), in turn; one that copies that turn's request
    is dropped. ValueError when a target writes nothing usable in ``MAX_EMPTY_BATCHES``
    batches."""
    from daemon.core.prompts import encode_prompt

    report = report if report is not None else SynthesisReport()
    stops = {int(t) for t in stop_tokens}
    header = request_header(tokenizer)
    turn = turn_header(tokenizer) if like else []
    done = empty = b = used = 0
    while done < rows:
        t0 = time.perf_counter()
        mx.random.seed(seed + b)
        b += 1
        n = min(batch_size, max(rows - done, MIN_BATCH))
        if like:
            shown = [like[(used + i) % len(like)] for i in range(n)]
            used += n
            contexts = [earlier_turn(p, o, turn, stops) for p, o in shown]
            earlier = [tokenizer.decode(list(p)) for p, _ in shown]
        else:
            contexts, earlier = [header] * n, []
        sampled = _sample_requests(target, contexts, max_request, stops)
        requests = _new_requests(tokenizer, sampled, report, earlier)
        prompts = [encode_prompt(tokenizer, r) for r in requests]
        answers = _answer(target, prompts, max_output, stops)
        batch = [
            SyntheticRow(r, p, a, tokenizer.decode(a))
            for r, p, a in zip(requests, prompts, answers, strict=True)
            if a
        ][: rows - done]
        done += len(batch)
        report.rows += len(batch)
        report.answer_tokens += sum(len(r.output_tokens) for r in batch)
        report.seconds += time.perf_counter() - t0
        empty = 0 if batch else empty + 1
        if empty >= MAX_EMPTY_BATCHES:
            raise ValueError(
                f"the target wrote no usable request in {empty} batches of {n} "
                f"(each must end with its stop token within {max_request} tokens)"
            )
        yield batch


def traffic_turns(
    buf: ReplayBuffer, target: str, n: int, seed: int, limit: int
) -> list[tuple[list[int], list[int]]]:
    """Train rows users sent, shown to the target as an earlier turn: up to ``n`` at random
    (by ``seed``: a later run is shown others, or in another order), each at most ``limit``
    tokens whole (`data.max_prompt_length`: a longer one makes sampling slow). Never a
    holdout row, never a row no user sent."""
    return [
        (r.prompt_tokens, r.output_tokens)
        for r in buf.for_target(target).sample_replay(n, seed=seed, traffic_only=True)
        if len(r.prompt_tokens) + len(r.output_tokens) <= limit
    ]


def write_rows(
    buf: ReplayBuffer,
    target: nn.Module,
    tokenizer: Any,
    target_id: str,
    rows: int,
    *,
    max_output: int,
    max_prompt: int,
    like_traffic: bool | None = None,
    seed: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> SynthesisReport:
    """Write ``rows`` synthetic rows of ``target_id`` into ``buf`` as pending train rows, a
    batch at a time (``on_batch`` is told each batch's size): like the traffic
    (`traffic_turns`) where the buffer holds some and ``like_traffic`` is not False, their
    answers no longer than the longest answer shown; general requests otherwise. The seed
    defaults to the count of synthetic rows already stored, so a later call samples on from
    there. ValueError when ``like_traffic`` is True and there is no row to show, or the
    target writes nothing usable."""
    report = SynthesisReport(seen=buf.synthetic_requests(target_id))
    seed = seed if seed is not None else len(report.seen)
    like = [] if like_traffic is False else traffic_turns(buf, target_id, rows, seed, max_prompt)
    if like_traffic and not like:
        raise ValueError(
            f"the buffer holds no train row of real traffic of at most {max_prompt} tokens "
            "(data.max_prompt_length) to write requests like"
        )
    report.shown = len(like)
    if like:
        # no longer than the traffic's answers: the positions it serves, at their cost
        max_output = min(max_output, max(len(o) for _, o in like))
    report.max_output = max_output
    batches = synthesize(
        target,
        tokenizer,
        rows,
        max_output=max_output,
        stop_tokens=list(tokenizer.eos_token_ids or ()),
        seed=seed,
        like=like,
        report=report,
    )
    for batch in batches:
        buf.add(
            BufferRecord.synthetic(
                r.request, r.prompt_tokens, r.output_text, r.output_tokens, target_id
            )
            for r in batch
        )
        if on_batch is not None:
            on_batch(len(batch))
    return report


def _new_requests(
    tokenizer: Any,
    messages: list[list[int] | None],
    report: SynthesisReport,
    earlier: Sequence[str] = (),
) -> list[str]:
    """The sampled messages worth answering, as text: finished, not too short, not seen, and
    not a copy of the earlier turn's request (``earlier``, by message) it was sampled after."""
    out: list[str] = []
    for i, tokens in enumerate(messages):
        report.requests_sampled += 1
        text = tokenizer.decode(tokens).strip() if tokens is not None else ""
        if tokens is None or len(tokens) < MIN_REQUEST or not text or text in report.seen:
            report.dropped += 1
            continue
        if i < len(earlier) and text in earlier[i]:
            report.dropped += 1
            report.copied += 1
            continue
        report.seen.add(text)
        out.append(text)
    return out


def _sample_requests(
    target: nn.Module, contexts: list[list[int]], max_request: int, stops: set[int]
) -> list[list[int] | None]:
    """A user message sampled after each of ``contexts``; None for one no stop token ended."""

    def sample(logprobs: mx.array) -> mx.array:
        return mx.random.categorical(logprobs)

    ends = _until_stop(target, contexts, max_request, sample, stops)
    return [tokens if stop is not None else None for tokens, stop in ends]


def _answer(
    target: nn.Module, prompts: list[list[int]], max_output: int, stops: set[int]
) -> list[list[int]]:
    """The target's greedy answers, each up to and including the stop token that ends it."""

    def greedy(logprobs: mx.array) -> mx.array:
        return mx.argmax(logprobs, axis=-1)

    ends = _until_stop(target, prompts, max_output, greedy, stops)
    return [tokens if stop is None else [*tokens, stop] for tokens, stop in ends]


def _until_stop(
    target: nn.Module, prompts: list[list[int]], limit: int, sampler: Any, stops: set[int]
) -> list[tuple[list[int], int | None]]:
    """Each prompt's tokens from mlx-lm's batch generation (one ``sampler`` for all) before
    the stop token that ended it, and that token (None: ``limit`` ended it)."""
    out: list[tuple[list[int], int | None]] = [([], None) for _ in prompts]
    if not prompts:
        return out
    n = len(prompts)
    for i, token in stream_batch(target, prompts, [limit] * n, [sampler] * n, stops):
        tokens, stop = out[i]
        if stop is not None:
            continue
        if token in stops:
            out[i] = (tokens, token)
        else:
            tokens.append(token)
    return out
