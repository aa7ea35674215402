"""Prometheus metrics for ``GET /metrics``: a small thread-safe registry and specd's metrics.

No dependency on ``prometheus_client``: `Counter`, `Gauge` and `Histogram` below write the text
exposition format (version 0.0.4) themselves. Every metric has its own lock; values are updated
from the generation worker thread (`SpecdMetrics.observe_generation`, an ``on_finished`` hook)
and from the event loop (`SpecdMetrics.observe_request`), and read by the scrape.

The speculative-decoding counters follow vLLM's ``spec_decode`` metrics:

* ``specd_spec_decode_num_drafts_total``: verification rounds that drafted at least one token;
* ``specd_spec_decode_num_draft_tokens_total``: draft tokens proposed;
* ``specd_spec_decode_num_accepted_tokens_total``: draft tokens the target accepted;
* ``specd_spec_decode_num_accepted_tokens_per_pos_total{position="i"}``: acceptances at draft
  position ``i`` (0-based), plus ``..._num_draft_tokens_per_pos_total`` (specd's draft length is
  adaptive, so the per-position denominators differ).

Acceptance rate = accepted / draft tokens; mean accepted length = 1 + accepted / drafts.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = [
    "CONTENT_TYPE",
    "Counter",
    "Gauge",
    "Histogram",
    "Registry",
    "SpecdMetrics",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

LabelKey = tuple[str, ...]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    type_name = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, Any]) -> LabelKey:
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"{self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}"
            )
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [
            f"# HELP {self.name} {_escape_help(self.documentation)}",
            f"# TYPE {self.name} {self.type_name}",
        ]

    def render(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing value per label set (name should end in ``_total``)."""

    type_name = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        self._values: dict[LabelKey, float] = {}
        if not self.labelnames:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        if amount < 0:
            raise ValueError("counters can only increase")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def get(self, **labels: Any) -> float:
        key = self._key(labels)
        with self._lock:
            return self._values.get(key, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.labelnames, k)} {_fmt(v)}" for k, v in items]


class Gauge(_Metric):
    """A value that goes up and down; or, with `set_function`, read at scrape time."""

    type_name = "gauge"

    def __init__(self, name: str, documentation: str) -> None:
        super().__init__(name, documentation)
        self._value = 0.0
        self._fn: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value -= amount

    def set_function(self, fn: Callable[[], float] | None) -> None:
        """Read the value from ``fn()`` at every scrape (None: back to the stored value)."""
        with self._lock:
            self._fn = fn

    def get(self) -> float:
        with self._lock:
            fn, value = self._fn, self._value
        if fn is None:
            return value
        try:
            return float(fn())
        except Exception:  # a broken callback must not break the scrape
            return math.nan

    def render(self) -> list[str]:
        return [f"{self.name} {_fmt(self.get())}"]


class Histogram(_Metric):
    """Cumulative buckets plus ``_sum`` and ``_count`` per label set."""

    type_name = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))
        # per label set: [count per bucket (non-cumulative, +Inf last), sum]
        self._data: dict[LabelKey, tuple[list[int], list[float]]] = {}
        if not self.labelnames:
            self._data[()] = ([0] * (len(self.buckets) + 1), [0.0])

    def observe(self, value: float, **labels: Any) -> None:
        key = self._key(labels)
        i = len(self.buckets)
        for j, b in enumerate(self.buckets):
            if value <= b:
                i = j
                break
        with self._lock:
            counts, total = self._data.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[i] += 1
            total[0] += value

    def count(self, **labels: Any) -> int:
        key = self._key(labels)
        with self._lock:
            data = self._data.get(key)
            return sum(data[0]) if data else 0

    def sum(self, **labels: Any) -> float:
        key = self._key(labels)
        with self._lock:
            data = self._data.get(key)
            return data[1][0] if data else 0.0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, (list(c), s[0])) for k, (c, s) in self._data.items())
        out = []
        for key, (counts, total) in items:
            cum = 0
            for b, n in zip((*self.buckets, math.inf), counts, strict=True):
                cum += n
                le = f'le="{_fmt(b)}"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {cum}")
            lab = _labels(self.labelnames, key)
            out.append(f"{self.name}_sum{lab} {_fmt(total)}")
            out.append(f"{self.name}_count{lab} {cum}")
        return out


class Registry:
    """An ordered set of metrics rendered together."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()

    def register(self, metric: _Metric) -> Any:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} already registered")
            self._metrics[metric.name] = metric
        return metric

    def get(self, name: str) -> _Metric:
        return self._metrics[name]

    def render(self) -> str:
        with self._lock:
            metrics = list(self._metrics.values())
        lines: list[str] = []
        for m in metrics:
            lines += m.header()
            lines += m.render()
        return "\n".join(lines) + "\n"


class SpecdMetrics:
    """All of specd's metrics, plus the rolling acceptance window that ``/status`` reports.

    ``observe_generation(request, result, queue_s, total_s)`` has the signature of the
    worker's ``on_finished`` hook; it runs on the worker thread and only takes locks briefly.
    """

    def __init__(self, rolling_window: int = 100) -> None:
        r = self.registry = Registry()
        p = "specd_"
        self.num_drafts = r.register(
            Counter(f"{p}spec_decode_num_drafts_total", "Verification rounds with a draft.")
        )
        self.num_draft_tokens = r.register(
            Counter(f"{p}spec_decode_num_draft_tokens_total", "Draft tokens proposed.")
        )
        self.num_accepted_tokens = r.register(
            Counter(f"{p}spec_decode_num_accepted_tokens_total", "Draft tokens accepted.")
        )
        self.accepted_per_pos = r.register(
            Counter(
                f"{p}spec_decode_num_accepted_tokens_per_pos_total",
                "Draft tokens accepted at each draft position (0-based).",
                ["position"],
            )
        )
        self.drafted_per_pos = r.register(
            Counter(
                f"{p}spec_decode_num_draft_tokens_per_pos_total",
                "Draft tokens proposed at each draft position (0-based).",
                ["position"],
            )
        )
        self.requests = r.register(
            Counter(
                f"{p}requests_total",
                "HTTP requests by endpoint and status.",
                ["endpoint", "status"],
            )
        )
        self.generations = r.register(
            Counter(
                f"{p}generations_total",
                "Generations run by the worker, by finish reason.",
                ["finish_reason"],
            )
        )
        self.prompt_tokens = r.register(
            Counter(f"{p}prompt_tokens_total", "Prompt tokens processed.")
        )
        self.generation_tokens = r.register(
            Counter(f"{p}generation_tokens_total", "Tokens generated.")
        )
        self.request_duration = r.register(
            Histogram(
                f"{p}request_duration_seconds",
                "End-to-end time of successful generation requests (arrival to last byte).",
                ["endpoint"],
            )
        )
        self.ttft = r.register(
            Histogram(
                f"{p}time_to_first_token_seconds",
                "Time from request arrival to its first generated token.",
                ["endpoint"],
            )
        )
        self.queue_time = r.register(
            Histogram(
                f"{p}request_queue_time_seconds",
                "Time generation requests waited for the worker.",
            )
        )
        self.queue_depth = r.register(
            Gauge(f"{p}queue_depth", "Requests waiting for the generation worker.")
        )
        self.in_flight = r.register(
            Gauge(f"{p}requests_in_flight", "Generation requests being served (queued included).")
        )
        self.adapter_version = r.register(
            Gauge(f"{p}adapter_version", "Version of the draft adapter in use (0: none).")
        )
        self.buffer_records = r.register(
            Gauge(f"{p}buffer_records", "Records in the replay buffer (0 when none is attached).")
        )
        self.started = time.time()
        self._window: deque[tuple[int, int, int]] = deque(maxlen=rolling_window)
        self._window_lock = threading.Lock()

    # --- updates ------------------------------------------------------------------------

    def observe_generation(self, request: Any, result: Any, queue_s: float, total_s: float) -> None:
        """Worker ``on_finished`` hook: engine statistics of one finished generation."""
        s = result.stats
        self.prompt_tokens.inc(s.prompt_tokens)
        self.generation_tokens.inc(s.generation_tokens)
        self.generations.inc(finish_reason=result.finish_reason or "unknown")
        self.num_drafts.inc(s.num_drafts)
        self.num_draft_tokens.inc(s.drafted)
        self.num_accepted_tokens.inc(s.accepted)
        for i, n in enumerate(s.accepted_per_position):
            self.accepted_per_pos.inc(n, position=i)
        for i, n in enumerate(s.drafted_per_position):
            self.drafted_per_pos.inc(n, position=i)
        self.queue_time.observe(queue_s)
        with self._window_lock:
            self._window.append((s.drafted, s.accepted, s.num_drafts))

    def observe_request(
        self,
        endpoint: str,
        status: int,
        duration: float | None = None,
        ttft: float | None = None,
    ) -> None:
        """One HTTP request finished (called on the event loop)."""
        self.requests.inc(endpoint=endpoint, status=status)
        if duration is not None:
            self.request_duration.observe(duration, endpoint=endpoint)
        if ttft is not None:
            self.ttft.observe(ttft, endpoint=endpoint)

    # --- reads --------------------------------------------------------------------------

    def rolling_acceptance(self) -> dict[str, Any]:
        """Acceptance over the last ``rolling_window`` finished generations."""
        with self._window_lock:
            rows = list(self._window)
            window = self._window.maxlen
        drafted = sum(r[0] for r in rows)
        accepted = sum(r[1] for r in rows)
        drafts = sum(r[2] for r in rows)
        return {
            "window": window,
            "requests": len(rows),
            "drafted": drafted,
            "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else None,
            "mean_accepted_length": 1.0 + accepted / drafts if drafts else None,
        }

    def mean_request_seconds(self, endpoint: str) -> float:
        n = self.request_duration.count(endpoint=endpoint)
        return self.request_duration.sum(endpoint=endpoint) / n if n else 0.0

    def render(self) -> str:
        return self.registry.render()
