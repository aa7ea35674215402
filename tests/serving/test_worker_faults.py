"""Fault injection on a real tiny-model worker: whatever raises (a hand-over into the batch, a
hand-back out of it, a batch step, a lone step, the start of a generation), every request in
flight gets its answer or an error within a bounded time, and the next request is served.

Each fault is raised once, by patching the method on its class (the worker replaces its batch
decoder after a failure), on the paths the worker takes between a lone request and a batch.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from daemon.core.batch import BatchDecoder
from daemon.core.engine import GenerationResult, SpeculativeEngine
from daemon.serving.requests import BlockingHandle, Done
from tests.core.test_engine import make_prompts
from tests.serving.test_worker import engine, make_worker, submit  # noqa: F401 (a fixture)

# Longer than any request here takes; a request left without its final event fails the test
# after this long instead of hanging the run.
ANSWER_WITHIN_S = 60.0


class Boom(RuntimeError):
    pass


def once(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, raising `Boom` on its first call."""
    calls = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise Boom("injected")
        return fn(*args, **kwargs)

    return wrapper


def outcome(handle: BlockingHandle) -> GenerationResult | BaseException:
    """The request's result or its error; fails when no final event comes in time."""
    try:
        return handle.result(ANSWER_WITHIN_S)
    except queue.Empty:
        pytest.fail(f"request {handle.request.id} got no answer within {ANSWER_WITHIN_S} s")
    except Exception as e:  # its error event
        return e


def ends(worker: Any, handles: list[BlockingHandle]) -> list[GenerationResult | BaseException]:
    """Every outcome, then: the worker still serves a new request, and holds nobody."""
    outs = [outcome(h) for h in handles]
    prompt = make_prompts(worker.engine.tokenizer, 12)[9]
    fresh = outcome(submit(worker, prompt, max_tokens=4))
    assert isinstance(fresh, GenerationResult), fresh
    assert not worker._running and worker._lone is None and not worker._batched
    return outs


@pytest.fixture
def prompts(engine: SpeculativeEngine) -> list[list[int]]:  # noqa: F811
    return make_prompts(engine.tokenizer, 12)[4:8]


def serve_lone_then_more(worker: Any, prompts: list[list[int]], n_more: int) -> list:
    """One request running alone (speculatively), then ``n_more`` arrive (a hand-over)."""
    first = submit(worker, prompts[0], max_tokens=48)
    events = first.events(ANSWER_WITHIN_S)
    assert not isinstance(next(events), Done)  # it has started, alone
    return [first, *(submit(worker, p, max_tokens=16) for p in prompts[1 : 1 + n_more])]


@pytest.fixture
def worker(engine: SpeculativeEngine) -> Iterator[Any]:  # noqa: F811
    w = make_worker(engine, batch_size=4)
    w.start()
    yield w
    assert w.stop(ANSWER_WITHIN_S)


def test_a_failed_hand_over_ends_the_request(worker, prompts, monkeypatch) -> None:
    monkeypatch.setattr(BatchDecoder, "adopt", once(BatchDecoder.adopt))
    outs = ends(worker, serve_lone_then_more(worker, prompts, 2))
    assert isinstance(outs[0], Boom)  # the one being handed over
    assert all(isinstance(o, (GenerationResult, Boom)) for o in outs[1:])


@pytest.mark.parametrize("where", ["release", "resume"])
def test_a_failed_hand_back_ends_the_request(engine, prompts, monkeypatch, where) -> None:  # noqa: F811
    """A batch down to one member hands it back to the speculative path."""
    if where == "release":
        monkeypatch.setattr(BatchDecoder, "release", once(BatchDecoder.release))
    else:
        monkeypatch.setattr(SpeculativeEngine, "resume", once(SpeculativeEngine.resume))
    fresh = make_worker(engine, batch_size=4)  # queued before it starts: batched together
    short = submit(fresh, prompts[0], max_tokens=3)
    long = submit(fresh, prompts[1], max_tokens=40)
    fresh.start()
    try:
        outs = ends(fresh, [short, long])
    finally:
        assert fresh.stop(ANSWER_WITHIN_S)
    assert isinstance(outs[0], GenerationResult) and isinstance(outs[1], Boom)


def test_a_failed_batch_step_ends_every_member(worker, prompts, monkeypatch) -> None:
    monkeypatch.setattr(BatchDecoder, "step", once(BatchDecoder.step))
    outs = ends(worker, serve_lone_then_more(worker, prompts, 2))
    assert all(isinstance(o, Boom) for o in outs)


def test_a_failed_lone_step_ends_the_request(worker, prompts, monkeypatch) -> None:
    real = SpeculativeEngine.generate

    def failing(self, *args: Any, **kwargs: Any):
        gen = real(self, *args, **kwargs)

        def steps():
            yield next(gen)
            raise Boom("injected mid-answer")

        return steps()

    monkeypatch.setattr(SpeculativeEngine, "generate", once_then(failing, real))
    outs = ends(worker, [submit(worker, prompts[0], max_tokens=24)])
    assert isinstance(outs[0], Boom)


def test_a_generation_that_fails_to_start_ends_the_request(worker, prompts, monkeypatch) -> None:
    monkeypatch.setattr(SpeculativeEngine, "generate", once(SpeculativeEngine.generate))
    outs = ends(worker, [submit(worker, prompts[0], max_tokens=8)])
    assert isinstance(outs[0], Boom)


def test_a_failing_worker_turn_ends_every_started_request(worker, prompts, monkeypatch) -> None:
    """A bug in the loop itself (here: admitting requests): ``worker_failed`` ends what runs."""
    monkeypatch.setattr(type(worker), "_hand_over", once(type(worker)._hand_over))
    outs = ends(worker, serve_lone_then_more(worker, prompts, 1))
    assert isinstance(outs[0], Boom)


def once_then(first: Callable[..., Any], then: Callable[..., Any]) -> Callable[..., Any]:
    calls = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return (first if len(calls) == 1 else then)(*args, **kwargs)

    return wrapper


def test_the_worker_logs_the_api_request_id(worker, prompts, monkeypatch) -> None:
    """A request that came by HTTP is followed through the worker's log lines by the API's
    id (``chatcmpl-...``), not the worker's counter."""
    from structlog.testing import capture_logs

    from daemon.core.engine import SamplingParams
    from daemon.serving.requests import GenerationRequest

    monkeypatch.setattr(SpeculativeEngine, "generate", once(SpeculativeEngine.generate))
    request = GenerationRequest(
        list(prompts[0]), SamplingParams(max_tokens=4), meta={"id": "chatcmpl-abc"}
    )
    handle = BlockingHandle(request)
    with capture_logs() as logs:
        worker.submit(handle)
        assert isinstance(outcome(handle), Boom)
    failed = [e for e in logs if e["event"] == "generation_failed"]
    assert failed and failed[0]["request_id"] == "chatcmpl-abc"


def test_a_failed_adapter_version_lookup_ends_the_request(engine, prompts) -> None:  # noqa: F811
    """Fixing a request's adapter version at its start raises (an unknown model, a bug): that
    request gets the error, the next is served."""
    look = once(lambda model: 0)
    fresh = make_worker(engine, batch_size=4, adapter_version=look)
    fresh.start()
    try:
        outs = ends(fresh, [submit(fresh, prompts[0], max_tokens=8)])
    finally:
        assert fresh.stop(ANSWER_WITHIN_S)
    assert isinstance(outs[0], Boom)


def test_a_model_that_fails_to_load_ends_its_request_only(engine, prompts) -> None:  # noqa: F811
    """Switching to another model raises (its files are bad): its request gets the error; a
    request for the model in service before and after it is served."""
    from daemon.core.engine import SamplingParams
    from daemon.serving.requests import GenerationRequest

    def switch(name: str) -> SpeculativeEngine:
        if name == "broken":
            raise Boom("cannot load")
        return engine

    fresh = make_worker(engine, batch_size=4, switch=switch, model="main")
    first = submit(fresh, prompts[0], max_tokens=6)
    broken = BlockingHandle(
        GenerationRequest(list(prompts[1]), SamplingParams(max_tokens=6), model="broken")
    )
    fresh.submit(broken)
    fresh.start()
    try:
        outs = ends(fresh, [first, broken])
    finally:
        assert fresh.stop(ANSWER_WITHIN_S)
    assert isinstance(outs[0], GenerationResult) and isinstance(outs[1], Boom)
    assert fresh.model == "main"
