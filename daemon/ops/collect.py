"""``specd collect``: run prompts through the engine and record them exactly as serving would.

Through the running daemon when one is up (its HTTP API records the requests), else in this
process with the same `Service` the daemon serves with.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from daemon.config import ConfigSources, Settings
from daemon.core.prompts import PromptItem, read_prompts
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


def collect(
    settings: Settings,
    items: list[PromptItem],
    max_tokens: int | None = None,
    progress: bool = True,
    use_daemon: bool = True,
) -> CollectSummary:
    """Send ``items`` through the daemon if one runs for this data dir, else in process."""
    client = DaemonClient.find(settings) if use_daemon else None
    if client is not None:
        return _via_daemon(client, settings, items, max_tokens, progress)
    return _in_process(settings, items, max_tokens, progress)


def _bar(items: list[PromptItem], progress: bool, mode: str):
    return tqdm(items, desc=f"collect ({mode})", unit="req", disable=not progress, file=sys.stderr)


def _via_daemon(
    client: DaemonClient,
    settings: Settings,
    items: list[PromptItem],
    max_tokens: int | None,
    progress: bool,
) -> CollectSummary:
    summary = CollectSummary(mode=f"daemon {client.base_url}")
    threshold = settings.buffer.failure_threshold
    for item in _bar(items, progress, "daemon"):
        body: dict[str, Any] = {"messages": item.messages}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        try:
            resp = client.request("POST", "/v1/chat/completions", body)
        except Exception as e:  # one bad request must not end the run
            summary.errors.append(str(e))
            continue
        usage = resp.get("usage", {})
        spec = usage.get("speculative", {})
        summary.add(
            spec.get("drafted", 0),
            spec.get("accepted", 0),
            usage.get("completion_tokens", 0),
            threshold,
        )
    try:
        status = client.request("GET", "/status", timeout=30)
        summary.pending_failures = (status.get("buffer") or {}).get("pending_failures")
    except Exception:
        pass
    return summary


def _in_process(
    settings: Settings, items: list[PromptItem], max_tokens: int | None, progress: bool
) -> CollectSummary:
    from daemon.core.engine import GenerationError
    from daemon.serving.service import Service

    service = Service(settings)
    service.start()
    summary = CollectSummary(mode="in-process")
    threshold = settings.buffer.failure_threshold
    try:
        for item in _bar(items, progress, "in-process"):
            try:
                result = service.generate(item.messages, max_tokens=max_tokens)
            except GenerationError as e:
                summary.errors.append(f"{item.text[:40]!r}: {e}")
                continue
            s = result.stats
            summary.add(s.drafted, s.accepted, s.generation_tokens, threshold)
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
    if not items:
        raise PromptFileError("nothing to collect: give -p PROMPT and/or --prompts-file FILE")
    summary = collect(
        settings, items, args.max_tokens, progress=not args.quiet, use_daemon=not args.in_process
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
