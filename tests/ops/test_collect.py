"""`specd collect` in process and the `specd buffer` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.store.buffer import ReplayBuffer
from tests.helpers import write_model_dir


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, list[str]]:
    model = write_model_dir(tmp_path / "tiny", ["the", "cat", "sat"], vocab_size=40, seed=4)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        json.dumps(
            {
                "models": {"target": str(model), "draft_layers": [0, 1]},
                "buffer": {"holdout_fraction": 0.0},
                # the draft runs in every request (its stats are checked), however busy the
                # CPU: the cost-aware policy may judge a draft on a loaded machine not worth it
                "speculative": {"cost_aware": False},
            }
        )
    )
    return tmp_path, ["--config", str(cfg), "--data-dir", str(tmp_path / "data")]


def test_collect_in_process_records_like_serving(setup, capsys) -> None:
    tmp_path, common = setup
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "the cat", "domain": "x"})
        + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "sat the"}]})
        + "\n"
    )
    rc = main(
        [
            "collect",
            *common,
            "-p",
            "cat sat",
            "--prompts-file",
            str(prompts),
            "--max-tokens",
            "12",
            "-q",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "collected through: in-process" in out
    assert "requests: 3" in out
    with ReplayBuffer(tmp_path / "data", create=False) as buf:
        records = list(buf.iter_records())
    assert [r.prompt_text for r in records] == ["cat sat", "the cat", "sat the"]
    for r in records:
        assert len(r.output_tokens) == 12
        assert r.stats["drafted"] > 0
        assert r.target_id == str(tmp_path / "tiny")
        assert r.draft_id == "feature (until trained: layer-skip[0, 1])"  # models.draft: auto

    assert main(["buffer", "stats", *common]) == 0
    out = capsys.readouterr().out
    assert "records: 3" in out and "pending failures:" in out
    assert main(["buffer", "stats", *common, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 3

    export = tmp_path / "failures.jsonl"
    assert main(["buffer", "export", *common, "--jsonl", str(export)]) == 0
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    assert [line["prompt"] for line in lines] == ["cat sat", "the cat", "sat the"]
    for line, rec in zip(lines, records, strict=True):
        assert set(line) >= {"prompt", "draft_output", "target_output", "disagreements"}
        assert len(line["disagreements"]) == len(rec.rejections)

    assert main(["buffer", "purge", *common, "--before", "2000-01-01"]) == 0
    assert "purged 0 records" in capsys.readouterr().out
    assert main(["buffer", "purge", *common, "--all"]) == 0
    assert "purged 3 records" in capsys.readouterr().out


def test_collect_sends_a_conversation_a_turn_at_a_time_with_its_own_answers(setup, capsys) -> None:
    from daemon.config import load_settings
    from daemon.core.models import load_pair
    from daemon.core.prompts import encode_prompt

    tmp_path, _ = setup
    # every token a word, so the answers carried into the next turn are text
    words = ["the", "cat", "sat", *(f"w{i}" for i in range(35))]
    model = write_model_dir(tmp_path / "worded", words, vocab_size=40, seed=4)
    cfg = tmp_path / "worded.yaml"
    cfg.write_text(json.dumps({"models": {"target": str(model), "draft_layers": [0, 1]}}))
    common = ["--config", str(cfg), "--data-dir", str(tmp_path / "data")]
    conversations = tmp_path / "c.jsonl"
    conversations.write_text(
        json.dumps({"turns": ["the cat", "sat the", "cat cat"]})
        + "\n"
        + json.dumps({"turns": ["sat sat"]})
        + "\n"
    )
    args = ["collect", *common, "--conversations", str(conversations), "--max-tokens", "6"]
    assert main([*args, "-q"]) == 0
    assert "requests: 4" in capsys.readouterr().out
    with ReplayBuffer(tmp_path / "data", create=False) as buf:
        records = list(buf.iter_records())
    # every turn keyed on its conversation's first question (one split for all its turns)
    assert [r.prompt_text for r in records] == ["the cat"] * 3 + ["sat sat"]
    # each turn's prompt is the conversation so far, the target's answers between
    settings, _ = load_settings(common[1], {"paths.data_dir": str(tmp_path / "data")})
    tokenizer = load_pair(settings).tokenizer
    first, second, third = records[:3]
    assert first.output_text and second.output_text
    messages = [
        {"role": "user", "content": "the cat"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "sat the"},
    ]
    assert second.prompt_tokens == encode_prompt(tokenizer, messages)
    messages += [
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "cat cat"},
    ]
    assert third.prompt_tokens == encode_prompt(tokenizer, messages)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": "hi"}\n')
    assert main(["collect", *common, "--conversations", str(bad), "-q"]) == 1
    assert f"{bad}:1: 'turns' must be a non-empty list of strings" in capsys.readouterr().err


def test_collect_reports_bad_prompt_line(setup, capsys) -> None:
    tmp_path, common = setup
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text(json.dumps({"prompt": "ok"}) + "\n{not json\n")
    assert main(["collect", *common, "--prompts-file", str(prompts), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"{prompts}:2: invalid JSON" in err
    prompts.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    assert main(["collect", *common, "--prompts-file", str(prompts), "-q"]) == 1
    assert f"{prompts}:2: needs a non-empty string 'prompt'" in capsys.readouterr().err


def test_buffer_commands_on_corrupt_database(setup, capsys) -> None:
    tmp_path, common = setup
    (tmp_path / "data").mkdir()
    db = tmp_path / "data" / "buffer.sqlite"
    db.write_bytes(b"this is not a database" * 100)
    before = db.read_bytes()
    assert main(["buffer", "stats", *common]) == 1
    assert str(db) in capsys.readouterr().err
    assert main(["collect", *common, "-p", "the cat", "--in-process", "-q"]) == 1
    assert str(db) in capsys.readouterr().err
    assert db.read_bytes() == before


def test_buffer_stats_without_buffer(setup, capsys) -> None:
    _, common = setup
    assert main(["buffer", "stats", *common]) == 1
    assert "no replay buffer yet" in capsys.readouterr().err
