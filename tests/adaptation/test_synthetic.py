"""Synthetic traffic (`specd warmup`): requests the target samples after its chat template's
user header, answered greedily; stored as pending train rows, never holdout, never indexed for
drafting."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from daemon.adaptation import synthetic
from daemon.adaptation.synthetic import (
    MIN_REQUEST,
    SynthesisReport,
    earlier_turn,
    request_header,
    synthesize,
    turn_header,
)
from daemon.cli import main
from daemon.core.prompts import encode_prompt
from daemon.store.buffer import ReplayBuffer
from daemon.store.record import SYNTHETIC_DRAFT, BufferRecord
from tests.helpers import build_tiny_tokenizer, make_tiny_llama, write_model_dir

VOCAB = 320
# a word-level model's template: its messages end with <eos>, the sampler's stop token
WORD_TEMPLATE = (
    "{% for m in messages %}user {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}bot {% endif %}"
)
WORDS = [f"w{i}" for i in range(36)] + ["user", "bot"]


def greedy_after(target, prompt: list[int], output: list[int]) -> list[int]:
    logits = target(mx.array(prompt + output)[None])[0]
    return mx.argmax(logits[len(prompt) - 1 : -1], axis=-1).tolist()


# stop tokens the target samples now and then: requests of 10-90 tokens
STOPS = list(range(200, 216))


@pytest.fixture(scope="module")
def tiny():
    # sharp enough for clear argmax margins, soft enough that sampled requests differ
    return make_tiny_llama(VOCAB, seed=4, lm_head_scale=3.0), build_tiny_tokenizer(VOCAB)


def requests(target, tokenizer, rows: int, **kw) -> list[str]:
    kw = {"batch_size": 16, "max_output": 4, "stop_tokens": STOPS, **kw}
    return [r.request for b in synthesize(target, tokenizer, rows, **kw) for r in b]


def test_the_header_is_the_template_before_the_users_text(tiny) -> None:
    _, tokenizer = tiny
    assert tokenizer.decode(request_header(tokenizer)) == "<|user|>"


def test_rows_are_sampled_requests_with_the_targets_greedy_answers(tiny) -> None:
    target, tokenizer = tiny
    report = SynthesisReport()
    rows = [
        r
        for batch in synthesize(
            target, tokenizer, 12, batch_size=16, max_output=10, stop_tokens=STOPS, report=report
        )
        for r in batch
    ]
    assert len(rows) == report.rows == 12
    assert report.requests_sampled >= 12 and report.answer_tokens > 0
    assert len({r.request for r in rows}) == 12  # no request twice
    for r in rows:
        assert r.prompt_tokens == encode_prompt(tokenizer, r.request)  # the template around it
        assert len(tokenizer.encode(r.request)) >= MIN_REQUEST - 2  # not a fragment
        # the target's own answer: its argmax at every position, ended by a stop or the limit
        assert r.output_tokens == greedy_after(target, r.prompt_tokens, r.output_tokens)
        assert r.output_tokens[-1] in STOPS or len(r.output_tokens) == 10
        assert all(t not in STOPS for t in r.output_tokens[:-1])
    # sampled, not greedy: the requests differ, and a seed repeats them
    assert requests(target, tokenizer, 12, max_output=10) == [r.request for r in rows]


def test_requests_already_stored_are_not_written_again(tiny) -> None:
    target, tokenizer = tiny
    first = requests(target, tokenizer, 8)
    report = SynthesisReport(seen=set(first))
    second = requests(target, tokenizer, 8, report=report)
    assert len(second) == 8 and not set(first) & set(second)
    assert report.dropped >= 8  # the same seed samples the first run's requests first


def test_the_turn_header_is_the_template_between_an_answer_and_the_next_request(tiny) -> None:
    _, tokenizer = tiny
    assert tokenizer.decode(turn_header(tokenizer)) == "\n<|user|>"
    turn = turn_header(tokenizer)
    # the answer's own stop token is what the turn header writes again
    assert earlier_turn([1, 2], [3, 200], turn, {200}) == [1, 2, 3, *turn]
    assert earlier_turn([1, 2], [3, 4], turn, {200}) == [1, 2, 3, 4, *turn]


def test_requests_like_traffic_are_written_after_a_real_turn(tiny, monkeypatch) -> None:
    target, tokenizer = tiny
    like = [
        (encode_prompt(tokenizer, f"real request {i}"), tokenizer.encode(f"answer {i}") + [200])
        for i in range(3)
    ]
    shown: list[list[int]] = []
    sample = synthetic._sample_requests

    def spy(target, contexts, max_request, stops):
        shown.extend(contexts)
        return sample(target, contexts, max_request, stops)

    monkeypatch.setattr(synthetic, "_sample_requests", spy)
    rows = requests(target, tokenizer, 8, like=like, batch_size=8)
    turn = turn_header(tokenizer)
    # each request sampled after a real request and its answer, in turn
    assert shown[:4] == [p + o[:-1] + turn for p, o in (like * 2)[:4]]
    assert len(rows) == 8 and rows != requests(target, tokenizer, 8, batch_size=8)
    for r in rows:
        assert "real request" not in r  # answered alone, not as a second turn


def test_a_copy_of_the_request_shown_is_dropped(tiny, monkeypatch) -> None:
    target, tokenizer = tiny
    like = [(encode_prompt(tokenizer, "copy me if you can"), [5, 200])]
    own = tokenizer.encode("a request of its own")

    def copier(target, contexts, max_request, stops):
        return [tokenizer.encode("copy me if you can") if i % 2 else own for i in range(2)]

    monkeypatch.setattr(synthetic, "_sample_requests", copier)
    report = SynthesisReport()
    rows = next(
        synthesize(target, tokenizer, 1, max_output=4, stop_tokens=STOPS, like=like, report=report)
    )
    assert [r.request for r in rows] == ["a request of its own"]
    assert (report.copied, report.dropped) == (1, 1)


def test_a_target_that_never_ends_a_request_is_an_error(tiny) -> None:
    target, tokenizer = tiny
    with pytest.raises(ValueError, match="no usable request"):
        for _ in synthesize(target, tokenizer, 4, batch_size=8, max_request=4, stop_tokens=[]):
            pass


def test_a_model_without_a_chat_template_cannot_write_requests() -> None:
    class Plain:
        has_chat_template = False

    with pytest.raises(ValueError, match="no chat template"):
        request_header(Plain())


def test_synthetic_rows_are_pending_train_rows_never_holdout_or_indexed(tmp_path: Path) -> None:
    from daemon.config.sections import BufferSettings

    # nearly every prompt of real traffic goes to the holdout here; synthetic rows never do
    with ReplayBuffer(tmp_path, BufferSettings(holdout_fraction=0.99)) as buf:
        buf.add([BufferRecord.synthetic("write x", [1, 2], "a b", [3, 4], "t")])
        real = BufferRecord("real", [1], "c", [5, 6], {}, [], "t", "d")
        buf.add([real])
        assert real.split == "holdout"
        (row,) = buf.pending_failures()
        assert (row.split, row.is_failure, row.draft_id) == ("train", True, SYNTHETIC_DRAFT)
        assert buf.recent_outputs(100) == []  # not what users send: not for drafting
        buf.add([BufferRecord("real 2", [1], "c", [7], {}, [], "t", "d", split="train")])
        assert buf.recent_outputs(100) == [[7]]
        assert buf.synthetic_requests("t") == {"write x"}
        assert buf.synthetic_requests("other") == set()


@pytest.fixture
def chat_model(tmp_path: Path) -> list[str]:
    model = write_model_dir(
        tmp_path / "m", WORDS, vocab_size=40, seed=3, chat_template=WORD_TEMPLATE
    )
    cfg = tmp_path / "config.yaml"
    cfg.write_text(json.dumps({"models": {"target": str(model), "draft_layers": [0, 1]}}))
    return ["--config", str(cfg), "--data-dir", str(tmp_path / "data")]


def test_specd_warmup_stores_new_rows_each_time(chat_model, tmp_path: Path, capsys) -> None:
    assert main(["warmup", *chat_model, "--rows", "6", "--max-tokens", "8", "-q"]) == 0
    out = capsys.readouterr().out
    assert "warmup: 6 rows" in out and "after the chat template alone" in out  # no traffic
    assert main(["warmup", *chat_model, "--rows", "5", "--max-tokens", "8", "-q"]) == 0
    out = capsys.readouterr().out
    assert "warmup: 5 rows" in out and "pending failures in the buffer: 11" in out
    with ReplayBuffer(tmp_path / "data", create=False) as buf:
        rows = list(buf.iter_records())
    assert len(rows) == 11 and len({r.prompt_text for r in rows}) == 11
    for r in rows:
        assert (r.split, r.is_failure, r.draft_id) == ("train", True, SYNTHETIC_DRAFT)
        assert r.prompt_tokens[-1] == 39 and 0 < len(r.output_tokens) <= 8  # ... "bot" header


def test_specd_warmup_names_a_model_it_cannot_use(tmp_path: Path, capsys) -> None:
    model = write_model_dir(tmp_path / "m", WORDS, vocab_size=40, seed=3)  # no chat template
    cfg = tmp_path / "config.yaml"
    cfg.write_text(json.dumps({"models": {"target": str(model), "draft_layers": [0, 1]}}))
    rc = main(["warmup", "--config", str(cfg), "--data-dir", str(tmp_path / "d"), "-q"])
    assert rc != 0
    assert "no chat template" in capsys.readouterr().err


def test_specd_warmup_like_traffic_is_shown_train_rows_users_sent(
    chat_model, tmp_path: Path, capsys
) -> None:
    from daemon.config.sections import BufferSettings

    target = str(tmp_path / "m")
    with ReplayBuffer(tmp_path / "data", BufferSettings()) as buf:
        # a holdout row and a synthetic one: neither may be shown
        held = BufferRecord("held", [38, 5, 39], "", [6, 7], {}, [], target, "d", split="holdout")
        buf.add([held, BufferRecord.synthetic("syn", [38, 4, 39], "", [6], target)])
    argv = ["warmup", *chat_model, "--rows", "4", "--max-tokens", "4", "--like-traffic", "-q"]
    assert main(argv) != 0
    assert "no train row of real traffic" in capsys.readouterr().err
    with ReplayBuffer(tmp_path / "data", BufferSettings()) as buf:
        buf.add(
            [
                BufferRecord(
                    "real", [38, 5, 8, 39], "", [6, 7, 9], {}, [], target, "d", split="train"
                )
            ]
        )
        shown = buf.for_target(target).sample_replay(10, traffic_only=True)
        assert [r.prompt_text for r in shown] == ["real"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "warmup: 4 rows" in out and "copies of the request shown" in out
    assert "written after 1 stored requests of real traffic, answers up to 3 tokens" in out
    # like the traffic by default where there is any; general when told not to
    assert main(argv[:-2] + ["-q"]) == 0
    assert "written after 1 stored requests" in capsys.readouterr().out
    assert main(argv[:-2] + ["--no-like-traffic", "-q"]) == 0
    assert "after the chat template alone" in capsys.readouterr().out


def _training_settings(tmp_path: Path, **training):
    from daemon.config import load_settings

    cfg = tmp_path / "train.yaml"
    models = {"target": str(tmp_path / "m"), "draft_layers": [0, 1], "preload_openblas": False}
    train = {"epochs": 1, "replay_ratio": 0, "warmup_steps": 1, **training}
    cfg.write_text(json.dumps({"models": models, "training": train}))
    settings, _ = load_settings(cfg, {"paths.data_dir": str(tmp_path / "data")})
    return settings


def _real(target: str, i: int, split: str = "train") -> BufferRecord:
    return BufferRecord(
        f"real {i}",
        [38, 5 + i, 8, 39],
        "",
        [6, 7, 9 + i],
        {},
        [],
        target,
        "d",
        split=split,
        is_failure=True,
    )


def test_a_training_run_first_writes_rows_like_the_traffic_and_trains_on_them(
    chat_model, tmp_path: Path
) -> None:
    from daemon.adaptation.run import run_training
    from daemon.config.sections import BufferSettings

    target = str(tmp_path / "m")
    with ReplayBuffer(tmp_path / "data", BufferSettings()) as buf:
        buf.add([_real(target, i) for i in range(4)] + [_real(target, 9, "holdout")])
    settings = _training_settings(tmp_path, synthetic_per_failure=1.5)
    m = run_training(settings, out_dir=tmp_path / "a1", run_id="r1")
    assert m.synthetic is not None
    assert m.synthetic["rows"] == 6 and m.synthetic["shown"] == 4  # 1.5 per real failure
    assert m.examples.failures == 10  # the four failures and the six rows it wrote
    with ReplayBuffer(tmp_path / "data", create=False) as buf:
        rows = [r for r in buf.iter_records() if r.draft_id == SYNTHETIC_DRAFT]
        assert len(rows) == 6 and {r.used_for_training for r in rows} == {"r1"}
        # answers no longer than the traffic's (3 tokens), where data.max_output_length is 256
        assert m.synthetic["max_output"] == 3 and max(len(r.output_tokens) for r in rows) == 3
        assert {r.split for r in rows} == {"train"}

        # synthetic rows already pending count against what is due: 3 for 2 new failures
        buf.add([_real(target, i) for i in (4, 5)])
        buf.add([BufferRecord.synthetic("pending", [38, 4, 39], "", [6], target)])
    m = run_training(settings, out_dir=tmp_path / "a2", run_id="r2")
    assert m.synthetic is not None and m.synthetic["rows"] == 2
    # a run that leaves the buffer as it found it (a benchmark) writes nothing either
    with ReplayBuffer(tmp_path / "data", create=False) as buf:
        buf.add([_real(target, 6)])
    m = run_training(settings, out_dir=tmp_path / "a3", mark_used=False)
    assert m.synthetic is None and m.examples.failures == 1
    # off: nothing written
    off = _training_settings(tmp_path, synthetic_per_failure=0)
    m = run_training(off, out_dir=tmp_path / "a4", run_id="r4")
    assert m.synthetic is None and m.examples.failures == 1
    with ReplayBuffer(tmp_path / "data", create=False) as buf:
        assert sum(r.draft_id == SYNTHETIC_DRAFT for r in buf.iter_records()) == 9
