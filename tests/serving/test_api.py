"""The OpenAI-compatible HTTP service: a real server on a loopback port with the tiny models.

Most tests share one in-process `Server` (uvicorn in a thread, port 0) around the conftest tiny
models; a few start their own, and two run ``python -m daemon serve`` as a subprocess.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import mlx.core as mx
import numpy as np
import openai
import pytest
from pydantic import SecretStr

from daemon.config import load_settings
from daemon.core.engine import GenerationResult, SamplingParams
from daemon.core.models import ModelPair
from daemon.core.prompts import encode_prompt
from daemon.server import Server
from daemon.serving.api import MAX_BODY_BYTES
from daemon.serving.api.schemas import IGNORED_HEADER
from daemon.serving.endpoint import is_loopback_host
from tests.helpers import (
    HANG_GUARD_S,
    read_log,
    start_daemon,
    start_server,
    stop_server,
    tiny_pair,
    wait_for_event,
    wait_until,
    write_model_dir,
)

LONG_PROMPT = "The quick brown fox"  # greedy output runs to max_tokens (no early EOS)


# --------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def pair(tiny_tokenizer, tiny_target, tiny_draft) -> ModelPair:
    return tiny_pair(tiny_target, tiny_draft, tiny_tokenizer, "tiny-target")


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """JSON logs of this module's servers go to a file (and not to the terminal)."""
    import logging

    import structlog

    from daemon.logging import configure_logging

    root = logging.getLogger()
    level = root.level
    path = tmp_path_factory.mktemp("logs") / "specd.log"
    configure_logging("info", path, "off")
    yield path
    root.setLevel(level)
    for h in [h for h in root.handlers if getattr(h, "_specd", False)]:
        root.removeHandler(h)
        h.close()
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, pair: ModelPair, log_file: Path
) -> Iterator[Server]:
    srv, thread = start_server(tmp_path_factory.mktemp("api") / "data", pair, max_tokens_limit=256)
    yield srv
    stop_server(srv, thread)
    assert srv.exit_code == 0


def test_health_says_loading_until_the_models_are_ready(
    tmp_path: Path, pair: ModelPair, log_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The port answers while the models load: /health 503 loading, the API 503 with
    Retry-After; then 200 once ready."""
    import daemon.server as server_mod

    release = threading.Event()

    def slow_load(settings: Any, group: Any = None) -> ModelPair:
        assert release.wait(HANG_GUARD_S)
        return pair

    monkeypatch.setattr(server_mod, "load_pair", slow_load)
    cfg = tmp_path / "config.yaml"
    cfg.write_text("{}\n")
    overrides = {"paths.data_dir": str(tmp_path / "data"), "server.port": 0}
    settings, sources = load_settings(cfg, {**overrides, "training.enabled": False})
    srv = Server(settings, sources, None)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: srv.port is not None and srv._switch is not None, "HTTP bound")
        url = f"http://127.0.0.1:{srv.port}"
        wait_until(lambda: _get_status(f"{url}/health") == 503, "loading answers")
        r = httpx.get(f"{url}/health")
        assert r.json() == {"status": "loading"} and not srv.ready.is_set()
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"})
        assert_error(r, 503, "loading")
        assert r.headers["retry-after"] == "5"
        release.set()
        wait_until(srv.ready.is_set, "models loaded")
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
    finally:
        release.set()
        stop_server(srv, thread)


def _get_status(url: str) -> int | None:
    try:
        return httpx.get(url).status_code
    except httpx.HTTPError:
        return None


class Finished:
    """Captures what the worker's on_finished hooks see, by completion id."""

    def __init__(self) -> None:
        self.records: dict[str, GenerationResult] = {}
        self.cond = threading.Condition()

    def __call__(self, request: Any, result: GenerationResult, queue_s: float, total_s: float):
        with self.cond:
            self.records[request.meta.get("id", "")] = result
            self.cond.notify_all()

    def wait(self, rid: str, timeout: float = HANG_GUARD_S) -> GenerationResult:
        with self.cond:
            assert self.cond.wait_for(lambda: rid in self.records, timeout), f"{rid} never finished"
            return self.records[rid]


@pytest.fixture
def finished(served: Server) -> Iterator[Finished]:
    hook = Finished()
    served.finished_hooks.append(hook)
    yield hook
    served.finished_hooks.remove(hook)


def client(srv: Server, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, **kw)


def reference(srv: Server, tokens: list[int], params: SamplingParams) -> GenerationResult:
    """The engine run directly (on the worker thread, between requests)."""
    return srv.worker.call_between_requests(lambda: srv.engine.run(tokens, params)).result(
        HANG_GUARD_S
    )


def chat_tokens(srv: Server, content: str) -> list[int]:
    return encode_prompt(srv.pair.tokenizer, [{"role": "user", "content": content}])


def scrape(srv: Server) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    text = httpx.get(f"{srv.url}/metrics").text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def sse_events(lines: list[str]) -> list[Any]:
    out: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def block_worker(srv: Server) -> threading.Event:
    """Occupy the worker thread until the returned event is set."""
    gate = threading.Event()
    fut = srv.worker.call_between_requests(lambda: gate.wait(HANG_GUARD_S))
    wait_until(fut.running, "worker blocked")
    return gate


# --------------------------------------------------------------------------------------------
# Basics


def test_runtime_file_health_models(served: Server) -> None:
    path = served.settings.runtime_file
    data = json.loads(path.read_text())
    assert data["port"] == served.port > 0
    assert data["host"] == "127.0.0.1"
    assert data["pid"] == os.getpid()
    assert data["url"] == served.url
    assert {"started", "version"} <= data.keys()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    assert httpx.get(f"{served.url}/health").json() == {"status": "ok"}
    models = client(served).models.list()
    assert [(m.id, m.owned_by) for m in models.data] == [("tiny-target", "specd")]
    assert httpx.get(f"{served.url}/v1/models/tiny-target").json()["id"] == "tiny-target"
    assert_error(httpx.get(f"{served.url}/v1/models/gpt-4"), 404, "model_not_found")


def test_cli_client_finds_the_server(served: Server) -> None:
    """`specd status`/`specd collect` find the daemon through runtime.json."""
    from daemon.ops.client import DaemonClient
    from daemon.ops.status import format_status

    c = DaemonClient.find(served.settings)
    assert c is not None and c.base_url == served.url
    text = format_status(c.base_url, c.request("GET", "/status"))
    assert "tiny-target" in text and "queue depth 0" in text


def test_format_progress() -> None:
    from daemon.ops.status import format_progress

    assert format_progress(None) == "starting"
    assert format_progress({"phase": "eval_before"}) == "eval_before"
    p = {"phase": "training", "step": 3, "total_steps": 12, "loss": 1.23456}
    assert format_progress(p) == "training step 3/12, loss 1.235"


def test_loopback_detection() -> None:
    assert is_loopback_host("127.0.0.1")
    assert is_loopback_host("localhost")
    assert is_loopback_host("::1")
    assert not is_loopback_host("0.0.0.0")
    assert not is_loopback_host("")


# --------------------------------------------------------------------------------------------
# Generation through the official client, compared with the engine


def test_chat_non_streaming_matches_engine(served: Server, finished: Finished) -> None:
    resp = client(served).chat.completions.create(
        model="tiny-target",
        messages=[{"role": "user", "content": "Hello world!"}],
        max_tokens=24,
    )
    ref = reference(served, chat_tokens(served, "Hello world!"), SamplingParams(max_tokens=24))
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert resp.model == "tiny-target"
    assert resp.id.startswith("chatcmpl-")
    u = resp.usage
    assert u.prompt_tokens == len(chat_tokens(served, "Hello world!"))
    assert u.completion_tokens == len(ref.tokens)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    # The usage reports the served request's own rounds (a second run of the same prompt may
    # draft differently: the suffix index and the cost-aware policy learn from the first).
    served_stats = finished.wait(resp.id).stats
    spec = u.model_extra["speculative"]
    assert spec["drafted"] == served_stats.drafted and spec["accepted"] == served_stats.accepted
    assert spec["acceptance_rate"] == pytest.approx(served_stats.acceptance_rate)
    assert spec["mean_accepted_length"] == pytest.approx(served_stats.mean_accepted_length)
    assert {s: v["drafted"] for s, v in spec["sources"].items()} == served_stats.drafted_by_source


def test_chat_streaming_with_usage(served: Server) -> None:
    stream = client(served).chat.completions.create(
        model="specd",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_completion_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ref = reference(
        served, encode_prompt(served.pair.tokenizer, msgs), SamplingParams(max_tokens=30)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [ref.finish_reason]
    assert len({c.id for c in chunks}) == 1
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == len(ref.tokens)
    assert "speculative" in last.usage.model_extra
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_non_streaming_and_streaming(served: Server) -> None:
    c = client(served)
    tokens = served.pair.tokenizer.encode(LONG_PROMPT)
    ref = reference(served, tokens, SamplingParams(max_tokens=40))
    assert ref.finish_reason == "length"
    resp = c.completions.create(model="tiny-target", prompt=LONG_PROMPT, max_tokens=40)
    assert resp.object == "text_completion"
    assert resp.choices[0].text == ref.text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 40
    assert resp.usage.prompt_tokens == len(tokens)

    chunks = list(
        c.completions.create(prompt=LONG_PROMPT, max_tokens=40, stream=True, model="specd")
    )
    assert "".join(ch.choices[0].text for ch in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(ch.usage is None for ch in chunks)  # no include_usage

    # token-id prompts are accepted too (one prompt, not a batch)
    resp = c.completions.create(model="tiny-target", prompt=tokens, max_tokens=40)
    assert resp.choices[0].text == ref.text


def test_sampling_parameters_reach_the_engine(served: Server) -> None:
    c = client(served)
    tokens = served.pair.tokenizer.encode(LONG_PROMPT)
    greedy = reference(served, tokens, SamplingParams(max_tokens=30))
    stop = greedy.text[8:12]
    assert stop and stop in greedy.text
    ref = reference(served, tokens, SamplingParams(max_tokens=30, stop=[stop]))
    resp = c.completions.create(model="specd", prompt=LONG_PROMPT, max_tokens=30, stop=stop)
    assert resp.choices[0].text == ref.text == greedy.text[: greedy.text.find(stop)]
    assert resp.choices[0].finish_reason == "stop"

    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=20)
    ref = reference(served, tokens, params)
    for stream in (False, True):
        r = httpx.post(
            f"{served.url}/v1/completions",
            json={
                "prompt": LONG_PROMPT,
                "temperature": 0.8,
                "top_p": 0.9,
                "seed": 7,
                "max_tokens": 20,
                "stream": stream,
            },
        )
        assert r.status_code == 200
        if stream:
            text = "".join(
                e["choices"][0]["text"] for e in sse_events(r.text.splitlines()) if e != "[DONE]"
            )
        else:
            text = r.json()["choices"][0]["text"]
        assert text == ref.text  # same seed, same sample


def test_defaults_come_from_settings(served: Server) -> None:
    old = served.settings.sampling.max_tokens
    served.settings.sampling.max_tokens = 7
    try:
        r = httpx.post(f"{served.url}/v1/completions", json={"prompt": LONG_PROMPT})
    finally:
        served.settings.sampling.max_tokens = old
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == 7


def test_without_max_tokens_the_answer_is_complete(served: Server) -> None:
    """No max_tokens and no configured default: until EOS or the context end, within
    server.max_tokens_limit; never a fixed cut."""
    assert served.settings.sampling.max_tokens is None
    limit = served.settings.server.max_tokens_limit
    r = httpx.post(f"{served.url}/v1/completions", json={"prompt": LONG_PROMPT})
    assert r.status_code == 200, r.text
    body = r.json()
    n = body["usage"]["completion_tokens"]
    if body["choices"][0]["finish_reason"] == "length":
        context = served.pair.max_context or limit
        assert n == min(limit, context - body["usage"]["prompt_tokens"]) or n == limit
    else:
        assert body["choices"][0]["finish_reason"] == "stop" and n <= limit


def test_request_finished_is_logged(served: Server, log_file: Path) -> None:
    r = httpx.post(f"{served.url}/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 9})
    rid = r.json()["id"]

    def record() -> dict | None:
        return next((x for x in read_log(log_file) if x.get("request_id") == rid), None)

    wait_until(lambda: record() is not None, "request_finished record")
    rec = record()
    assert rec["event"] == "request_finished" and rec["component"] == "api"
    assert rec["level"] == "info" and rec["status"] == 200
    assert rec["endpoint"] == "/v1/completions" and rec["completion_tokens"] == 9
    assert rec["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert 0 <= rec["acceptance_rate"] <= 1 and rec["duration_s"] > 0


def test_eight_concurrent_clients_get_correct_answers(served: Server) -> None:
    prompts = [f"Client {i}: the cat sat on the mat" for i in range(8)]
    refs = [
        reference(served, chat_tokens(served, p), SamplingParams(max_tokens=32)) for p in prompts
    ]
    results: dict[int, str] = {}
    batched: dict[int, int] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            c = client(served)
            msgs = [{"role": "user", "content": prompts[i]}]
            if i % 2:
                stream = c.chat.completions.create(
                    model="specd", messages=msgs, max_tokens=32, stream=True
                )
                results[i] = "".join(ch.choices[0].delta.content or "" for ch in stream)
            else:
                resp = c.chat.completions.create(model="specd", messages=msgs, max_tokens=32)
                results[i] = resp.choices[0].message.content
                batched[i] = resp.model_dump()["usage"]["speculative"]["batched_tokens"]
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD_S)
    assert not errors, errors
    # decoded together (continuous batching) and still the target's own greedy answers
    assert results == {i: r.text for i, r in enumerate(refs)}
    assert any(batched.values()), batched


# --------------------------------------------------------------------------------------------
# Metrics and status


def test_metrics_counters_move(served: Server) -> None:
    before = scrape(served)
    resp = httpx.post(
        f"{served.url}/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 25}
    ).json()
    spec = resp["usage"]["speculative"]
    ep = 'endpoint="/v1/completions"'
    expected = {
        "specd_spec_decode_num_draft_tokens_total": spec["drafted"],
        "specd_spec_decode_num_accepted_tokens_total": spec["accepted"],
        "specd_spec_decode_num_drafts_total": spec["num_drafts"],
        "specd_generation_tokens_total": 25,
        "specd_prompt_tokens_total": resp["usage"]["prompt_tokens"],
        f'specd_requests_total{{{ep},status="200"}}': 1,
        f"specd_request_duration_seconds_count{{{ep}}}": 1,
        f"specd_time_to_first_token_seconds_count{{{ep}}}": 1,
    }

    def deltas() -> dict[str, float]:
        after = scrape(served)
        return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in expected}

    # the worker's on_finished hook and the request counter run just after the response
    wait_until(lambda: deltas() == expected, f"metrics {expected}")
    after = scrape(served)
    per_pos = sum(
        after[k] - before.get(k, 0.0)
        for k in after
        if k.startswith("specd_spec_decode_num_accepted_tokens_per_pos")
    )
    assert per_pos == spec["accepted"]
    assert after["specd_queue_depth"] == 0
    assert after["specd_adapter_version"] == 0
    assert after["specd_buffer_records"] >= 1  # every served request is recorded

    key = f'specd_requests_total{{{ep},status="400"}}'
    httpx.post(f"{served.url}/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 0})
    wait_until(lambda: scrape(served).get(key, 0.0) - after.get(key, 0.0) == 1, key)


def test_metrics_exposition_parses(served: Server) -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    r = httpx.get(f"{served.url}/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in parser.text_string_to_metric_families(r.text)}
    assert families["specd_spec_decode_num_drafts"].type == "counter"
    assert families["specd_request_duration_seconds"].type == "histogram"
    assert families["specd_queue_depth"].type == "gauge"
    names = {s.name for f in families.values() for s in f.samples}
    assert {"specd_requests_total", "specd_spec_decode_num_accepted_tokens_total"} <= names


def test_status_and_hooks(served: Server) -> None:
    httpx.post(f"{served.url}/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 10})
    wait_until(
        lambda: httpx.get(f"{served.url}/status").json()["acceptance"]["requests"] > 0,
        "acceptance in /status",
    )
    st = httpx.get(f"{served.url}/status").json()
    assert st["models"] == {
        "target": "tiny-target",
        "draft": "tiny-draft",
        "draft_kind": "model",
        "draft_head_tokens": None,
        "dtype": "float32",
        "max_context": 512,
        "loaded": True,
    }
    assert st["backend"]["device"] == "cpu"
    assert st["adapter_version"] == 0
    assert st["acceptance"]["requests"] >= 1
    assert 0 <= st["acceptance"]["acceptance_rate"] <= 1
    assert st["queue"] == {
        "depth": 0,
        "size": 16,
        "active": False,
        "batched": 0,
        "batch_size": 8,
        "in_flight": 0,
    }
    assert st["queue_depth"] == 0 and st["pid"] == os.getpid()
    assert st["rolling_acceptance"] == st["acceptance"]["acceptance_rate"]
    assert st["uptime_s"] > 0 and st["accepting"] is True
    # Every served request is recorded: /status reports the replay buffer's real counts.
    buf = served.service.buffer
    assert st["buffer"]["records"] == buf.count() >= 1
    assert st["buffer"]["pending_failures"] == buf.pending_failure_count()
    assert "training" not in st  # no adaptation loop attached: nothing reported
    # what the round policy measured, the figures behind every round's choice
    assert st["speculation"]["verify_s"]["1"] > 0 and st["speculation"]["rounds"]

    def broken() -> dict:
        raise RuntimeError("boom")

    served.status_providers.extend([lambda: {"extra": {"answer": 42}}, broken])
    served.service.primary.adapter = SimpleNamespace(version=2)  # as if v2 were in service
    try:
        st = httpx.get(f"{served.url}/status").json()
        assert st["extra"] == {"answer": 42}
        assert st["adapter_version"] == 2
        assert "boom" in next(iter(st["provider_errors"].values()))
        m = scrape(served)
        assert m["specd_adapter_version"] == 2 and m["specd_buffer_records"] == buf.count()
    finally:
        del served.status_providers[-2:]
        served.service.primary.adapter = None


def test_status_and_metrics_never_block_the_event_loop(served: Server, monkeypatch) -> None:
    """/status and /metrics read the buffer, the adapter store and files: while they wait
    (a slow disk, a big buffer) every other request is still answered."""
    release = threading.Event()
    entered: list[str] = []

    def blocked(what: str) -> None:
        entered.append(what)
        release.wait(HANG_GUARD_S)

    render = served.metrics.render
    monkeypatch.setattr(served.metrics, "render", lambda: (blocked("metrics"), render())[1])
    served.status_providers.append(lambda: (blocked("status"), {})[1])
    try:
        with ThreadPoolExecutor(2) as pool:
            slow = [
                pool.submit(httpx.get, f"{served.url}{path}", timeout=HANG_GUARD_S)
                for path in ("/status", "/metrics")
            ]
            wait_until(lambda: len(entered) == 2, "both scrapes inside their providers")
            assert httpx.get(f"{served.url}/health", timeout=2).status_code == 200
            assert httpx.get(f"{served.url}/v1/models", timeout=2).status_code == 200
            release.set()
            assert [f.result().status_code for f in slow] == [200, 200]
    finally:
        release.set()
        served.status_providers.pop()


# --------------------------------------------------------------------------------------------
# Errors


def _chat(**kw: Any) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


BAD_REQUESTS = [
    ("chat", b"{", 400, "invalid_json"),
    ("chat", b"[]", 400, None),
    ("chat", b"", 400, None),
    ("chat", {"messages": []}, 400, None),
    ("chat", {"messages": "hi"}, 400, None),
    ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, None),
    ("chat", _chat(model="gpt-4"), 404, "model_not_found"),
    ("chat", _chat(n=2), 400, "unsupported"),
    ("chat", _chat(max_tokens=0), 400, None),
    ("chat", _chat(max_tokens=-3), 400, None),
    ("chat", _chat(max_tokens="many"), 400, None),
    ("chat", _chat(temperature="hot"), 400, None),
    ("chat", _chat(temperature=-1), 400, None),
    ("chat", _chat(top_p=0), 400, None),
    ("chat", _chat(stop=""), 400, None),
    ("chat", _chat(stop=[1, 2]), 400, None),
    ("chat", _chat(top_logprobs=3), 400, "invalid_value"),  # without logprobs: true
    ("chat", _chat(logprobs=True, top_logprobs=30), 400, None),
    ("chat", _chat(stream="yes please"), 400, None),
    ("completions", {"prompt": ["a", "b"]}, 400, "unsupported"),
    ("completions", {"prompt": [[1, 2], [3]]}, 400, "unsupported"),
    ("completions", {"prompt": []}, 400, None),
    ("completions", {"prompt": [10**6]}, 400, None),
    ("completions", {"prompt": [10**6], "stream": True}, 400, None),
    ("completions", {"prompt": list(range(5, 605))}, 400, "context_length_exceeded"),
    ("completions", {"prompt": "x", "echo": True}, 400, "unsupported"),
    ("completions", {"prompt": "x", "best_of": 3}, 400, "unsupported"),
    ("completions", {"prompt": "x", "suffix": "y"}, 400, "unsupported"),  # no FIM tokens
    ("completions", {}, 400, None),
    ("completions", b'{"prompt": "\\ud800"}', 400, "invalid_value"),  # lone surrogate
    ("chat", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, None),
    ("chat", b'{"messages": [{"role": "user", "content": "x"}], "model": "\\ud800"}', 404, None),
    ("chat", b"--x--", 400, "invalid_json"),
    # fields specd does not implement are refused by name, never dropped
    ("chat", _chat(tools=[{"type": "function"}]), 400, "invalid_value"),  # no function
    (
        "chat",
        _chat(tools=[{"type": "function", "function": {"name": "f"}}]),
        400,
        "unsupported",  # the tiny model's template has no tool support
    ),
    ("chat", _chat(response_format={"type": "json_schema"}), 400, "invalid_value"),
    (
        "chat",
        _chat(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}),
        400,
        "invalid_value",
    ),
    ("chat", _chat(response_format={"type": "yaml"}), 400, None),
    ("chat", {"messages": [{"role": "user", "content": "x", "audio": {}}]}, 400, None),
    ("chat", _chat(presence_penalty=-3.0), 400, None),
    ("chat", _chat(min_p=2), 400, None),
    ("chat", _chat(repetition_penalty=-1), 400, None),
    ("chat", _chat(logit_bias={"x": 3.0}), 400, "invalid_value"),
    ("chat", _chat(logit_bias={"5": 300}), 400, "invalid_value"),
    ("chat", _chat(logit_bias={"999999": 1}), 400, "invalid_value"),
]


UNKNOWN = {
    "frobnicate": 1,
    "top_a": 0.1,
    "cache_prompt": True,
    "mirostat_tau": 5.0,
    "prediction": {"type": "content", "content": "x"},
    "mirostat": 0,
    "typical_p": 1.0,
    "tfs_z": 1.0,
    "num_ctx": 2048,
    "x_vendor": {"a": [1, 2]},
}


def test_unknown_fields_are_ignored_and_named_in_a_header(served: Server, log_file: Path) -> None:
    body = _chat(**UNKNOWN)
    body["messages"] = [
        {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]},
        {"role": "assistant", "content": "ok", "id": "m1", "opts": {"visible": True}},
        {"role": "user", "content": "more"},
    ]
    body.update(user="u1", metadata={"k": "v"}, store=False, service_tier="auto")
    r = httpx.post(served.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    named = r.headers[IGNORED_HEADER].split(", ")
    assert named == [
        *UNKNOWN,
        "messages[].content[].cache_control",
        "messages[].id",
        "messages[].opts",
    ]
    # the documented harmless fields are not unknown; a request without extras has no header
    r = httpx.post(served.url + "/v1/chat/completions", json=_chat(user="u2"))
    assert r.status_code == 200 and IGNORED_HEADER not in r.headers
    # streamed too
    with httpx.stream(
        "POST", served.url + "/v1/completions", json={"prompt": "x", "stream": True, "suffix_x": 1}
    ) as r:
        assert r.status_code == 200 and r.headers[IGNORED_HEADER] == "suffix_x"
        r.read()

    def logged() -> list[dict]:
        return [x for x in read_log(log_file) if x.get("event") == "unknown_field_ignored"]

    wait_until(lambda: len(logged()) >= len(named) + 1, "unknown fields logged")
    again = httpx.post(served.url + "/v1/chat/completions", json=body).json()["id"]
    # its request_finished line comes after any unknown_field_ignored line it would have made
    wait_until(
        lambda: any(x.get("request_id") == again for x in read_log(log_file)), "request logged"
    )
    fields = [(x["endpoint"], x["field"]) for x in logged()]
    assert len(fields) == len(set(fields)) == len(named) + 1
    assert ("/v1/chat/completions", "frobnicate") in fields


def test_strict_fields_refuses_unknown_fields(served: Server) -> None:
    served.settings.server.strict_fields = True
    try:
        r = httpx.post(served.url + "/v1/chat/completions", json=_chat(frobnicate=1))
        err = assert_error(r, 400, "unsupported_parameter")
        assert err["param"] == "frobnicate" and "frobnicate" in err["message"]
        body = {"messages": [{"role": "user", "content": "x", "id": "m1"}], "max_tokens": 2}
        err = assert_error(httpx.post(served.url + "/v1/chat/completions", json=body), 400)
        assert err["param"] == "messages[].id"
        ok = _chat(user="u1", metadata={"k": "v"}, store=False, frequency_penalty=0)
        assert httpx.post(served.url + "/v1/chat/completions", json=ok).status_code == 200
    finally:
        served.settings.server.strict_fields = False


def test_sampling_controls_reach_the_engine(served: Server) -> None:
    """The penalties, logit bias and min_p a client sends shape the answer as the engine's
    own processors do (their losslessness is tested in tests/core)."""
    tokens = chat_tokens(served, LONG_PROMPT)
    controls = {
        "frequency_penalty": 1.0,
        "presence_penalty": 0.5,
        "logit_bias": {"50": 4.0},
    }
    extra = {"repetition_penalty": 1.3, "repetition_context_size": 12, "min_p": 0.1}
    out = client(served).chat.completions.create(
        model="specd",
        messages=[{"role": "user", "content": LONG_PROMPT}],
        max_tokens=24,
        temperature=0,
        extra_body=extra,
        **controls,  # type: ignore[arg-type]
    )
    params = SamplingParams(
        max_tokens=24,
        frequency_penalty=1.0,
        presence_penalty=0.5,
        logit_bias={50: 4.0},
        repetition_penalty=1.3,
        repetition_context_size=12,
        min_p=0.1,
    )
    ref = reference(served, tokens, params)
    plain = reference(served, tokens, SamplingParams(max_tokens=24))
    assert out.choices[0].message.content == ref.text != plain.text


def _target_only_logprobs(srv: Server, prompt: list[int], output: list[int]) -> np.ndarray:
    """The target's log-probabilities after ``prompt`` and each output token, by one plain
    forward over the whole sequence (on the worker thread), over the vocabulary served."""

    def forward() -> np.ndarray:
        seq = prompt + output
        logits = srv.pair.target(mx.array(seq)[None])[0, len(prompt) - 1 : len(seq) - 1]
        logits = logits[:, : srv.engine.shared_vocab()].astype(mx.float32)
        return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    return srv.worker.call_between_requests(forward).result(HANG_GUARD_S)


def test_logprobs_equal_a_target_only_computation(served: Server) -> None:
    tokens = chat_tokens(served, LONG_PROMPT)
    out = client(served).chat.completions.create(
        model="specd",
        messages=[{"role": "user", "content": LONG_PROMPT}],
        max_tokens=16,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
    )
    ref = reference(served, tokens, SamplingParams(max_tokens=16))
    assert out.usage is not None and out.usage.model_extra["speculative"]["accepted"] > 0
    content = out.choices[0].logprobs.content
    rows = _target_only_logprobs(served, tokens, ref.tokens)
    decode = served.pair.tokenizer.decode
    assert len(content) == len(ref.tokens) == 16
    assert "".join(e.token for e in content) == out.choices[0].message.content
    for i, entry in enumerate(content):
        assert entry.token == decode([ref.tokens[i]])
        assert entry.logprob == pytest.approx(float(rows[i, ref.tokens[i]]), abs=1e-3)
        top = np.argsort(-rows[i])[:5]
        assert [e.token for e in entry.top_logprobs] == [decode([int(t)]) for t in top]
        values = [e.logprob for e in entry.top_logprobs]
        assert values == pytest.approx(rows[i, top].tolist(), abs=1e-3)
    # without logprobs: none
    plain = client(served).chat.completions.create(
        model="specd", messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=4
    )
    assert plain.choices[0].logprobs is None


def test_streamed_completion_logprobs(served: Server) -> None:
    stream = client(served).completions.create(
        model="specd", prompt=LONG_PROMPT, max_tokens=12, logprobs=3, stream=True
    )
    tokens, values, offsets, text = [], [], [], ""
    for chunk in stream:
        choice = chunk.choices[0]
        text += choice.text
        if choice.logprobs is not None:
            tokens += choice.logprobs.tokens
            values += choice.logprobs.token_logprobs
            offsets += choice.logprobs.text_offset
            # (tokens that decode alike share a key, as in OpenAI's shape)
            assert all(1 <= len(top) <= 3 for top in choice.logprobs.top_logprobs)
    assert "".join(tokens) == text and len(tokens) == 12
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(12)]
    assert all(v <= 0 for v in values)


def test_max_tokens_beyond_the_limit_is_answered_up_to_it(served: Server) -> None:
    """server.max_tokens_limit (256 here) is a cap, not an error; so is the context."""
    limit = served.settings.server.max_tokens_limit
    for field in ("max_tokens", "max_completion_tokens"):
        r = httpx.post(
            f"{served.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": LONG_PROMPT}], field: 32000},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] <= limit
        if body["usage"]["completion_tokens"] == limit:
            assert body["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("endpoint", "body", "status", "code"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors(
    served: Server, endpoint: str, body: Any, status: int, code: str | None
) -> None:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    if isinstance(body, bytes):
        r = httpx.post(
            served.url + path, content=body, headers={"content-type": "application/json"}
        )
    else:
        r = httpx.post(served.url + path, json={k: v for k, v in body.items() if v is not None})
    assert_error(r, status, code)


def test_json_body_is_read_whatever_the_content_type(served: Server) -> None:
    """``curl -d '{...}'`` sends application/x-www-form-urlencoded: still JSON to us."""
    body = json.dumps({"prompt": "x", "max_tokens": 2}).encode()
    for ctype in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {"content-type": ctype} if ctype else {}
        r = httpx.post(f"{served.url}/v1/completions", content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2


def test_other_http_errors(served: Server) -> None:
    url = served.url
    big = b'{"prompt": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'
    assert_error(httpx.post(f"{url}/v1/completions", content=big), 413, "request_too_large")
    assert_error(httpx.get(f"{url}/v1/chat/completions"), 405)
    assert_error(httpx.get(f"{url}/nope"), 404)
    # a long prompt text: the tokenizer result is checked against the context
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "the cat " * 400, "max_tokens": 1})
    assert_error(r, 400, "context_length_exceeded")
    with pytest.raises(openai.NotFoundError):
        client(served).chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )


def test_api_key(served: Server) -> None:
    url = served.url
    served.settings.server.api_key = SecretStr("sekrit")
    try:
        for path in ("/v1/models", "/status", "/metrics", "/openapi.json"):
            assert_error(httpx.get(url + path), 401, "invalid_api_key")
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"})
        assert_error(r, 401, "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
        bad = {"Authorization": "Bearer wrong"}
        assert_error(httpx.get(f"{url}/v1/models", headers=bad), 401, "invalid_api_key")
        basic = {"Authorization": "Basic c2Vrcml0"}
        assert_error(httpx.get(f"{url}/v1/models", headers=basic), 401)
        assert httpx.get(f"{url}/health").status_code == 200  # liveness needs no key
        good = {"Authorization": "Bearer sekrit"}
        assert httpx.get(f"{url}/status", headers=good).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            client(served).models.list()
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0)
        resp = c.chat.completions.create(
            model="specd", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert resp.usage.completion_tokens <= 3
    finally:
        served.settings.server.api_key = None


# --------------------------------------------------------------------------------------------
# Queueing, cancellation


def test_queue_full_gets_429(served: Server) -> None:
    worker = served.worker
    old = worker.queue_size
    gate = block_worker(served)
    worker.queue_size = 1
    out: dict[str, httpx.Response] = {}
    t = threading.Thread(
        target=lambda: out.setdefault(
            "r",
            httpx.post(
                f"{served.url}/v1/completions",
                json={"prompt": "x", "max_tokens": 3},
                timeout=HANG_GUARD_S,
            ),
        )
    )
    try:
        t.start()
        wait_until(lambda: worker.queue_depth == 1, "queued request")
        r = httpx.post(f"{served.url}/v1/completions", json={"prompt": "y", "max_tokens": 3})
        assert_error(r, 429, "queue_full")
        assert int(r.headers["retry-after"]) >= 1
        with pytest.raises(openai.RateLimitError):
            client(served).completions.create(model="specd", prompt="z", max_tokens=3)
        st = httpx.get(f"{served.url}/status").json()
        assert st["queue"]["depth"] == 1 and st["queue"]["in_flight"] == 1
        assert scrape(served)["specd_queue_depth"] == 1
    finally:
        gate.set()
        worker.queue_size = old
        t.join(HANG_GUARD_S)
    assert out["r"].status_code == 200


def test_client_disconnect_mid_stream_frees_the_worker(served: Server, finished: Finished) -> None:
    body = {"prompt": LONG_PROMPT, "max_tokens": 256, "stream": True}
    with httpx.Client(base_url=served.url, timeout=HANG_GUARD_S) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            rid = json.loads(first[6:])["id"]
    result = finished.wait(rid)
    assert result.finish_reason == "cancelled"
    assert 0 < result.stats.generation_tokens < 256
    # The worker is free again: the next request is served (the cancelled one stopped early).
    r = httpx.post(f"{served.url}/v1/completions", json={"prompt": "x", "max_tokens": 5})
    assert r.status_code == 200
    wait_until(lambda: served.app_state.in_flight == 0, "in-flight count back to 0")


def test_client_disconnect_while_queued_never_runs(served: Server, finished: Finished) -> None:
    closed = 'specd_requests_total{endpoint="/v1/completions",status="499"}'
    given_up = scrape(served).get(closed, 0.0)
    gate = block_worker(served)
    # The worker is now inside our gate, so earlier tests' requests have all run their hooks:
    # from here on, only this test's requests can be recorded.
    with finished.cond:
        finished.records.clear()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{served.url}/v1/completions",
                json={"prompt": LONG_PROMPT, "max_tokens": 200},
                timeout=0.5,
            )
        # the server notices the closed connection while the request waits in the queue (the
        # 499 is counted once the handler gave up; in_flight alone can be 0 before it arrives)
        wait_until(
            lambda: (
                scrape(served).get(closed, 0.0) == given_up + 1 and served.app_state.in_flight == 0
            ),
            what="request given up",
        )
    finally:
        gate.set()
    r = httpx.post(f"{served.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200
    rid = r.json()["id"]
    finished.wait(rid)
    assert len(finished.records) == 1  # the abandoned request never generated


# --------------------------------------------------------------------------------------------
# OpenAPI: accurate and fuzzed


def test_openapi_document(served: Server) -> None:
    doc = httpx.get(f"{served.url}/openapi.json").json()
    paths = doc["paths"]
    for p in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/status"):
        assert p in paths
    chat = paths["/v1/chat/completions"]["post"]
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert {"400", "401", "404", "413", "429", "503"} <= chat["responses"].keys()
    schemas = doc["components"]["schemas"]
    assert "speculative" in schemas["Usage"]["properties"]
    assert "HTTPBearer" in doc["components"]["securitySchemes"]


def fuzz_api(served: Server, max_examples: int, api_key: str | None = None) -> dict[str, Any]:
    """Schemathesis over every operation of /openapi.json, positive and negative cases.

    Checks: no 5xx, status codes / content types / bodies as documented, schema-violating
    requests rejected (``negative_data_rejection``); with ``api_key`` set on the server, every
    case carries the key and ``ignored_auth`` also sends it without and with a wrong key, which
    must be refused. Returns the status codes seen per operation.
    """
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hsettings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        ignored_auth,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json", headers=headers)
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        negative_data_rejection,
    ]
    if api_key:
        checks.append(ignored_auth)
    server_settings = served.app_state.settings.server
    limit, key = server_settings.max_tokens_limit, server_settings.api_key
    server_settings.max_tokens_limit = 32  # keep generated requests cheap
    server_settings.api_key = SecretStr(api_key) if api_key else None
    statuses: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)

    def fuzz_operation(op: Any) -> None:
        tally = statuses[f"{op.method.upper()} {op.path}"]

        @given(case=st.one_of(*(op.as_strategy(generation_mode=m) for m in modes)))
        @hsettings(
            max_examples=max_examples,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: Any) -> None:
            r = case.call_and_validate(
                base_url=served.url, checks=checks, headers=headers, timeout=HANG_GUARD_S
            )
            tally[r.status_code] += 1

        fuzz()

    try:
        for result in schema.get_all_operations():
            fuzz_operation(result.ok())
    finally:
        server_settings.max_tokens_limit, server_settings.api_key = limit, key
    return statuses


def _generation_statuses(statuses: dict[str, Any]) -> collections.Counter[int]:
    return sum(
        (statuses[p] for p in ("POST /v1/chat/completions", "POST /v1/completions")),
        collections.Counter(),
    )


@pytest.mark.parametrize(
    ("api_key", "examples"),
    # with a key the point is that every operation refuses a missing or wrong one: fewer
    # examples than the open server's search for a 5xx
    [(None, 150), ("fuzz-key", 50)],
)
def test_schemathesis_finds_no_server_error(
    served: Server, api_key: str | None, examples: int
) -> None:
    statuses = fuzz_api(served, max_examples=examples, api_key=api_key)
    assert len(statuses) >= 7
    # both accepted and rejected requests were generated for the generation endpoints (with
    # a key: it was accepted)
    generation = _generation_statuses(statuses)
    assert generation[200] > 0 and generation[400] > 0, statuses


# --------------------------------------------------------------------------------------------
# Shutdown


def test_graceful_shutdown_finishes_in_flight_stream(tmp_path: Path, pair: ModelPair) -> None:
    srv, thread = start_server(tmp_path / "data", pair)
    url = srv.url
    runtime = srv.settings.runtime_file
    assert runtime.exists()
    gate = block_worker(srv)
    lines: list[str] = []
    status: list[int] = []

    def consume() -> None:
        body = {"prompt": LONG_PROMPT, "max_tokens": 20, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=HANG_GUARD_S) as r:
            status.append(r.status_code)
            lines.extend(r.iter_lines())

    t = threading.Thread(target=consume)
    try:
        t.start()
        wait_until(lambda: srv.worker.queue_depth == 1, "queued stream")
        srv.handle_exit(signal.SIGTERM, None)
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 503, "draining")
        assert httpx.get(f"{url}/health").json() == {"status": "shutting_down"}
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert_error(r, 503, "shutting_down")
    finally:
        gate.set()
    t.join(HANG_GUARD_S)
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive() and srv.exit_code == 0
    assert status == [200]
    events = sse_events(lines)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert not runtime.exists()


# --------------------------------------------------------------------------------------------
# `specd serve` as a process


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path / "tiny", ["a", "b", "c"], vocab_size=40, seed=3)


def test_serve_process_http_runtime_file_and_sigterm_drain(tmp_path: Path, tiny_dir: Path) -> None:
    config = {
        "models": {"target": str(tiny_dir), "draft_layers": [0, 5]},
        "server": {"port": 0, "shutdown_timeout": 60},
    }
    proc = start_daemon(tmp_path, config)
    log_file = tmp_path / "data" / "logs" / "specd.log"
    runtime = tmp_path / "data" / "runtime.json"
    try:
        ready = wait_for_event(log_file, "ready", proc)
        port = ready["port"]
        assert port > 0
        info = json.loads(runtime.read_text())
        assert info["port"] == port and info["pid"] == proc.pid
        assert stat.S_IMODE(runtime.stat().st_mode) == 0o600
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        resp = c.completions.create(model=str(tiny_dir), prompt="a b c", max_tokens=5)
        assert resp.usage.completion_tokens == 5

        lines: list[str] = []
        started = threading.Event()

        def consume() -> None:
            body = {
                "prompt": "a b c",
                "max_tokens": 1000,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            with httpx.stream(
                "POST", f"{url}/v1/completions", json=body, timeout=HANG_GUARD_S
            ) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    started.set()

        t = threading.Thread(target=consume)
        t.start()
        assert started.wait(HANG_GUARD_S)
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 503, "draining")
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert_error(r, 503, "shutting_down")
        t.join(HANG_GUARD_S)
        assert proc.wait(timeout=HANG_GUARD_S) == 0
    finally:
        proc.kill()
        proc.wait()
    events = sse_events(lines)
    assert events[-1] == "[DONE]"
    assert events[-1 - 1]["usage"]["completion_tokens"] == 1000  # the stream ran to the end
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert not runtime.exists()
    records = read_log(log_file)
    finished_logs = [r for r in records if r["event"] == "request_finished"]
    assert any(r["completion_tokens"] == 1000 and r["status"] == 200 for r in finished_logs)
    assert all(r["component"] == "api" for r in finished_logs)
    assert [r["event"] for r in records][-1] == "stopped"


def test_serve_refuses_public_bind_without_key(tmp_path: Path, tiny_dir: Path) -> None:
    config = {"models": {"target": str(tiny_dir)}, "server": {"host": "0.0.0.0", "port": 0}}
    proc = start_daemon(tmp_path, config)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 1
    assert "api_key" in err and "0.0.0.0" in err
    assert not (tmp_path / "data" / "runtime.json").exists()
    assert not any(
        r["event"] == "models_loaded" for r in read_log(tmp_path / "data" / "logs" / "specd.log")
    )


def test_sse_event_format(served: Server) -> None:
    """Raw wire format: 'data: {json}' events separated by blank lines, ending with [DONE]."""
    r = httpx.post(
        f"{served.url}/v1/chat/completions",
        json={**_chat(max_tokens=5), "stream": True},
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    blocks = r.text.split("\n\n")
    assert blocks[-1] == ""
    assert all(re.fullmatch(r"data: .+", b) for b in blocks[:-1])
    assert blocks[-2] == "data: [DONE]"


# --------------------------------------------------------------------------------------------
# bench serve


def test_bench_serve_against_the_daemon(served: Server) -> None:
    from daemon.bench.serve import bench_direct, bench_serve

    prompts = [[{"role": "user", "content": f"Prompt {i}: hello world"}] for i in range(4)]
    direct = served.worker.call_between_requests(
        lambda: bench_direct(served.engine, served.pair.tokenizer, prompts, 12)
    ).result(HANG_GUARD_S)
    assert direct["requests"] == 4 and direct["tokens_per_s"] > 0
    out = bench_serve(served.url + "/v1", None, prompts, clients=3, max_tokens=12, direct=direct)
    assert out["errors"] == 0, out["error_samples"]
    assert out["completed"] == out["requests"] == 4
    assert out["tokens"] == direct["tokens"]  # greedy: the same outputs
    assert out["total_tokens_per_s"] > 0
    assert 0 < out["ttft_s"]["p50"] <= out["ttft_s"]["p95"] <= out["latency_s"]["max"]
    assert out["per_client_tokens_per_s"]["mean"] > 0
    assert out["overhead"]["throughput_ratio"] > 0

    served.settings.server.api_key = SecretStr("k")
    try:
        bad = bench_serve(served.url, None, prompts[:1], 1, 4, warmup=False)
        assert bad["errors"] == 1 and "401" in bad["error_samples"][0]
        good = bench_serve(served.url, "k", prompts[:1], 1, 4, warmup=False)
        assert good["errors"] == 0
    finally:
        served.settings.server.api_key = None


def test_bench_serve_client_counts_side_by_side(served: Server) -> None:
    from daemon.bench.serve import bench_scaling

    prompts = [[{"role": "user", "content": f"Prompt {i}: the cat sat"}] for i in range(4)]
    out = bench_scaling(served.url, None, prompts, [1, 3], 10)
    one, three = out["clients_1"], out["clients_3"]
    assert one["errors"] == three["errors"] == 0
    assert one["requests"] == 4 and three["requests"] == 6
    assert one["batched_share"] == 0  # one client at a time: always speculative, alone
    assert three["batched_share"] > 0  # three at once: decoded together
    assert out["scaling"]["clients_1"]["total_tokens_per_s_ratio"] == 1.0
    assert out["scaling"]["clients_3"]["ttft_p50_ratio"] > 0


def test_conversations_reuse_the_prompt_cache(served: Server, tmp_path: Path) -> None:
    """Each turn resends the history: from the second turn on, most of the prompt comes from
    the prompt cache (usage, /metrics, /status), and bench serve --conversations reports it."""
    from daemon.bench.serve import bench_conversations
    from daemon.core.prompts import read_conversations

    conv = tmp_path / "conv.jsonl"
    conv.write_text(
        json.dumps({"turns": ["hello world", "the cat sat", "and then?"]})
        + "\n\n"
        + json.dumps({"turns": ["the dog", "hello"]})
        + "\n"
    )
    conversations = read_conversations(conv)
    assert conversations == [["hello world", "the cat sat", "and then?"], ["the dog", "hello"]]
    out = bench_conversations({"a": served.url, "b": served.url + "/v1"}, conversations, 8)
    assert out["errors"] == [] and out["identical"] is True
    assert out["a_turn1"]["requests"] == 2 and out["a_turn3"]["requests"] == 1
    assert out["a_turn3"]["cached_tokens"] > 0.5 * out["a_turn3"]["prompt_tokens"]
    # the same prompt once more: nearly all of it cached, as usage says
    msgs = [{"role": "user", "content": "hello world"}]
    r1 = httpx.post(f"{served.url}/v1/chat/completions", json={"messages": msgs, "max_tokens": 3})
    r2 = httpx.post(f"{served.url}/v1/chat/completions", json={"messages": msgs, "max_tokens": 3})
    u1, u2 = r1.json()["usage"], r2.json()["usage"]
    # all but the last prompt token (the first round scores it), less the one token mlx-lm's
    # cache lookup leaves to process when the cached sequence runs past the prompt
    assert u2["prompt_tokens_details"]["cached_tokens"] == u2["prompt_tokens"] - 2
    assert r1.json()["choices"] == r2.json()["choices"]
    metrics = httpx.get(f"{served.url}/metrics").text
    assert 'specd_prompt_cache_lookups_total{result="hit"}' in metrics
    assert "specd_prompt_cache_cached_tokens_total" in metrics
    status = httpx.get(f"{served.url}/status").json()["prompt_cache"]
    assert status["hits"] >= 3 and status["bytes"] > 0 and u1["prompt_tokens"] > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": "hi"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_conversations(bad)


def test_a_queued_stream_gets_headers_and_keep_alives(
    served: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream waiting behind another request starts at once and sends SSE comments until
    its first token, then the usual events."""
    from daemon.serving.api import streaming

    monkeypatch.setattr(streaming, "KEEPALIVE_S", 0.1)
    monkeypatch.setattr(streaming, "FIRST_EVENT_WAIT_S", 0.1)
    gate = block_worker(served)
    lines: list[str] = []
    got_headers = threading.Event()

    def client() -> None:
        body = {"prompt": "hello world", "max_tokens": 4, "stream": True}
        with httpx.stream("POST", f"{served.url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            got_headers.set()
            lines.extend(r.iter_lines())

    t = threading.Thread(target=client)
    t.start()
    try:
        assert got_headers.wait(HANG_GUARD_S)  # headers while the worker is still blocked
        # a keep-alive comment arrives while the worker is still blocked
        wait_until(lambda: any(x.startswith(":") for x in lines), "a keep-alive comment")
    finally:
        gate.set()
    t.join(HANG_GUARD_S)
    keepalives = [x for x in lines if x.startswith(":")]
    assert keepalives, lines
    events = sse_events(lines)
    assert events[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in events[:-1])


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_is_followed(served: Server, stream: bool) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "word": {"enum": ["the", "cat", "hello"]}},
        "required": ["ok", "word"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    for content in ("hello world", "the cat sat", "x"):
        body = _chat(max_tokens=40, response_format=fmt, stream=stream)
        body["messages"][0]["content"] = content
        r = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=HANG_GUARD_S)
        assert r.status_code == 200, r.text
        if stream:
            events = [e for e in sse_events(r.text.splitlines()) if e != "[DONE]"]
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        else:
            text = r.json()["choices"][0]["message"]["content"]
        value = json.loads(text)
        assert set(value) == {"ok", "word"} and value["word"] in ("the", "cat", "hello")
    r = httpx.post(
        f"{served.url}/v1/completions",
        json={"prompt": "hello", "max_tokens": 30, "response_format": {"type": "json_object"}},
    )
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert r.json()["choices"][0]["finish_reason"] == "length" or isinstance(json.loads(text), dict)
    err = assert_error(
        httpx.post(
            f"{served.url}/v1/chat/completions",
            json=_chat(
                response_format={"type": "json_schema", "json_schema": {"schema": {"type": 5}}}
            ),
        ),
        400,
        "invalid_value",
    )
    assert err["param"] == "response_format.json_schema.schema"


def test_collect_goes_through_the_running_daemon(served: Server) -> None:
    from daemon.core.prompts import PromptItem
    from daemon.ops.collect import collect

    buf = served.service.buffer
    served.service.writer.flush(HANG_GUARD_S)
    before = buf.count()
    items = [PromptItem([{"role": "user", "content": t}]) for t in ("Hello world", "the cat")]
    summary = collect(served.settings, items, max_tokens=6, progress=False)
    assert summary.mode == f"daemon {served.url}"
    assert summary.requests == 2 and not summary.errors
    assert summary.drafted > 0
    served.service.writer.flush(HANG_GUARD_S)
    records = list(buf.iter_records())[before:]
    assert [r.prompt_text for r in records] == ["Hello world", "the cat"]
    assert summary.pending_failures is not None


def test_a_request_that_hears_nothing_times_out(served: Server) -> None:
    """server.request_timeout_seconds: the last line of defence against a hang. The worker is
    held busy (a job between requests) longer than the limit: the request ends with a 504,
    or with an error event when streamed, and is cancelled; the server goes on."""
    settings = served.settings.server
    old = settings.request_timeout_seconds
    settings.request_timeout_seconds = 0.5
    release = threading.Event()
    try:
        served.worker.call_between_requests(lambda: release.wait(HANG_GUARD_S))
        r = httpx.post(f"{served.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert_error(r, 504, "request_timeout")
        with httpx.stream(
            "POST",
            f"{served.url}/v1/completions",
            json={"prompt": "x", "max_tokens": 2, "stream": True},
        ) as s:
            events = sse_events(list(s.iter_lines()))
        assert events[-1] == "[DONE]" and "error" in events[-2]
    finally:
        release.set()
        settings.request_timeout_seconds = old
    wait_until(lambda: served.app_state.in_flight == 0, "requests ended")
    r = httpx.post(f"{served.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200
