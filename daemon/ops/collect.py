"""``specd collect``: run prompts through the engine and record them exactly as serving would.

Through the running daemon when one is up (its HTTP API records the requests), else in this
process with the same `Service` the daemon serves with. A conversation (``--conversations``)
is sent a turn at a time, each turn with the conversation so far and the target's own answers
between, as a chat client sends it; each turn is one request, recorded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from daemon.config import ConfigSources, Settings
from daemon.core.prompts import PromptItem, read_conversations, read_prompts
from daemon.core.records import acceptance_rate, is_failure_case
from daemon.errors import PromptFileError
from daemon.ops.client import DaemonClient


@dataclass
class CollectSummary:
    """What a collect run did."""

    mode: str  # "daemon" or "in-process"
    requests: int = 0
    failure_cases: int = 0
    drafted: int = 0
    accepted: int = 0
    completion_tokens: int = 0
    pending_failures: int | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return acceptance_rate(self.accepted, self.drafted) or 0.0

    def add(self, drafted: int, accepted: int, tokens: int, threshold: float) -> None:
        self.requests += 1
        self.drafted += drafted
        self.accepted += accepted
        self.completion_tokens += tokens
        # The daemon reports counts, not rejections: drafted - accepted tokens were rejected.
        if is_failure_case(acceptance_rate(accepted, drafted), drafted - accepted, threshold):
            self.failure_cases += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "requests": self.requests,
            "failure_cases": self.failure_cases,
            "acceptance_rate": self.acceptance_rate,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "completion_tokens": self.completion_tokens,
            "pending_failures": self.pending_failures,
            "errors": self.errors,
        }


# One request of a run: its messages so far -> (the answer's text, drafted, accepted, tokens).
Send = Callable[[list[dict[str, str]]], tuple[str, int, int, int]]


def collect(
    settings: Settings,
    items: list[PromptItem],
    max_tokens: int | None = None,
    progress: bool = True,
    use_daemon: bool = True,
    conversations: list[list[str]] | None = None,
) -> CollectSummary:
    """Send ``items``, then each of ``conversations`` a turn at a time, through the daemon if
    one runs for this data dir, else in process."""
    client = DaemonClient.find(settings) if use_daemon else None
    if client is not None:
        return _via_daemon(client, settings, items, conversations or [], max_tokens, progress)
    return _in_process(settings, items, conversations or [], max_tokens, progress)


def _send_all(
    summary: CollectSummary,
    send: Send,
    items: list[PromptItem],
    conversations: list[list[str]],
    threshold: float,
    progress: bool,
    expected: tuple[type[Exception], ...],
) -> None:
    """Every item, then every conversation's turns in order, one request each; a request
    that fails with one of the ``expected`` errors is noted and skipped (with the rest of its
    conversation, which needs its answer), never the end of the run."""
    total = len(items) + sum(len(turns) for turns in conversations)
    bar = tqdm(
        total=total,
        desc=f"collect ({summary.mode.split()[0]})",
        unit="req",
        disable=not progress,
        file=sys.stderr,
    )
    with bar:
        for item in items:
            try:
                _, drafted, accepted, tokens = send(item.messages)
            except expected as e:  # one bad request must not end the run
                summary.errors.append(f"{item.text[:40]!r}: {e}")
            else:
                summary.add(drafted, accepted, tokens, threshold)
            bar.update()
        for turns in conversations:
            messages: list[dict[str, str]] = []
            for n, turn in enumerate(turns):
                messages.append({"role": "user", "content": turn})
                try:
                    answer, drafted, accepted, tokens = send(list(messages))
                except expected as e:
                    summary.errors.append(f"{turns[0][:40]!r}, turn {n + 1}: {e}")
                    bar.update(len(turns) - n)
                    break
                summary.add(drafted, accepted, tokens, threshold)
                messages.append({"role": "assistant", "content": answer})
                bar.update()


def _via_daemon(
    client: DaemonClient,
    settings: Settings,
    items: list[PromptItem],
    conversations: list[list[str]],
    max_tokens: int | None,
    progress: bool,
) -> CollectSummary:
    summary = CollectSummary(mode=f"daemon {client.base_url}")

    def send(messages: list[dict[str, str]]) -> tuple[str, int, int, int]:
        body: dict[str, Any] = {"messages": messages}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        resp = client.request("POST", "/v1/chat/completions", body)
        usage = resp.get("usage", {})
        spec = usage.get("speculative", {})
        answer = str(((resp.get("choices") or [{}])[0].get("message") or {}).get("content") or "")
        tokens = usage.get("completion_tokens", 0)
        return answer, spec.get("drafted", 0), spec.get("accepted", 0), tokens

    # anything the HTTP round trip raises, as before: the daemon keeps serving the next
    threshold = settings.buffer.failure_threshold
    _send_all(summary, send, items, conversations, threshold, progress, (Exception,))
    try:
        status = client.request("GET", "/status", timeout=30)
        summary.pending_failures = (status.get("buffer") or {}).get("pending_failures")
    except Exception:
        pass
    return summary


def _in_process(
    settings: Settings,
    items: list[PromptItem],
    conversations: list[list[str]],
    max_tokens: int | None,
    progress: bool,
) -> CollectSummary:
    from daemon.core.engine import GenerationError
    from daemon.serving.service import Service

    service = Service(settings)
    service.start()
    summary = CollectSummary(mode="in-process")

    def send(messages: list[dict[str, str]]) -> tuple[str, int, int, int]:
        result = service.generate(messages, max_tokens=max_tokens)
        s = result.stats
        return result.text, s.drafted, s.accepted, s.generation_tokens

    try:
        # a request the engine refuses; anything else is a bug and ends the run, as before
        threshold = settings.buffer.failure_threshold
        _send_all(summary, send, items, conversations, threshold, progress, (GenerationError,))
    finally:
        service.stop(timeout=None)  # flushes every record to the buffer
    from daemon.store.buffer import ReplayBuffer

    with ReplayBuffer(settings.paths.data_dir, settings.buffer) as buf:
        summary.pending_failures = buf.pending_failure_count()
    return summary


def run(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd collect``: exit 1 when every request failed."""
    items = [PromptItem(messages=[{"role": "user", "content": p}]) for p in args.prompt or []]
    if args.prompts_file is not None:
        items += read_prompts(args.prompts_file, limit=args.limit)
    conversations = None
    if args.conversations is not None:
        conversations = read_conversations(args.conversations, limit=args.limit)
    if not items and not conversations:
        raise PromptFileError(
            "nothing to collect: give -p PROMPT, --prompts-file FILE and/or --conversations FILE"
        )
    summary = collect(
        settings,
        items,
        args.max_tokens,
        progress=not args.quiet,
        use_daemon=not args.in_process,
        conversations=conversations,
    )
    d = summary.to_dict()
    print(f"collected through: {summary.mode}")
    print(
        f"requests: {d['requests']}  failure cases: {d['failure_cases']}  "
        f"acceptance rate: {d['acceptance_rate']:.3f} ({d['accepted']}/{d['drafted']} drafted)  "
        f"completion tokens: {d['completion_tokens']}"
    )
    if d["pending_failures"] is not None:
        print(
            f"pending failures in the buffer: {d['pending_failures']} "
            f"(training starts at {settings.training.min_failure_cases})"
        )
    for err in d["errors"]:
        print(f"error: {err}", file=sys.stderr)
    return 1 if d["errors"] and not d["requests"] else 0
