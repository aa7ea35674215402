"""The command line's entry points: `main` runs in-process, only `entry` may re-exec."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from daemon import cli
from daemon.core import backend

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the OpenBLAS re-exec is Linux-only"
)


class Exec(Exception):
    """Raised by the patched os.exec*: the process would have been replaced."""


@pytest.fixture
def reexec_possible(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every condition for the OpenBLAS re-exec holds; the exec itself only records its call."""
    calls: list[tuple] = []

    def fake_exec(*args: object) -> None:
        calls.append(args)
        raise Exec

    monkeypatch.setattr(os, "execve", fake_exec)
    monkeypatch.setattr(os, "execv", fake_exec)
    monkeypatch.setattr(backend, "find_openblas", lambda: "/usr/lib/libopenblas.so.0")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(backend.REEXEC_MARKER, raising=False)
    monkeypatch.delenv("SPECD_MODELS__PRELOAD_OPENBLAS", raising=False)
    return calls


def test_main_never_reexecs(
    tmp_path: Path, reexec_possible: list[tuple], capsys: pytest.CaptureFixture[str]
) -> None:
    # `collect` loads models (needs_mlx): the console script would re-exec before running it.
    assert cli.main(["collect", "--data-dir", str(tmp_path / "data"), "-q"]) == 1
    assert reexec_possible == []
    assert "nothing to collect" in capsys.readouterr().err


def test_entry_reexecs_with_openblas_first(
    tmp_path: Path, reexec_possible: list[tuple], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["collect", "--data-dir", str(tmp_path / "data"), "-q"]
    monkeypatch.setattr(sys, "argv", ["specd", *argv])
    with pytest.raises(Exec):
        cli.entry()
    ((exe, exec_argv, env),) = reexec_possible
    assert exec_argv == [sys.executable, "-m", "daemon", *argv]
    assert env["LD_PRELOAD"].startswith("/usr/lib/libopenblas.so.0")
    assert env[backend.REEXEC_MARKER] == "1"
