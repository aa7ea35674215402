"""`SpecdMetrics` on its own: names, labels and values as a Prometheus scraper parses them."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from daemon.core.records import GenerationStats
from daemon.serving.metrics import CONTENT_TYPE, LATENCY_BUCKETS, SpecdMetrics

COUNTERS = {
    "specd_spec_decode_num_drafts": (),
    "specd_spec_decode_num_draft_tokens": (),
    "specd_spec_decode_num_accepted_tokens": (),
    "specd_spec_decode_num_draft_tokens_by_source": ("source",),
    "specd_spec_decode_num_accepted_tokens_by_source": ("source",),
    "specd_spec_decode_num_accepted_tokens_per_pos": ("position",),
    "specd_spec_decode_num_draft_tokens_per_pos": ("position",),
    "specd_requests": ("endpoint", "status"),
    "specd_generations": ("finish_reason",),
    "specd_prompt_tokens": (),
    "specd_prompt_cache_lookups": ("result",),
    "specd_prompt_cache_cached_tokens": (),
    "specd_generation_tokens": (),
    # per served model (models.targets)
    "specd_model_generations": ("model",),
    "specd_model_generation_tokens": ("model",),
    "specd_model_draft_tokens": ("model", "source"),
    "specd_model_accepted_tokens": ("model", "source"),
}
HISTOGRAMS = {
    "specd_request_duration_seconds": ("endpoint",),
    "specd_time_to_first_token_seconds": ("endpoint",),
    "specd_request_queue_time_seconds": (),
}
REQUEST: Any = None  # no request: its generation counts under model "default"
GAUGES = (
    "specd_queue_depth",
    "specd_batched_requests",
    "specd_requests_in_flight",
    "specd_adapter_version",
    "specd_buffer_records",
    "specd_prompt_cache_bytes",
    "specd_buffer_unsaved_records",
    "specd_buffer_dropped_records",
)


def finished(drafted: int, accepted: int, num_drafts: int, reason: str | None = "stop") -> Any:
    stats = GenerationStats(
        prompt_tokens=5,
        generation_tokens=7,
        drafted=drafted,
        accepted=accepted,
        num_drafts=num_drafts,
        accepted_per_position=[accepted],
        drafted_per_position=[drafted],
        drafted_by_source={"model": drafted},
        accepted_by_source={"model": accepted},
    )
    return SimpleNamespace(stats=stats, finish_reason=reason)


def parse(m: SpecdMetrics) -> tuple[dict[str, Any], dict[tuple[str, tuple], float]]:
    families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    return families, samples


def test_exposition_names_types_and_labels() -> None:
    m = SpecdMetrics()
    m.observe_generation(REQUEST, finished(4, 3, 2), 0.01, 0.5)
    m.observe_request("/v1/completions", 200, duration=0.5, ttft=0.1)
    families, samples = parse(m)
    assert set(families) == {*COUNTERS, *HISTOGRAMS, *GAUGES}
    for name, labels in COUNTERS.items():
        f = families[name]
        assert f.type == "counter" and f.documentation
        assert {s.name for s in f.samples} == {f"{name}_total"}  # no *_created series
        assert all(tuple(s.labels) == labels for s in f.samples)
    for name, labels in HISTOGRAMS.items():
        f = families[name]
        assert f.type == "histogram"
        assert {s.name for s in f.samples} == {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        bounds = [float(s.labels["le"]) for s in f.samples if s.name.endswith("_bucket")]
        assert bounds == [*LATENCY_BUCKETS, math.inf]
        assert all(tuple(k for k in s.labels if k != "le") == labels for s in f.samples)
    assert all(families[g].type == "gauge" for g in GAUGES)
    assert samples[("specd_spec_decode_num_draft_tokens_total", ())] == 4
    assert samples[("specd_spec_decode_num_accepted_tokens_total", ())] == 3
    assert samples[("specd_spec_decode_num_drafts_total", ())] == 2
    model = (("source", "model"),)
    assert samples[("specd_spec_decode_num_draft_tokens_by_source_total", model)] == 4
    assert samples[("specd_spec_decode_num_accepted_tokens_by_source_total", model)] == 3
    assert samples[("specd_spec_decode_num_accepted_tokens_per_pos_total", (("position", "0"),))]
    assert samples[("specd_generations_total", (("finish_reason", "stop"),))] == 1
    key = (("endpoint", "/v1/completions"), ("status", "200"))
    assert samples[("specd_requests_total", key)] == 1
    assert samples[("specd_request_queue_time_seconds_count", ())] == 1
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_registry_is_private() -> None:
    a, b = SpecdMetrics(), SpecdMetrics()  # two in one process: no duplicate registration
    a.prompt_tokens.inc(3)
    assert parse(b)[1][("specd_prompt_tokens_total", ())] == 0
    global_names = {f.name for f in prometheus_client.REGISTRY.collect()}
    assert not any(n.startswith("specd_") for n in global_names)


def test_gauge_callbacks_are_read_at_scrape_and_cannot_break_it() -> None:
    m = SpecdMetrics()
    depth = [2]
    m.queue_depth.set_function(lambda: depth[0])
    m.buffer_records.set_function(lambda: 1 / 0)
    m.adapter_version.set(3)
    _, samples = parse(m)
    assert samples[("specd_queue_depth", ())] == 2
    assert math.isnan(samples[("specd_buffer_records", ())])
    assert samples[("specd_adapter_version", ())] == 3
    depth[0] = 5
    assert parse(m)[1][("specd_queue_depth", ())] == 5


def test_rolling_acceptance_and_mean_request_time() -> None:
    m = SpecdMetrics(rolling_window=2)
    empty = m.rolling_acceptance()
    assert empty["requests"] == 0 and empty["acceptance_rate"] is None
    assert empty["mean_accepted_length"] is None and empty["window"] == 2
    m.observe_generation(REQUEST, finished(0, 0, 0), 0.0, 0.1)
    assert m.rolling_acceptance()["acceptance_rate"] is None  # nothing drafted: no evidence
    for drafted, accepted in ((10, 1), (4, 3), (4, 1)):  # the first falls out of the window
        m.observe_generation(REQUEST, finished(drafted, accepted, 2), 0.0, 0.1)
    r = m.rolling_acceptance()
    assert (r["requests"], r["drafted"], r["accepted"]) == (2, 8, 4)
    assert r["acceptance_rate"] == 0.5 and r["mean_accepted_length"] == 2.0

    assert m.mean_request_seconds("/v1/completions") == 0.0
    m.observe_request("/v1/completions", 200, duration=1.0)
    m.observe_request("/v1/completions", 200, duration=3.0)
    m.observe_request("/v1/completions", 400)  # failures carry no duration
    assert m.mean_request_seconds("/v1/completions") == 2.0
    assert m.mean_request_seconds("/v1/chat/completions") == 0.0
