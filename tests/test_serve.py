"""`specd serve` as a real process: start-up logs, ready, clean exit on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.backend import REEXEC_MARKER, find_openblas
from tests.test_models import write_model_dir


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_event(path: Path, event: str, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rec in read_log(path):
            if rec.get("event") == event:
                return rec
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited early: {proc.returncode}\n{proc.stderr.read()}")
        time.sleep(0.2)
    raise AssertionError(f"no {event!r} in {path} within {timeout}s")


def start_daemon(tmp_path: Path, config: dict, env_extra: dict | None = None) -> subprocess.Popen:
    cfg = tmp_path / "config.yaml"
    config = {**config, "server": {"port": 0, **config.get("server", {})}}  # never 8765
    cfg.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECD_")}
    env.pop("LD_PRELOAD", None)  # the entry point must find OpenBLAS by itself
    env.pop(REEXEC_MARKER, None)
    env.update(env_extra or {})
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon",
            "serve",
            "--config",
            str(cfg),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path / "tiny", ["a", "b", "c"], vocab_size=40, seed=3)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_logs_ready_and_exits_cleanly(tmp_path: Path, tiny_dir: Path, sig: int) -> None:
    proc = start_daemon(tmp_path, {"models": {"target": str(tiny_dir), "draft_layers": [0, 5]}})
    try:
        log_file = tmp_path / "data" / "logs" / "specd.log"
        loaded = wait_for_event(log_file, "models_loaded", proc)
        wait_for_event(log_file, "ready", proc)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    records = read_log(log_file)
    for rec in records:  # one JSON object per line with the fixed fields
        assert {"timestamp", "level", "event", "component"} <= rec.keys()
    starting = next(r for r in records if r["event"] == "starting")
    assert str(tmp_path / "config.yaml") in starting["config_sources"]
    assert loaded["target_path"] == str(tiny_dir)
    assert loaded["draft_kind"] == "layer-skip"
    assert loaded["dtype"] == "float32"
    assert loaded["backend"] == "cpu"
    if sys.platform.startswith("linux") and find_openblas():
        assert loaded["blas"].startswith("openblas")  # re-executed with OpenBLAS preloaded
    assert records[-1]["event"] == "stopped"


def test_serve_openblas_opt_out(tmp_path: Path, tiny_dir: Path) -> None:
    proc = start_daemon(
        tmp_path,
        {"models": {"target": str(tiny_dir), "draft_layers": [0], "preload_openblas": False}},
    )
    try:
        loaded = wait_for_event(tmp_path / "data" / "logs" / "specd.log", "models_loaded", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    assert not loaded["blas"].startswith("openblas")


def test_serve_bad_model_fails_with_clear_message(tmp_path: Path) -> None:
    proc = start_daemon(tmp_path, {"models": {"target": str(tmp_path / "missing-model")}})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "missing-model" in err
