"""Prometheus metrics for ``GET /metrics``, on prometheus-client with a private registry.

`SpecdMetrics` owns a `CollectorRegistry` of its own (not prometheus-client's global one), so
several daemons or tests in one process never share or collide on series. The text exposition
(format 0.0.4) comes from prometheus-client's ``generate_latest``; the ``*_created`` samples
it adds to counters and histograms are left out of it, as specd never exposed them (and
``disable_created_metrics()`` would switch them off for the whole process). prometheus-client's
metrics are thread-safe: values are updated from the generation worker thread
(`SpecdMetrics.observe_generation`, an ``on_finished`` hook) and from the event loop
(`SpecdMetrics.observe_request`), and read by the scrape.

The speculative-decoding counters follow vLLM's ``spec_decode`` metrics:

* ``specd_spec_decode_num_drafts_total``: verification rounds that drafted at least one token;
* ``specd_spec_decode_num_draft_tokens_total``: draft tokens proposed;
* ``specd_spec_decode_num_accepted_tokens_total``: draft tokens the target accepted;
* ``specd_spec_decode_num_accepted_tokens_per_pos_total{position="i"}``: acceptances at draft
  position ``i`` (0-based), plus ``..._num_draft_tokens_per_pos_total`` (specd's draft length is
  adaptive, so the per-position denominators differ).

Acceptance rate = accepted / draft tokens; mean accepted length = 1 + accepted / drafts.

Besides the exposition, `SpecdMetrics` keeps the figures the API reads directly: the rolling
acceptance window ``/status`` reports (`rolling_acceptance`) and the mean request time the
429 ``Retry-After`` estimate uses (`mean_request_seconds`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from daemon.core.records import acceptance_rate

try:  # prometheus-client >= 0.22: CONTENT_TYPE_LATEST names text format 1.0.0, not ours
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE
except ImportError:  # older: CONTENT_TYPE_LATEST is the 0.0.4 text format generate_latest writes
    from prometheus_client.exposition import CONTENT_TYPE_LATEST as CONTENT_TYPE

if TYPE_CHECKING:
    from daemon.core.engine import GenerationResult
    from daemon.serving.requests import GenerationRequest

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "SpecdMetrics"]

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


class _Gauge(Gauge):
    """A gauge whose `set_function` callback cannot break a scrape: it reads NaN if it raises."""

    def set_function(self, f: Callable[[], float]) -> None:
        def read() -> float:
            try:
                return float(f())
            except Exception:  # e.g. the buffer closed during shutdown
                return math.nan

        super().set_function(read)


class _WithoutCreated:
    """A collector: ``registry``'s metrics minus the ``<name>_created`` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            created = family.name + "_created"
            # prometheus-client builds fresh Metric objects per collect: filtering in place is safe
            family.samples = [s for s in family.samples if s.name != created]
            yield family


class SpecdMetrics:
    """All of specd's metrics, plus the rolling acceptance window that ``/status`` reports.

    ``observe_generation(request, result, queue_s, total_s)`` has the signature of the
    worker's ``on_finished`` hook; it runs on the worker thread and only takes locks briefly.
    The gauges' ``set_function(fn)`` reads ``fn()`` at every scrape (NaN if it raises).
    """

    def __init__(self, rolling_window: int = 100) -> None:
        r = self.registry = CollectorRegistry()
        p = "specd_"
        # Counter names go without "_total": prometheus-client appends it to the sample.
        self.num_drafts = Counter(
            f"{p}spec_decode_num_drafts", "Verification rounds with a draft.", registry=r
        )
        self.num_draft_tokens = Counter(
            f"{p}spec_decode_num_draft_tokens", "Draft tokens proposed.", registry=r
        )
        self.num_accepted_tokens = Counter(
            f"{p}spec_decode_num_accepted_tokens", "Draft tokens accepted.", registry=r
        )
        # vLLM's totals above stay unlabelled; these split them by drafting source
        # (model, lookup, suffix: daemon.core.drafting).
        self.draft_tokens_by_source = Counter(
            f"{p}spec_decode_num_draft_tokens_by_source",
            "Draft tokens proposed, by drafting source.",
            ["source"],
            registry=r,
        )
        self.accepted_tokens_by_source = Counter(
            f"{p}spec_decode_num_accepted_tokens_by_source",
            "Draft tokens accepted, by drafting source.",
            ["source"],
            registry=r,
        )
        self.accepted_per_pos = Counter(
            f"{p}spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each draft position (0-based).",
            ["position"],
            registry=r,
        )
        self.drafted_per_pos = Counter(
            f"{p}spec_decode_num_draft_tokens_per_pos",
            "Draft tokens proposed at each draft position (0-based).",
            ["position"],
            registry=r,
        )
        self.requests = Counter(
            f"{p}requests",
            "HTTP requests by endpoint and status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.generations = Counter(
            f"{p}generations",
            "Generations run by the worker, by finish reason.",
            ["finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "Prompt tokens processed.", registry=r)
        # per served model (models.targets); the totals above sum them
        self.model_generations = Counter(
            f"{p}model_generations", "Generations, by served model.", ["model"], registry=r
        )
        self.model_generation_tokens = Counter(
            f"{p}model_generation_tokens",
            "Tokens generated, by served model.",
            ["model"],
            registry=r,
        )
        self.model_draft_tokens = Counter(
            f"{p}model_draft_tokens",
            "Draft tokens proposed, by served model and drafting source.",
            ["model", "source"],
            registry=r,
        )
        self.model_accepted_tokens = Counter(
            f"{p}model_accepted_tokens",
            "Draft tokens accepted, by served model and drafting source.",
            ["model", "source"],
            registry=r,
        )
        self.prompt_cache_lookups = Counter(
            f"{p}prompt_cache_lookups",
            "Generations by whether the prompt cache held a prefix of their prompt.",
            ["result"],
            registry=r,
        )
        self.prompt_cache_cached_tokens = Counter(
            f"{p}prompt_cache_cached_tokens",
            "Prompt tokens served from the prompt cache instead of being prefilled.",
            registry=r,
        )
        self.prompt_cache_bytes = _Gauge(
            f"{p}prompt_cache_bytes", "Memory held by the prompt cache.", registry=r
        )
        self.generation_tokens = Counter(f"{p}generation_tokens", "Tokens generated.", registry=r)
        self.request_duration = Histogram(
            f"{p}request_duration_seconds",
            "End-to-end time of successful generation requests (arrival to last byte).",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            f"{p}time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            f"{p}request_queue_time_seconds",
            "Time generation requests waited for the worker.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = _Gauge(
            f"{p}queue_depth", "Requests waiting for the generation worker.", registry=r
        )
        self.batched = _Gauge(
            f"{p}batched_requests",
            "Requests being decoded together in a batch (continuous batching).",
            registry=r,
        )
        self.in_flight = _Gauge(
            f"{p}requests_in_flight",
            "Generation requests being served (queued included).",
            registry=r,
        )
        self.adapter_version = _Gauge(
            f"{p}adapter_version", "Version of the draft adapter in use (0: none).", registry=r
        )
        self.buffer_records = _Gauge(
            f"{p}buffer_records",
            "Records in the replay buffer (0 when none is attached).",
            registry=r,
        )
        self.buffer_unsaved = _Gauge(
            f"{p}buffer_unsaved_records",
            "Records that failed to commit (e.g. a full disk), kept in memory for a retry.",
            registry=r,
        )
        self.buffer_dropped = _Gauge(
            f"{p}buffer_dropped_records",
            "Records lost since start: the retry queue was full or they still failed at exit.",
            registry=r,
        )
        self._exposed = _WithoutCreated(r)
        self.started = time.time()
        self._window: deque[tuple[int, int, int]] = deque(maxlen=rolling_window)
        self._window_lock = threading.Lock()

    # --- updates ------------------------------------------------------------------------

    def observe_generation(
        self, request: GenerationRequest, result: GenerationResult, queue_s: float, total_s: float
    ) -> None:
        """Worker ``on_finished`` hook: engine statistics of one finished generation."""
        s = result.stats
        self.prompt_tokens.inc(s.prompt_tokens)
        self.prompt_cache_lookups.labels(result="hit" if s.cached_tokens else "miss").inc()
        self.prompt_cache_cached_tokens.inc(s.cached_tokens)
        self.generation_tokens.inc(s.generation_tokens)
        self.generations.labels(finish_reason=result.finish_reason or "unknown").inc()
        self.num_drafts.inc(s.num_drafts)
        self.num_draft_tokens.inc(s.drafted)
        self.num_accepted_tokens.inc(s.accepted)
        model = (request.model if request is not None else None) or "default"
        self.model_generations.labels(model=model).inc()
        self.model_generation_tokens.labels(model=model).inc(s.generation_tokens)
        for source, n in s.drafted_by_source.items():
            self.draft_tokens_by_source.labels(source=source).inc(n)
            accepted = s.accepted_by_source.get(source, 0)
            self.accepted_tokens_by_source.labels(source=source).inc(accepted)
            self.model_draft_tokens.labels(model=model, source=source).inc(n)
            self.model_accepted_tokens.labels(model=model, source=source).inc(accepted)
        for i, n in enumerate(s.accepted_per_position):
            self.accepted_per_pos.labels(position=i).inc(n)
        for i, n in enumerate(s.drafted_per_position):
            self.drafted_per_pos.labels(position=i).inc(n)
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
        self.requests.labels(endpoint=endpoint, status=status).inc()
        if duration is not None:
            self.request_duration.labels(endpoint=endpoint).observe(duration)
        if ttft is not None:
            self.ttft.labels(endpoint=endpoint).observe(ttft)

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
            "acceptance_rate": acceptance_rate(accepted, drafted),
            "mean_accepted_length": 1.0 + accepted / drafts if drafts else None,
        }

    def model_acceptance(self, model: str) -> float | None:
        """Accepted / drafted over ``model``'s generations since start (None: none drafted),
        from its counters, every drafting source summed."""

        def total(counter: Counter) -> int:
            return int(
                sum(
                    sample.value
                    for metric in counter.collect()
                    for sample in metric.samples
                    if sample.name.endswith("_total") and sample.labels.get("model") == model
                )
            )

        return acceptance_rate(total(self.model_accepted_tokens), total(self.model_draft_tokens))

    def mean_request_seconds(self, endpoint: str) -> float:
        """Mean duration of successful generation requests to ``endpoint`` (0: none yet)."""
        name, labels = "specd_request_duration_seconds", {"endpoint": endpoint}
        n = self.registry.get_sample_value(f"{name}_count", labels)
        total = self.registry.get_sample_value(f"{name}_sum", labels)
        return total / n if n and total is not None else 0.0

    def render(self) -> bytes:
        """The text exposition (`CONTENT_TYPE`) of every metric."""
        return generate_latest(self._exposed)
