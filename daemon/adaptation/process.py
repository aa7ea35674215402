"""A training run in its own process: ``python -m daemon.adaptation.process``.

The daemon and ``specd train`` never train in their own process: `start_training_process`
spawns this module (at lower priority with ``--nice``) and the caller reads its result file
after ``wait()`` (`daemon.store.runs.read_result`), so a crash, NaN storm or out-of-memory
cannot take the server down. The child runs `daemon.adaptation.run.run_training` and writes
a `TrainingResult` atomically in every case it survives (SIGTERM included: a clean failure); a
missing result file tells the reader the process died, and how.

Exit codes: 0 = ok, 1 = the run failed (or was cancelled), 2 = bad configuration, 130 = Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.core.backend import (
    launcher_free_environment,
    maybe_reexec_with_openblas,
    openblas_env,
)
from daemon.errors import TrainingError
from daemon.logging import get_logger
from daemon.store.runs import TrainingResult, progress_file_for, steps_file_for, write_result

log = get_logger("training")

MODULE = "daemon.adaptation.process"

PathArg = str | os.PathLike[str]


@dataclass(frozen=True)
class TrainingArgs:
    """The arguments of one training process (its command line, as data)."""

    out_dir: PathArg
    result_file: PathArg
    config: PathArg | None = None
    # the parent's effective settings (`settings_snapshot`): wins over config and environment
    settings_file: PathArg | None = None
    data_dir: PathArg | None = None
    epochs: int | None = None
    max_steps: int | None = None
    init_adapter: PathArg | None = None
    run_id: str | None = None
    progress: bool = False
    console: str = "off"
    nice: int = 0
    # rank 0 of a group: the target stays unread but for the draft's share (it may not fit
    # one machine); step costs come from the live engine, not from timing the target here
    draft_only: bool = False
    # train on this target's buffer rows only (a daemon serving several models); None: all
    target: str | None = None


def training_command(args: TrainingArgs, python: str | None = None) -> list[str]:
    """The argv of ``python -m daemon.adaptation.process`` for ``args``."""
    cmd = [python or sys.executable, "-m", MODULE]
    if args.config is not None:
        cmd += ["--config", str(args.config)]
    if args.settings_file is not None:
        cmd += ["--settings", str(args.settings_file)]
    if args.data_dir is not None:
        cmd += ["--data-dir", str(args.data_dir)]
    cmd += ["--out", str(args.out_dir), "--result", str(args.result_file)]
    cmd += ["--console", args.console]
    if args.epochs is not None:
        cmd += ["--epochs", str(args.epochs)]
    if args.max_steps is not None:
        cmd += ["--max-steps", str(args.max_steps)]
    if args.init_adapter is not None:
        cmd += ["--init-adapter", str(args.init_adapter)]
    if args.run_id is not None:
        cmd += ["--run-id", args.run_id]
    if args.progress:
        cmd.append("--progress")
    if args.nice:
        cmd += ["--nice", str(args.nice)]
    if args.draft_only:
        cmd.append("--draft-only")
    if args.target is not None:
        cmd += ["--target", args.target]
    return cmd


def start_training_process(
    args: TrainingArgs,
    *,
    preload_openblas: bool = True,
    env: dict[str, str] | None = None,
    **popen_kwargs: Any,
) -> subprocess.Popen[Any]:
    """Spawn a training run in its own process; `read_result` its ``result_file`` after wait().

    A stale result (and progress) file is removed first. On Linux the child gets the system
    OpenBLAS in ``LD_PRELOAD`` (as the CLI's re-exec does) unless ``preload_openblas`` is False.
    ``args.nice`` lowers the child's priority (the child calls ``os.nice``; no ``preexec_fn``,
    which is unsafe in a threaded parent). ``popen_kwargs`` go to `subprocess.Popen` (stdout,
    stderr, ...).
    """
    Path(args.result_file).unlink(missing_ok=True)
    progress_file_for(args.result_file).unlink(missing_ok=True)
    steps_file_for(args.result_file).unlink(missing_ok=True)
    # a daemon serving as rank 0 of a group: the child trains alone, it must not join
    child_env = launcher_free_environment(dict(os.environ if env is None else env))
    if (
        preload_openblas
        and sys.platform.startswith("linux")
        and "openblas" not in child_env.get("LD_PRELOAD", "")
    ):
        child_env = openblas_env(child_env) or child_env
    # the child imports this package from where the parent did, whatever its cwd
    repo_root = str(Path(__file__).resolve().parents[2])
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (repo_root, child_env.get("PYTHONPATH", "")) if p
    )
    cmd = training_command(args)
    log.info("train_process_start", argv=cmd)
    return subprocess.Popen(cmd, env=child_env, **popen_kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="One LoRA training run of the draft on the replay buffer, in its own "
        "process; writes a JSON result file.",
    )
    p.add_argument("--config", type=Path, metavar="PATH", help="main config file")
    p.add_argument(
        "--settings",
        type=Path,
        metavar="FILE.json",
        help="the parent's effective settings (config files and environment are not read)",
    )
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="data dir (buffer, models)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="adapter output dir")
    p.add_argument("--result", type=Path, required=True, metavar="FILE.json", help="result file")
    p.add_argument("--epochs", type=int, help="default: training.epochs")
    p.add_argument("--max-steps", type=int, help="cap on optimizer steps")
    p.add_argument("--init-adapter", type=Path, metavar="DIR", help="continue this adapter")
    p.add_argument("--run-id", help="id recorded on the used buffer rows")
    p.add_argument("--progress", action="store_true", help="tqdm progress bar on stderr")
    p.add_argument(
        "--console", choices=("off", "pretty", "json"), default="off", help="log to stderr too"
    )
    p.add_argument("--nice", type=int, default=0, help="lower this process's priority by N")
    p.add_argument(
        "--draft-only",
        action="store_true",
        help="read only the target weights the draft uses (a target served across ranks)",
    )
    p.add_argument(
        "--no-mark-used", action="store_true", help="do not mark the failures used (benchmarks)"
    )
    p.add_argument("--target", help="train on this target's buffer rows only (default: all)")
    return p


def _maybe_reexec(enabled: bool, argv: list[str]) -> None:
    """Like the CLI's OpenBLAS re-exec, re-running this module."""
    maybe_reexec_with_openblas(enabled, argv, module=MODULE)


def main(argv: list[str] | None = None, *, standalone: bool = False) -> int:
    """Entry point of ``python -m daemon.adaptation.process``: 0 = ok, 1 = the run failed (also
    on SIGTERM), 2 = bad configuration. The result file is written in every case the process
    survives. ``standalone`` (the process's own entry point): re-exec once with OpenBLAS
    preloaded if the parent did not, and turn SIGTERM into a clean failure."""
    from daemon.adaptation.run import run_training
    from daemon.config import load_settings, read_settings_snapshot
    from daemon.errors import ConfigError
    from daemon.logging import configure_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.settings is not None:
            settings = read_settings_snapshot(args.settings)
        else:
            settings, _ = load_settings(
                args.config,
                {"paths.data_dir": str(args.data_dir) if args.data_dir else None},
            )
    except ConfigError as e:
        write_result(args.result, TrainingResult.failure(str(e)))
        print(f"specd train: {e}", file=sys.stderr)
        return 2
    if standalone:
        _maybe_reexec(settings.models.preload_openblas, argv)

        def _terminate(signum: int, _frame: Any) -> None:
            raise TrainingError(f"cancelled by {signal.Signals(signum).name}")

        signal.signal(signal.SIGTERM, _terminate)
    if args.nice:
        try:
            os.nice(args.nice)
        except OSError:
            pass
    configure_logging(settings.logging.level, settings.log_file, args.console)
    try:
        metrics = run_training(
            settings,
            out_dir=args.out,
            epochs=args.epochs,
            max_steps=args.max_steps,
            init_adapter=args.init_adapter,
            run_id=args.run_id,
            progress=args.progress,
            mark_used=not args.no_mark_used,
            progress_file=progress_file_for(args.result),
            steps_file=steps_file_for(args.result),
            draft_only=args.draft_only,
            target=args.target,
        )
    except BaseException as e:  # noqa: BLE001 - every failure must reach the result file
        msg = f"{type(e).__name__}: {e}" if not isinstance(e, TrainingError) else str(e)
        log.error("train_failed", error=msg, traceback=traceback.format_exc(limit=8))
        write_result(args.result, TrainingResult.failure(msg))
        print(f"specd train: {msg}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    write_result(args.result, TrainingResult.success(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main(standalone=True))
