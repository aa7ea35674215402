"""Rehearsal (``training.rehearsal_tokens``): the target's own answers to a run's train
prompts, a few sampled tokens then greedy, generated within the budget, cached for later runs,
never from a holdout row."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import pytest
from structlog.testing import capture_logs

from daemon.adaptation.rehearsal import (
    FEATURE_DEFAULT_TOKENS,
    REQUEST_VARIANT,
    RehearsalCache,
    prefix_length,
    rehearsal_budget,
    rehearse,
    request_span,
)
from daemon.adaptation.run import run_training
from daemon.config import load_settings
from daemon.core.models import load_pair
from daemon.store.buffer import ReplayBuffer
from tests.adaptation.test_training import VOCAB, WORDS, make_buffer, write_config
from tests.helpers import make_tiny_llama, write_model_dir


@dataclass
class Rec:
    id: int
    prompt_tokens: list[int]
    output_tokens: list[int]
    rejections: list = field(default_factory=list)


def records(n: int, out_len: int = 12) -> list[Rec]:
    return [
        Rec(i + 1, [(7 * i + j) % (VOCAB - 2) + 2 for j in range(5)], [3] * out_len)
        for i in range(n)
    ]


def greedy_after(target, prompt: list[int], output: list[int]) -> list[int]:
    """The target's argmax at each output position, teacher forced on prompt + output."""
    logits = target(mx.array(prompt + output)[None])[0]
    return mx.argmax(logits[len(prompt) - 1 : -1], axis=-1).tolist()


def test_an_answer_is_a_sampled_start_then_the_targets_greedy_continuation(
    tmp_path: Path,
) -> None:
    target = make_tiny_llama(VOCAB, seed=4)
    recs = records(4)
    cache = RehearsalCache(tmp_path, "t")
    rows, report = rehearse(
        target, recs, cache, budget_tokens=1000, variants=2, max_output=8, stop_tokens=[]
    )
    assert report.generated == 8 and report.cached == 0 and len(rows) == 8
    for row in rows:
        rec = recs[row.record_id - 1]
        prefix = row.prompt_tokens[len(rec.prompt_tokens) :]
        assert row.prompt_tokens[: len(rec.prompt_tokens)] == rec.prompt_tokens
        assert len(prefix) == prefix_length(rec.id, row.variant)
        # as long as the record's answer, cut at max_output
        assert len(row.output_tokens) == 8
        assert row.output_tokens == greedy_after(target, row.prompt_tokens, row.output_tokens)
    # two variants of one prompt start differently (1, 2 or 4 sampled tokens)
    assert {len(r.prompt_tokens) for r in rows if r.record_id == 1} == {
        5 + prefix_length(1, 0),
        5 + prefix_length(1, 1),
    }


def test_the_budget_bounds_what_is_generated_in_the_records_order(tmp_path: Path) -> None:
    target = make_tiny_llama(VOCAB, seed=4)
    recs = records(6, out_len=10)
    rows, report = rehearse(
        target,
        recs,
        RehearsalCache(tmp_path, "t"),
        budget_tokens=35,
        variants=1,
        max_output=64,
        stop_tokens=[],
    )
    assert [r.record_id for r in rows] == [1, 2, 3]  # 3 x 10 fit in 35, the rest do not
    assert report.generated_tokens == 30


def test_cached_answers_are_reused_and_a_bad_cache_file_is_rebuilt(tmp_path: Path) -> None:
    target = make_tiny_llama(VOCAB, seed=4)
    recs = records(3)
    cache = RehearsalCache(tmp_path, "t")
    first, _ = rehearse(
        target, recs, cache, budget_tokens=100, variants=1, max_output=8, stop_tokens=[]
    )
    cache.save([1, 2])  # record 3 left the buffer: its answer goes with it
    again = RehearsalCache(tmp_path, "t").load()
    rows, report = rehearse(
        target, recs, again, budget_tokens=0, variants=1, max_output=8, stop_tokens=[]
    )
    assert report.cached == 2 and report.generated == 0
    assert [(r.prompt_tokens, r.output_tokens) for r in rows] == [
        (r.prompt_tokens, r.output_tokens) for r in first[:2]
    ]
    # another target's cache is another file; its answers are never read for this one
    assert not RehearsalCache(tmp_path, "other").load().entries
    cache.path.write_text('{"target_id": "t", "record_id": 1}\nnot json\n')
    with capture_logs() as logs:
        broken = RehearsalCache(tmp_path, "t").load()
    assert not broken.entries
    assert [e["event"] for e in logs] == ["rehearsal_cache_unreadable"]


STOP = 1  # the end of a message, as <|im_end|> in a chat template


def chat_records(n: int) -> list[Rec]:
    """Prompts shaped by a chat template: a system message, a 12-token request, each closed
    by the stop token, then the answer's header."""
    return [
        Rec(
            i + 1,
            [5, 6, STOP] + [(3 * i + j) % (VOCAB - 12) + 10 for j in range(12)] + [STOP, 8, 9],
            [3] * 10,
        )
        for i in range(n)
    ]


def test_a_request_is_rewritten_inside_its_last_message_only() -> None:
    prompt = chat_records(1)[0].prompt_tokens
    spans = {request_span(prompt, [STOP], 1, REQUEST_VARIANT + j) for j in range(3)}
    assert len(spans) == 3  # a quarter, half or three quarters of the message kept
    for keep, end in spans:
        assert 3 + 4 <= keep < end == 15  # past the system message, before the request's stop
    assert request_span([5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [STOP], 1, 0) is None  # no message
    assert request_span(prompt[:16], [STOP], 1, 0) is None  # no answer header after it
    assert request_span([5, STOP, 10, 11, 12, STOP, 8], [STOP], 1, 0) is None  # too short


def test_a_rewritten_request_is_sampled_then_answered_greedily_and_cached(
    tmp_path: Path,
) -> None:
    target = make_tiny_llama(VOCAB, seed=4)
    recs = chat_records(4)
    cache = RehearsalCache(tmp_path, "t")
    rows, report = rehearse(
        target,
        recs,
        cache,
        budget_tokens=10_000,
        variants=0,
        max_output=8,
        stop_tokens=[STOP],
        requests=2,
    )
    assert report.generated == len(rows) >= 6 and report.generated + report.cut == 8
    for row in rows:
        rec = recs[row.record_id - 1]
        keep, end = request_span(rec.prompt_tokens, [STOP], rec.id, row.variant)
        sampled = row.prompt_tokens[keep : len(row.prompt_tokens) - (len(rec.prompt_tokens) - end)]
        assert row.prompt_tokens[:keep] == rec.prompt_tokens[:keep]
        assert row.prompt_tokens[keep + len(sampled) :] == rec.prompt_tokens[end:]
        assert sampled and STOP not in sampled and sampled != rec.prompt_tokens[keep:end]
        assert len(row.output_tokens) == 8
        assert row.output_tokens == greedy_after(target, row.prompt_tokens, row.output_tokens)
    cache.save([r.id for r in recs])
    again, report = rehearse(
        target,
        recs,
        RehearsalCache(tmp_path, "t").load(),
        budget_tokens=0,
        variants=0,
        max_output=8,
        stop_tokens=[STOP],
        requests=2,
    )
    assert report.cached == len(rows) and report.generated == 0
    assert [(r.prompt_tokens, r.output_tokens) for r in again] == [
        (r.prompt_tokens, r.output_tokens) for r in rows
    ]


@pytest.mark.parametrize("span", [[9, 4], [-1, 4], [3], "x"])
def test_a_cached_request_with_a_bad_span_is_not_trusted(tmp_path: Path, span) -> None:
    """A rewritten request's span that cannot cut a prompt makes the cache file unreadable:
    logged and rebuilt (derived data), never used to build a prompt."""
    cache = RehearsalCache(tmp_path, "t")
    cache.path.parent.mkdir(parents=True)
    entry = {
        "target_id": "t",
        "record_id": 1,
        "variant": REQUEST_VARIANT,
        "prefix": [4],
        "output": [5],
        "span": span,
    }
    cache.path.write_text(json.dumps(entry) + "\n")
    with capture_logs() as logs:
        loaded = RehearsalCache(tmp_path, "t").load()
    assert not loaded.entries
    assert [e["event"] for e in logs] == ["rehearsal_cache_unreadable"]
    entry["span"] = [4, 9]  # a good one is read
    cache.path.write_text(json.dumps(entry) + "\n")
    assert RehearsalCache(tmp_path, "t").load().get(1, REQUEST_VARIANT).span == (4, 9)


@pytest.fixture
def rehearsal_setup(tmp_path: Path):
    model_dir = write_model_dir(tmp_path / "model", WORDS, VOCAB, seed=2)
    data_dir = tmp_path / "data"
    ids = make_buffer(data_dir)
    config = write_config(tmp_path, str(model_dir), epochs=1, replay_ratio=0.2)
    settings, _ = load_settings(
        config,
        {
            "paths.data_dir": str(data_dir),
            "training.rehearsal_tokens": 10_000,
            "training.rehearsal_variants": 2,
        },
    )
    return settings, data_dir, ids


def test_a_run_trains_on_rehearsed_answers_of_train_rows_only(
    rehearsal_setup, tmp_path: Path
) -> None:
    settings, data_dir, ids = rehearsal_setup
    pair = load_pair(settings)
    m = run_training(settings, out_dir=tmp_path / "a1", pair=pair, mark_used=False)
    assert m.rehearsal is not None and m.rehearsal["generated"] > 0
    assert m.examples.rehearsal == m.rehearsal["rows"] > 0
    cache = RehearsalCache(data_dir, pair.target_id).load()
    rehearsed = {rid for rid, _ in cache.entries}
    trained = set(ids["failures"]) | set(ids["ok"])
    assert rehearsed and rehearsed <= trained
    assert not rehearsed & set(ids["holdout"])
    # every line of the cache names its target
    lines = [json.loads(x) for x in cache.path.read_text().splitlines()]
    assert {x["target_id"] for x in lines} == {pair.target_id}
    # the next run reads them back instead of generating
    m2 = run_training(settings, out_dir=tmp_path / "a2", pair=pair, mark_used=False)
    assert m2.rehearsal is not None
    assert m2.rehearsal["cached"] == m.rehearsal["rows"]
    # only answers cut short by a sampled stop are tried again
    assert m2.rehearsal["generated"] <= m.rehearsal["cut"]


def test_by_default_a_feature_draft_rehearses_and_a_lora_draft_does_not(
    rehearsal_setup, tmp_path: Path
) -> None:
    settings, _, _ = rehearsal_setup
    settings.training.rehearsal_tokens = None
    assert rehearsal_budget(None, True) == FEATURE_DEFAULT_TOKENS > 0
    assert rehearsal_budget(None, False) == 0 and rehearsal_budget(0, True) == 0
    lora = run_training(settings, out_dir=tmp_path / "lora", mark_used=False)
    assert lora.rehearsal is None and lora.examples.rehearsal == 0
    settings.models.draft = "feature"
    feature = run_training(settings, out_dir=tmp_path / "feature", mark_used=False, epochs=1)
    assert feature.draft_kind == "feature"
    assert feature.rehearsal is not None and feature.examples.rehearsal > 0


def test_rehearsal_off_generates_nothing(rehearsal_setup, tmp_path: Path) -> None:
    settings, data_dir, _ = rehearsal_setup
    settings.training.rehearsal_tokens = 0
    m = run_training(settings, out_dir=tmp_path / "a1", mark_used=False)
    assert m.rehearsal is None and m.examples.rehearsal == 0
    assert not (data_dir / "rehearsal").exists()
    with ReplayBuffer(data_dir, settings.buffer, create=False) as buf:
        assert buf.count() == 17  # nothing is ever added to the buffer
