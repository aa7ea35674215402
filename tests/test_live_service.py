"""The daemon as a service: live drop-in reloads, SIGHUP, log rotation, signals (real process)."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from tests.helpers import (
    HANG_GUARD_S,
    read_log,
    start_daemon,
    stop_daemon,
    wait_for_event,
    wait_until,
    write_model_dir,
)


@pytest.fixture
def daemon(tmp_path: Path):
    model = write_model_dir(tmp_path / "tiny", ["a", "b", "c", "d"], vocab_size=40, seed=5)
    (tmp_path / "conf.d").mkdir()
    proc = start_daemon(
        tmp_path,
        {
            "models": {"target": str(model), "draft_layers": [0, 1]},
            "sampling": {"max_tokens": 5},
            "training": {"enabled": False},
            # Model-draft rounds only: this tiny model repeats itself, and copying from its own
            # output would finish test_second_signal_exits_at_once's long request at once.
            "speculative": {"lookup": False, "suffix_tokens": 0},
        },
    )
    log = tmp_path / "data" / "logs" / "specd.log"
    try:
        wait_for_event(log, "ready", proc)
        runtime = json.loads((tmp_path / "data" / "runtime.json").read_text())
        yield proc, tmp_path, log, runtime["url"]
    finally:
        stop_daemon(proc)


def events(log: Path, name: str) -> list[dict]:
    return [r for r in read_log(log) if r.get("event") == name]


def wait_events(log: Path, name: str, count: int) -> list[dict]:
    wait_until(lambda: len(events(log, name)) >= count, f"{count} {name!r} events in {log}")
    return events(log, name)


def completion_tokens(url: str) -> int:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "a b c"}, timeout=HANG_GUARD_S)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["completion_tokens"]


def test_drop_ins_apply_live(daemon) -> None:
    proc, tmp_path, log, url = daemon
    conf_d = tmp_path / "conf.d"
    assert completion_tokens(url) == 5

    (conf_d / "10-tokens.yaml").write_text("sampling:\n  max_tokens: 7\n")  # created
    rec = wait_events(log, "config_reloaded", 1)[-1]
    assert rec["changed"] == ["sampling.max_tokens"] and rec["applied"] == ["sampling.max_tokens"]
    assert completion_tokens(url) == 7

    (conf_d / "10-tokens.yaml").write_text("sampling:\n  max_tokens: 9\n")  # edited
    wait_events(log, "config_reloaded", 2)
    assert completion_tokens(url) == 9

    tmp = conf_d / ".20-level.yaml.tmp"  # an editor saving by rename
    tmp.write_text("logging:\n  level: debug\nserver:\n  port: 1\n")
    tmp.rename(conf_d / "20-level.yaml")
    rec = wait_events(log, "config_reloaded", 3)[-1]
    assert rec["changed"] == ["logging.level", "server.port"]
    assert rec["applied"] == ["logging.level"]
    assert wait_events(log, "config_needs_restart", 1)[-1]["keys"] == ["server.port"]
    # the running value stays in force until a restart, and /status says one is pending
    status = httpx.get(f"{url}/status", timeout=HANG_GUARD_S).json()
    assert status["pending_restart"] == ["server.port"]

    bad = conf_d / "30-bad.yaml"
    bad.write_text("sampling:\n  max_tokens: many\n")  # invalid: old settings stay
    err = wait_events(log, "config_reload_rejected", 1)[-1]
    assert str(bad) in err["error"] and "sampling.max_tokens" in err["error"]
    assert completion_tokens(url) == 9
    bad.unlink()
    wait_events(log, "config_reloaded", 4)

    (conf_d / "10-tokens.yaml").unlink()  # deleted: back to the main file's value
    wait_events(log, "config_reloaded", 5)
    assert completion_tokens(url) == 5
    assert proc.poll() is None


def test_sighup_reloads(daemon) -> None:
    proc, tmp_path, log, url = daemon
    cfg = tmp_path / "config.yaml"
    data = json.loads(cfg.read_text())
    data["sampling"]["max_tokens"] = 6
    # Written while nothing watches would be too easy: SIGHUP must reload by itself too.
    cfg.write_text(json.dumps(data))
    proc.send_signal(signal.SIGHUP)
    wait_events(log, "config_reloaded", 1)
    assert completion_tokens(url) == 6
    assert proc.poll() is None


def test_log_file_survives_rotation(daemon) -> None:
    proc, tmp_path, log, url = daemon
    completion_tokens(url)
    # the record is logged just after the response's last byte: wait for it before the move
    wait_until(lambda: events(log, "request_finished"), "the first request's record")
    log.rename(log.with_name("specd.log.1"))  # logrotate / newsyslog move it away
    completion_tokens(url)
    # the daemon reopens the path: the new file gets the next request's record
    wait_until(lambda: log.exists() and events(log, "request_finished"), "a record in the new file")
    rotated = log.with_name("specd.log.1")
    assert len(events(rotated, "request_finished")) == 1  # the first request, before the move
    assert len(events(log, "request_finished")) == 1  # the second, in the reopened file


def test_second_signal_exits_at_once(daemon) -> None:
    proc, tmp_path, log, url = daemon
    conf = tmp_path / "conf.d" / "50-slow.yaml"
    conf.write_text("server:\n  shutdown_timeout: 120\n")
    wait_events(log, "config_reloaded", 1)

    # A long request in flight (this tiny model mostly emits ids its tokenizer cannot show, so
    # a stream would have nothing to send: use a plain request and watch the worker instead).
    outcome: list[object] = []

    def long_request() -> None:
        try:
            r = httpx.post(
                f"{url}/v1/completions",
                timeout=HANG_GUARD_S,
                json={"prompt": "a", "max_tokens": 4000},
            )
            outcome.append(r.status_code)
        except httpx.HTTPError as e:
            outcome.append(e)

    t = threading.Thread(target=long_request, daemon=True)
    t.start()
    wait_until(lambda: httpx.get(f"{url}/status").json()["queue"]["active"], "request running")
    proc.send_signal(signal.SIGTERM)
    assert wait_events(log, "shutting_down", 1)[-1]["in_flight"] == 1
    assert proc.poll() is None  # draining: it waits for the in-flight request
    proc.send_signal(signal.SIGTERM)
    proc.wait(HANG_GUARD_S)
    t.join(HANG_GUARD_S)
    # It exited at once: the long request was cut off (the connection dropped, or a 5xx as the
    # worker stopped under it), not finished: a full drain would have answered 200.
    assert outcome and (isinstance(outcome[0], httpx.HTTPError) or outcome[0] != 200), outcome
    assert not [r for r in events(log, "request_finished") if r.get("completion_tokens") == 4000]
    assert not (tmp_path / "data" / "runtime.json").exists()


def test_drop_ins_are_seen_from_an_empty_home(tmp_path: Path) -> None:
    """A new user's first start: no config directory exists; the daemon creates it and its
    conf.d, and a drop-in written afterwards applies live."""
    import os
    import sys

    home = tmp_path / "home"
    home.mkdir()
    model = write_model_dir(tmp_path / "tiny", ["a", "b", "c", "d"], vocab_size=40, seed=5)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPECD_", "XDG_"))}
    env.pop("LD_PRELOAD", None)
    env.update(
        HOME=str(home),
        SPECD_MODELS__TARGET=str(model),
        SPECD_MODELS__DRAFT_LAYERS="[0, 1]",
        SPECD_SERVER__PORT="0",
        SPECD_TRAINING__ENABLED="false",
    )
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "serve", "--data-dir", str(data)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = data / "logs" / "specd.log"
    try:
        wait_for_event(log, "ready", proc)
        conf_d = home / ".config" / "specd" / "conf.d"
        watching = events(log, "config_watch_started")[-1]["watching"]
        assert str(conf_d) in watching and conf_d.is_dir()
        url = json.loads((data / "runtime.json").read_text())["url"]
        (conf_d / "10-tokens.yaml").write_text("sampling:\n  max_tokens: 3\n")
        wait_events(log, "config_reloaded", 1)
        assert completion_tokens(url) == 3
    finally:
        stop_daemon(proc)
