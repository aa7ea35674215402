"""One prompt-text rule for every entry point: a conversation sent over HTTP and the same
conversation collected by ``specd collect`` are keyed on the same text, so they land in the
same train/holdout split; every turn of a conversation lands in the split of its first."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx
import pytest

from daemon.cli import main
from daemon.config import load_settings
from daemon.core.prompts import prompt_text
from daemon.server import Server
from daemon.store.buffer import ReplayBuffer, assign_split
from tests.helpers import HANG_GUARD_S, write_model_dir

CONVERSATIONS = [
    [{"role": "user", "content": "the cat"}],
    [
        {"role": "user", "content": "the cat"},
        {"role": "assistant", "content": "sat"},
        {"role": "user", "content": "on the mat"},
    ],
    # Ends with an assistant message (a prefill): a *user* message is the key, which the HTTP
    # API always used and `specd collect` once did not (it took the last message).
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "cat sat on"},
        {"role": "assistant", "content": "the"},
    ],
    [{"role": "system", "content": "mat mat"}, {"role": "assistant", "content": "cat"}],
]


def test_prompt_text_rule() -> None:
    assert prompt_text(CONVERSATIONS[0]) == "the cat"
    # a later turn is keyed on its conversation's first question: the same split as that turn
    assert prompt_text(CONVERSATIONS[1]) == "the cat"
    assert prompt_text(CONVERSATIONS[2]) == "cat sat on"
    assert prompt_text(CONVERSATIONS[3]) == "mat mat\ncat"  # no user message: all of it


def test_conversations_sharing_a_follow_up_are_split_by_their_own_first_question() -> None:
    follow_up = {"role": "user", "content": "Now write two unit tests for it."}
    turns = [
        [{"role": "user", "content": f"What does f{i} do?"}, {"role": "assistant", "content": "x"}]
        for i in range(200)
    ]
    splits = [assign_split(prompt_text([*t, follow_up]), 0.1) for t in turns]
    assert splits == [assign_split(prompt_text(t[:1]), 0.1) for t in turns]
    assert 0 < splits.count("holdout") < 200  # not all one way


@pytest.fixture
def config(tmp_path: Path) -> Path:
    words = ["the", "cat", "sat", "on", "mat", "be", "brief"]
    model = write_model_dir(tmp_path / "tiny", words, vocab_size=40, seed=4)
    cfg = tmp_path / "config.yaml"
    settings = {
        "models": {"target": str(model), "draft_layers": [0, 1]},
        # every conversation must be recorded, whatever its split
        "buffer": {"holdout_fraction": 0.5},
        "training": {"enabled": False},
        "server": {"port": 0},
    }
    cfg.write_text(json.dumps(settings))
    return cfg


def _records(data_dir: Path) -> list[tuple[str, str | None]]:
    with ReplayBuffer(data_dir, create=False) as buf:
        return sorted((r.prompt_text, r.split) for r in buf.iter_records())


def test_http_and_collect_split_a_conversation_the_same_way(tmp_path: Path, config: Path) -> None:
    prompts = tmp_path / "conversations.jsonl"
    prompts.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    collect_dir = tmp_path / "collect-data"
    rc = main(
        [
            "collect",
            "--config",
            str(config),
            "--data-dir",
            str(collect_dir),
            "--prompts-file",
            str(prompts),
            "--max-tokens",
            "4",
            "-q",
        ]
    )
    assert rc == 0

    http_dir = tmp_path / "http-data"
    settings, sources = load_settings(config, {"paths.data_dir": str(http_dir)})
    srv = Server(settings, sources)
    thread = threading.Thread(target=srv.run, name="split-rule-server", daemon=True)
    thread.start()
    while not srv.ready.wait(0.1):
        assert thread.is_alive(), "server thread died during start-up"
    try:
        for conversation in CONVERSATIONS:
            r = httpx.post(
                f"{srv.url}/v1/chat/completions",
                json={"messages": conversation, "max_tokens": 4},
                timeout=HANG_GUARD_S,
            )
            assert r.status_code == 200, r.text
    finally:
        srv.handle_exit(signal.SIGTERM, None)  # drains, flushes and closes the buffer
        thread.join(HANG_GUARD_S)
    assert not thread.is_alive()

    via_collect, via_http = _records(collect_dir), _records(http_dir)
    expected = sorted((prompt_text(c), assign_split(prompt_text(c), 0.5)) for c in CONVERSATIONS)
    assert via_collect == via_http == expected
