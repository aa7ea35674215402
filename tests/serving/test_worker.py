"""The generation worker: a lone request is speculative, concurrent ones are batched.

Batched greedy output must still be the target's own (token for token), a request running
speculatively hands over to the batch mid-answer without a change in its output, and the
per-request machinery (stop strings, max_tokens, grammars, cancel, seeds, abort) works inside
a batch.
"""

from __future__ import annotations

import itertools
import json
import threading

import pytest

from daemon.core.constraints import Constraint
from daemon.core.engine import (
    GenerationChunk,
    GenerationResult,
    SamplingParams,
    SpeculativeConfig,
    SpeculativeEngine,
)
from daemon.core.prompt_cache import PromptCache
from daemon.serving.requests import BlockingHandle, Done, GenerationRequest
from daemon.serving.worker import GenerationWorker
from tests.core.test_constraints import SCHEMA, constrained_greedy
from tests.core.test_engine import make_prompts, no_eos, reference_greedy
from tests.helpers import HANG_GUARD_S, perturbed_copy

N = 24


@pytest.fixture
def engine(tiny_tokenizer, tiny_target) -> SpeculativeEngine:
    draft = perturbed_copy(tiny_target, seed=1, noise=0.2)
    cfg = SpeculativeConfig(num_draft_tokens=3, max_draft_tokens=5, lookup=True)
    return SpeculativeEngine(
        tiny_target, draft, no_eos(tiny_tokenizer), cfg, prompt_cache=PromptCache(8, 1 << 28)
    )


def lone_text(engine: SpeculativeEngine, prompt: list[int], n: int) -> str:
    """The text of the same answer served alone (the detokenizer's rules, not decode's)."""
    # a separate engine: the worker's prompt cache holds arrays of the worker thread's stream
    alone = SpeculativeEngine(engine.target, engine.draft, engine.tokenizer)
    return alone.run(prompt, SamplingParams(max_tokens=n)).text


def make_worker(engine: SpeculativeEngine, batch_size: int = 4, **kw) -> GenerationWorker:
    return GenerationWorker(engine, queue_size=32, batch_size=batch_size, **kw)


def submit(worker: GenerationWorker, prompt: list[int], **params) -> BlockingHandle:
    params.setdefault("max_tokens", N)
    handle = BlockingHandle(GenerationRequest(list(prompt), SamplingParams(**params)))
    worker.submit(handle)
    return handle


def serve_all(worker: GenerationWorker, handles: list[BlockingHandle]) -> list[GenerationResult]:
    """Start the worker on requests queued beforehand (so they are ready together), wait for
    every result, stop it."""
    worker.start()
    try:
        return [h.result(HANG_GUARD_S) for h in handles]
    finally:
        assert worker.stop(HANG_GUARD_S)


@pytest.mark.parametrize("batch_size", [4, 1])
def test_greedy_output_is_the_targets_batched_or_not(engine, tiny_target, batch_size) -> None:
    prompts = make_prompts(engine.tokenizer, 12)[4:10]
    worker = make_worker(engine, batch_size=batch_size)
    # queued before the thread starts, so they are ready together: with batching the first
    # four go into one batch and the last two join as those finish; without, one at a time
    results = serve_all(worker, [submit(worker, p) for p in prompts])
    for prompt, res in zip(prompts, results, strict=True):
        assert res.tokens == reference_greedy(tiny_target, prompt, N), prompt
        assert res.finish_reason == "length" and res.stats.generation_tokens == N
        assert res.text == lone_text(engine, prompt, N)
        if batch_size > 1:  # batched from the first token: nothing drafted, nothing to learn
            assert res.stats.batched_tokens == N and res.stats.drafted == 0
            assert not res.rejections
        else:
            assert res.stats.batched_tokens == 0 and res.stats.drafted > 0


def test_a_running_request_hands_over_to_the_batch(engine, tiny_target) -> None:
    prompts = make_prompts(engine.tokenizer, 12)[5:8]
    worker = make_worker(engine, batch_size=4)
    worker.start()
    try:
        first = submit(worker, prompts[0], max_tokens=64)
        chunks: list[GenerationChunk] = []
        events = first.events(HANG_GUARD_S)
        while sum(len(c.tokens) for c in chunks) < 8:  # it runs alone, speculatively
            ev = next(events)
            assert isinstance(ev, GenerationChunk)
            chunks.append(ev)
        others = [submit(worker, p) for p in prompts[1:]]
        rest = list(events)
        done = rest[-1]
        assert isinstance(done, Done) and done.result is not None
        res = done.result
        other_results = [h.result(HANG_GUARD_S) for h in others]
    finally:
        assert worker.stop(HANG_GUARD_S)
    assert res.tokens == reference_greedy(tiny_target, prompts[0], 64)
    assert res.stats.drafted > 0 and 0 < res.stats.batched_tokens < 64
    streamed = "".join(c.text for c in chunks + rest if isinstance(c, GenerationChunk))
    assert streamed == res.text == lone_text(engine, prompts[0], 64)
    for prompt, r in zip(prompts[1:], other_results, strict=True):
        assert r.tokens == reference_greedy(tiny_target, prompt, N)


def test_the_last_member_of_a_batch_goes_back_to_speculation(engine, tiny_target) -> None:
    prompts = make_prompts(engine.tokenizer, 12)[5:7]
    worker = make_worker(engine, batch_size=4)
    short = submit(worker, prompts[0], max_tokens=4)
    long = submit(worker, prompts[1], max_tokens=64, stop=["\u00ff\u00fe"])  # never matches
    worker.start()
    try:
        res_short = short.result(HANG_GUARD_S)
        res = long.result(HANG_GUARD_S)
    finally:
        assert worker.stop(HANG_GUARD_S)
    assert res_short.stats.batched_tokens == 4
    # batched while the short one ran, then alone and speculative again: the same answer
    assert 0 < res.stats.batched_tokens < 64 and res.stats.drafted > 0
    assert res.tokens == reference_greedy(tiny_target, prompts[1], 64)
    assert res.text == lone_text(engine, prompts[1], 64)


def test_a_member_that_started_before_a_swap_stays_in_the_batch(engine, tiny_target) -> None:
    """A request's adapter version is fixed at its start (its response and its buffer record
    name it): when the draft was swapped while it was batched, it is not handed back to the
    speculative path, which would draft it with the new version."""
    prompts = make_prompts(engine.tokenizer, 12)[5:7]
    asked = itertools.count()
    # both requests start under version 0; every later look sees version 1 (a swap)
    worker = make_worker(
        engine, batch_size=4, adapter_version=lambda _model: 0 if next(asked) < 2 else 1
    )
    short = submit(worker, prompts[0], max_tokens=4)
    long = submit(worker, prompts[1], max_tokens=64, stop=["\u00ff\u00fe"])
    worker.start()
    try:
        short.result(HANG_GUARD_S)
        res = long.result(HANG_GUARD_S)
    finally:
        assert worker.stop(HANG_GUARD_S)
    assert long.request.adapter_version == 0
    assert res.stats.batched_tokens == 64 and res.stats.drafted == 0  # never drafted by v1
    assert res.tokens == reference_greedy(tiny_target, prompts[1], 64)


def test_a_long_prompt_joins_a_chunk_at_a_time_and_can_be_cancelled(engine, tiny_target) -> None:
    """A request joining the batch reads its prompt one chunk per step of the members: a long
    prompt does not stall them, and one whose client leaves meanwhile stops at the next
    chunk, not after the whole prompt."""
    engine.config = SpeculativeConfig(num_draft_tokens=3, prefill_step_size=4)
    prompts = make_prompts(engine.tokenizer, 12)
    long_prompt = [t for p in prompts for t in p][:96]  # 24 chunks of 4
    worker = make_worker(engine, batch_size=4)
    running = submit(worker, prompts[5], max_tokens=200, stop=["\u00ff\u00fe"])
    seen: dict[int, list[int]] = {}  # request id -> the member's tokens at each of its reads
    read = worker.batch.read
    leaving: list[BlockingHandle] = []

    def counting_read(joining):
        rid = next(r for r, (s, j) in enumerate(worker._joining) if j is joining)
        handle = worker._joining[rid][0].handle
        seen.setdefault(handle.request.id, []).append(len(running_result.tokens))
        if handle in leaving and len(seen[handle.request.id]) == 3:
            handle.cancel()  # the client leaves after three chunks
        return read(joining)

    worker.batch.read = counting_read  # type: ignore[method-assign]
    worker.start()
    try:
        events = running.events(HANG_GUARD_S)
        next(events)
        running_result = worker._running[running.request.id].result
        joiner = submit(worker, long_prompt, max_tokens=4)
        res = joiner.result(HANG_GUARD_S)
        other = long_prompt[::-1]  # not in the prompt cache
        leaver = BlockingHandle(GenerationRequest(other, SamplingParams(max_tokens=4)))
        leaving.append(leaver)
        worker.submit(leaver)
        gone = leaver.result(HANG_GUARD_S)
        rest = [ev for ev in events]
    finally:
        assert worker.stop(HANG_GUARD_S)
    reads = seen[joiner.request.id]
    assert len(reads) == 23  # the 23 chunks before the last (which gives the first token)
    assert reads[-1] - reads[0] >= 15, reads  # the member stepped between the chunks
    assert res.tokens == reference_greedy(tiny_target, long_prompt, 4)
    assert gone.finish_reason == "cancelled" and gone.tokens == []
    assert len(seen[leaver.request.id]) == 3  # stopped as its client left: not 23 chunks
    done = rest[-1]
    assert isinstance(done, Done) and done.result is not None
    assert done.result.tokens == reference_greedy(tiny_target, prompts[5], 200)


@pytest.mark.parametrize("then", ["join", "cancel"])
def test_a_request_not_yet_stepped_joins_or_ends_as_it_stood(engine, tiny_target, then) -> None:
    """The loop turn by turn on this thread: a batch hands its last member back (a resumed
    generation, not stepped yet); then a new request arrives, or the client hangs up, before
    its first round."""
    prompts = make_prompts(engine.tokenizer, 12)[5:8]
    worker = make_worker(engine, batch_size=4)
    short = submit(worker, prompts[0], max_tokens=3)
    long = submit(worker, prompts[1], max_tokens=40)
    for _ in range(200):
        worker._take(block=False)
        worker._drop_cancelled()
        worker._admit()
        if worker._lone is not None:
            break
        worker._read_joinings()
        worker._step_batch()
        worker._release_lone_member()
    assert worker._lone is not None and worker._lone.resumed is not None  # not stepped yet
    assert short.result(1).tokens == reference_greedy(tiny_target, prompts[0], 3)
    late = submit(worker, prompts[2], max_tokens=N) if then == "join" else None
    if then == "cancel":
        long.cancel()
    for _ in range(400):
        worker._turn()
        if worker._idle:
            break
    res = long.result(1)
    if late is not None:
        assert res.tokens == reference_greedy(tiny_target, prompts[1], 40)
        assert late.result(1).tokens == reference_greedy(tiny_target, prompts[2], N)
    else:
        assert res.finish_reason == "cancelled" and 0 < len(res.tokens) < 40
        assert res.stats.generation_tokens == len(res.tokens)


def test_stop_strings_max_tokens_and_cancel_inside_a_batch(engine, tiny_target) -> None:
    tok = engine.tokenizer
    prompts = make_prompts(tok, 12)[6:9]
    ref = reference_greedy(tiny_target, prompts[0], N)
    full = tok.decode(ref)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    worker = make_worker(engine, batch_size=4)
    stopped = submit(worker, prompts[0], stop=[stop])
    short = submit(worker, prompts[1], max_tokens=5)
    cancelled = submit(worker, prompts[2], max_tokens=400)
    worker.start()
    try:
        res_stop = stopped.result(HANG_GUARD_S)
        res_short = short.result(HANG_GUARD_S)
        cancelled.cancel()
        done = [e for e in cancelled.events(HANG_GUARD_S) if isinstance(e, Done)][0]
    finally:
        assert worker.stop(HANG_GUARD_S)
    assert res_stop.finish_reason == "stop" and res_stop.text == full[: full.find(stop)]
    assert res_short.finish_reason == "length" and res_short.tokens == reference_greedy(
        tiny_target, prompts[1], 5
    )
    assert done.result is not None and done.result.finish_reason == "cancelled"
    assert (
        done.result.tokens
        == reference_greedy(tiny_target, prompts[2], 400)[: len(done.result.tokens)]
    )


def test_grammar_inside_a_batch(engine, tiny_target, tiny_tokenizer) -> None:
    prompts = make_prompts(tiny_tokenizer, 12)[:3]
    engine.tokenizer = tiny_tokenizer  # EOS ends a JSON answer
    worker = make_worker(engine, batch_size=4)
    handles = []
    for p in prompts:
        req = GenerationRequest(
            list(p),
            SamplingParams(max_tokens=60),
            constraint=Constraint.json_schema(tiny_tokenizer, SCHEMA),
        )
        handles.append(worker.submit(BlockingHandle(req)))
    results = serve_all(worker, handles)
    for p, res in zip(prompts, results, strict=True):
        assert res.stats.batched_tokens > 0
        assert res.tokens == constrained_greedy(tiny_target, tiny_tokenizer, p, 60)
        value = json.loads(res.text)
        assert set(value) == {"ok", "kind", "n"}


def test_seeded_samples_in_a_batch_repeat(engine) -> None:
    prompt = make_prompts(engine.tokenizer, 12)[7]

    def batch_of(seeds: list[int]) -> list[list[int]]:
        worker = make_worker(engine, batch_size=4)
        handles = [submit(worker, prompt, temperature=1.0, seed=s) for s in seeds]
        return [r.tokens for r in serve_all(worker, handles)]

    a = batch_of([1, 2, 1])
    assert a[0] == a[2] and a[0] != a[1]
    assert batch_of([1, 3])[0] == a[0]  # whatever else shares the batch


def test_batched_requests_are_recorded_and_finished(engine) -> None:
    prompts = make_prompts(engine.tokenizer, 12)[4:7]
    recorded: list[GenerationResult] = []
    finished: list[int] = []
    worker = make_worker(
        engine,
        record=lambda req, res: recorded.append(res),
        on_finished=lambda req, res, q, t: finished.append(req.id),
    )
    handles = [submit(worker, p) for p in prompts]
    serve_all(worker, handles)
    assert len(recorded) == 3 and all(r.stats.batched_tokens for r in recorded)
    assert sorted(finished) == sorted(h.request.id for h in handles)


def test_abort_cancels_running_and_queued_requests(engine) -> None:
    prompts = make_prompts(engine.tokenizer, 12)[4:10]
    worker = make_worker(engine, batch_size=2)
    handles = [submit(worker, p, max_tokens=400) for p in prompts]
    started = threading.Event()
    first = handles[0]
    worker.start()
    try:
        for ev in first.events(HANG_GUARD_S):
            if isinstance(ev, GenerationChunk) and ev.tokens:
                started.set()
                break
        worker.abort()
        with pytest.raises(Exception, match="shutting down"):
            submit(worker, prompts[0])
        finals = [[e for e in h.events(HANG_GUARD_S) if isinstance(e, Done)][0] for h in handles]
    finally:
        assert worker.stop(HANG_GUARD_S)
    assert started.is_set()
    for done in finals:  # cut short if running, never started if queued
        assert done.result is None or done.result.finish_reason == "cancelled"
    assert any(d.result is None for d in finals)


def test_idle_unload_frees_the_models_and_the_next_request_loads_them(tmp_path) -> None:
    """models.keep_alive_seconds: the weights leave memory after the idle time (a layer-skip
    draft's shared arrays included) and come back, the same, for the next request."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from daemon.config import load_settings
    from daemon.core.models import load_pair
    from daemon.serving.service import Service
    from tests.helpers import wait_until, write_model_dir

    model = write_model_dir(tmp_path / "tiny", ["a", "b", "c", "d"], vocab_size=40, seed=5)
    settings, _ = load_settings(
        None,
        {
            "paths.data_dir": str(tmp_path / "data"),
            "models.target": str(model),
            "models.draft_layers": [0, 1],
            "models.keep_alive_seconds": 0.5,
        },
    )
    pair = load_pair(settings)
    service = Service(settings, pair)
    service.start()
    worker = service.worker
    assert worker is not None and service.engine is not None

    def weight_bytes() -> int:
        arrays = {
            id(a): a
            for m in (pair.target, service.engine.draft)
            for _, a in tree_flatten(m.parameters())
        }
        return sum(a.nbytes for a in arrays.values())

    try:
        before = service.generate([{"role": "user", "content": "a b c"}], max_tokens=12)
        loaded = weight_bytes()
        wait_until(lambda: not service.primary.resident, "model unloaded after the idle time")
        assert weight_bytes() == 0
        assert len(list((tmp_path / "data" / "offloaded").glob("*.safetensors"))) == 1
        assert len(service.engine.prompt_cache) == 0
        # the draft still shares the target's arrays after the reload
        after = service.generate([{"role": "user", "content": "a b c"}], max_tokens=12)
        assert service.primary.resident and weight_bytes() == loaded
        assert after.tokens == before.tokens and after.text == before.text
        assert not list((tmp_path / "data" / "offloaded").glob("*.safetensors"))
        mx.eval(pair.target.parameters())
    finally:
        assert service.stop(HANG_GUARD_S)
