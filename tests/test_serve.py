"""`specd serve` as a real process: start-up logs, ready, clean exit on SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from daemon.core.backend import find_openblas
from tests.helpers import HANG_GUARD_S, read_log, start_daemon, wait_for_event, write_model_dir


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
        assert proc.wait(timeout=HANG_GUARD_S) == 0
    finally:
        proc.kill()
        proc.wait()
    records = read_log(log_file)
    for rec in records:  # one JSON object per line with the fixed fields
        assert {"timestamp", "level", "event", "component"} <= rec.keys()
    starting = next(r for r in records if r["event"] == "starting")
    assert str(tmp_path / "config.yaml") in starting["config_sources"]
    assert loaded["target_path"] == str(tiny_dir)
    assert loaded["draft_kind"] == "feature"  # models.draft: auto; layer-skip serves until trained
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
        assert proc.wait(timeout=HANG_GUARD_S) == 0
    finally:
        proc.kill()
        proc.wait()
    assert not loaded["blas"].startswith("openblas")


def test_serve_bad_model_fails_with_clear_message(tmp_path: Path) -> None:
    proc = start_daemon(tmp_path, {"models": {"target": str(tmp_path / "missing-model")}})
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 1
    assert "missing-model" in err
