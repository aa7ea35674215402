"""The daemon as a service: live drop-in reloads, SIGHUP, log rotation, signals (real process)."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import read_log, start_daemon, wait_for_event, write_model_dir


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
        },
    )
    log = tmp_path / "data" / "logs" / "specd.log"
    try:
        wait_for_event(log, "ready", proc)
        runtime = json.loads((tmp_path / "data" / "runtime.json").read_text())
        yield proc, tmp_path, log, runtime["url"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def events(log: Path, name: str) -> list[dict]:
    return [r for r in read_log(log) if r.get("event") == name]


def wait_events(log: Path, name: str, count: int, timeout: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = events(log, name)
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} {name!r} events in {log}")


def completion_tokens(url: str) -> int:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "a b c"}, timeout=60)
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
    log.rename(log.with_name("specd.log.1"))  # logrotate / newsyslog move it away
    completion_tokens(url)
    deadline = time.monotonic() + 10
    while not (log.exists() and events(log, "request_finished")):
        assert time.monotonic() < deadline, "the daemon kept writing to the rotated file"
        time.sleep(0.1)


def test_second_signal_exits_at_once(daemon) -> None:
    proc, tmp_path, log, url = daemon
    conf = tmp_path / "conf.d" / "50-slow.yaml"
    conf.write_text("server:\n  shutdown_timeout: 120\n")
    wait_events(log, "config_reloaded", 1)

    # A long request in flight (this tiny model mostly emits ids its tokenizer cannot show, so
    # a stream would have nothing to send: use a plain request and watch the worker instead).
    def long_request() -> None:
        try:
            httpx.post(
                f"{url}/v1/completions", timeout=120, json={"prompt": "a", "max_tokens": 4000}
            )
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=long_request, daemon=True)
    t.start()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert wait_events(log, "shutting_down", 1)[-1]["in_flight"] == 1
    time.sleep(0.5)
    assert proc.poll() is None  # still finishing the in-flight stream
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    assert time.monotonic() - t0 < 15
    assert not (tmp_path / "data" / "runtime.json").exists()
