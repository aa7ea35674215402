"""The HTTP app's seams without models: a fake worker, tokenizer and admin behind `create_app`.

tests/serving/test_api.py drives the real server; these pin what the package split exposes:
the `AdminControl` protocol (409 without one), the gate's endpoint labels and refusals, the
429 ``Retry-After`` estimate, and the `RequestInfo` the gate counts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from daemon.config import Settings
from daemon.core.engine import GenerationChunk, GenerationResult
from daemon.core.records import GenerationStats
from daemon.errors import AdapterError, AdapterNotFoundError
from daemon.serving.api import MAX_BODY_BYTES, AdminControl, AppState, create_app
from daemon.serving.api.gate import endpoint_label
from daemon.serving.metrics import SpecdMetrics
from daemon.serving.requests import Done, QueueFullError, RequestHandle
from daemon.store.adapters import AdapterListing, Rollback, VersionSummary


class FakeTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) % 100 + 1 for c in text]

    def decode(self, tokens: list[int]) -> str:
        return "".join(chr(96 + t % 26) for t in tokens)


class FakeWorker:
    """Answers every request at once with ``text``, or refuses it with ``refuse``."""

    def __init__(self) -> None:
        self.queue_depth = 0
        self.queue_size = 16
        self.active = None
        self.batched = 0
        self.batch_size = 8
        self.loaded = True
        self.refuse: Exception | None = None
        self.text = "hi there"
        self.submitted: list[RequestHandle] = []

    def submit(self, handle: RequestHandle) -> RequestHandle:
        if self.refuse is not None:
            raise self.refuse
        self.submitted.append(handle)
        stats = GenerationStats(
            prompt_tokens=len(handle.request.prompt_tokens),
            generation_tokens=2,
            drafted=4,
            accepted=3,
            num_drafts=2,
        )
        result = GenerationResult(text=self.text, tokens=[1, 2], finish_reason="stop", stats=stats)
        handle.emit(GenerationChunk(self.text, [1, 2]))
        handle.emit(Done(result))
        return handle


class FakeAdmin:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def list_adapters(self) -> AdapterListing:
        v1 = VersionSummary(1, "installed", None, None, None, 0.5, 1.25)
        return AdapterListing(current=1, versions=[v1])

    def rollback(self, version: int | None = None) -> Rollback:
        self.calls.append(("rollback", version))
        if version == 7:
            raise AdapterNotFoundError("no adapter version 7 in /data/adapters")
        if version == 2:
            raise AdapterError("adapter 2 does not fit the draft")
        return Rollback(previous_version=1, adapter_version=version or 0)

    def train_now(self, epochs: int | None = None, max_steps: int | None = None) -> str:
        self.calls.append(("train", (epochs, max_steps)))
        if epochs == 9:
            raise RuntimeError("training run r1 is already running")
        return "r2"


def make_state(admin: AdminControl | None = None, **server: Any) -> AppState:
    return AppState(
        settings=Settings(server=server),
        worker=FakeWorker(),
        tokenizer=FakeTokenizer(),
        metrics=SpecdMetrics(),
        model_id="tiny-target",
        max_context=512,
        admin=admin,
    )


@pytest.fixture
def state() -> AppState:
    return make_state(FakeAdmin())


@pytest.fixture
def client(state: AppState) -> Iterator[TestClient]:
    with TestClient(create_app(state)) as c:
        yield c


def error_code(r: Any, status: int) -> str:
    assert r.status_code == status, r.text
    return r.json()["error"]["code"]


def requests_counted(state: AppState, endpoint: str, status: int) -> float:
    value = state.metrics.registry.get_sample_value(
        "specd_requests_total", {"endpoint": endpoint, "status": str(status)}
    )
    return value or 0.0


def test_admin_routes_answer_409_without_an_admin() -> None:
    with TestClient(create_app(make_state(admin=None))) as c:
        assert error_code(c.get("/admin/adapters"), 409) == "adaptation_disabled"
        assert error_code(c.post("/admin/adapters/rollback", json={}), 409) == "adaptation_disabled"
        assert error_code(c.post("/admin/train"), 409) == "adaptation_disabled"


def test_admin_routes_go_through_the_protocol(client: TestClient, state: AppState) -> None:
    assert client.get("/admin/adapters").json() == {
        "current": 1,
        "versions": [
            {
                "version": 1,
                "status": "installed",
                "created": None,
                "parent": None,
                "gate": None,
                "heldout_agreement": 0.5,
                "expected_speedup": 1.25,
            }
        ],
    }
    ok = client.post("/admin/adapters/rollback", json={"version": 3})
    assert ok.json() == {"previous_version": 1, "adapter_version": 3}
    assert client.post("/admin/adapters/rollback").status_code == 200  # no body: default
    assert error_code(client.post("/admin/adapters/rollback", json={"version": 7}), 404) == (
        "adapter_error"
    )
    assert error_code(client.post("/admin/adapters/rollback", json={"version": 2}), 409) == (
        "adapter_error"
    )
    assert client.post("/admin/train", json={"max_steps": 5}).json() == {"run_id": "r2"}
    assert error_code(client.post("/admin/train", json={"epochs": 9}), 409) == "training_running"
    assert error_code(client.post("/admin/train", json={"bogus": 1}), 400) == (
        "unsupported_parameter"
    )
    admin = state.admin
    assert isinstance(admin, FakeAdmin)
    assert admin.calls == [
        ("rollback", 3),
        ("rollback", None),
        ("rollback", 7),
        ("rollback", 2),
        ("train", (None, 5)),
        ("train", (9, None)),
    ]


def test_endpoint_labels_are_bounded() -> None:
    assert endpoint_label("/v1/completions") == "/v1/completions"
    assert endpoint_label("/v1/models/a/b") == "/v1/models/{model}"
    assert endpoint_label("/admin/train") == "/admin/train"
    assert endpoint_label("/wp-login.php") == "other"


def test_gate_refusals_and_request_counting(client: TestClient, state: AppState) -> None:
    assert error_code(client.get("/nope"), 404) == "not_found"
    assert requests_counted(state, "other", 404) == 1
    big = b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
    assert error_code(client.post("/v1/completions", content=big), 413) == "request_too_large"
    assert requests_counted(state, "/v1/completions", 413) == 1
    state.accepting = False
    r = client.post("/v1/completions", json={"prompt": "hello"})
    assert error_code(r, 503) == "shutting_down"
    assert client.get("/health").status_code == 503
    assert state.in_flight == 0


def test_api_key_is_required_except_for_health() -> None:
    state = make_state(api_key=SecretStr("sekrit"))
    with TestClient(create_app(state)) as c:
        r = c.get("/status")
        assert error_code(r, 401) == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/health").status_code == 200
        assert c.get("/status", headers={"Authorization": "Bearer sekrit"}).status_code == 200


def test_queue_full_answers_429_with_retry_after(client: TestClient, state: AppState) -> None:
    worker = state.worker
    assert isinstance(worker, FakeWorker)
    state.metrics.observe_request("/v1/completions", 200, duration=2.5)
    worker.queue_depth = 2
    worker.refuse = QueueFullError("request queue is full (16 waiting)")
    r = client.post("/v1/completions", json={"prompt": "hello"})
    assert error_code(r, 429) == "queue_full"
    assert r.headers["retry-after"] == "5"  # ceil(mean 2.5 s x depth 2)
    assert state.in_flight == 0


def test_generation_through_the_run(client: TestClient, state: AppState) -> None:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    message = body["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": "hi there",
        "reasoning_content": None,
        "tool_calls": None,
    }
    assert body["usage"]["speculative"]["acceptance_rate"] == 0.75
    worker = state.worker
    assert isinstance(worker, FakeWorker)
    assert worker.submitted[-1].request.prompt_text == "hi"

    with client.stream("POST", "/v1/completions", json={"prompt": [5, 6], "stream": True}) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "hi there"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert requests_counted(state, "/v1/completions", 200) == 1
    count = state.metrics.registry.get_sample_value(
        "specd_time_to_first_token_seconds_count", {"endpoint": "/v1/completions"}
    )
    assert count == 1  # the run's RequestInfo reached the gate


def test_cors_is_off_unless_origins_are_configured() -> None:
    preflight = {
        "Origin": "http://localhost:3000",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    with TestClient(create_app(make_state())) as c:
        r = c.get("/health", headers={"Origin": "http://localhost:3000"})
        assert "access-control-allow-origin" not in r.headers
    state = make_state(cors_origins=["http://localhost:3000"], api_key="k")
    with TestClient(create_app(state)) as c:
        r = c.options("/v1/chat/completions", headers=preflight)  # no key: a preflight has none
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = c.get("/v1/models", headers={"Origin": "http://localhost:3000"})
        assert r.status_code == 401  # errors reach the browser with the header too
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = c.get("/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
