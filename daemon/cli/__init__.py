"""The ``specd`` command line: dispatch to each command's body (the parser is
`daemon.cli.parser`, the benchmarks' part of it `daemon.cli.bench`, what they share
`daemon.cli.args`).

Modelled on mlx-lm's ``cli.py``: a command's body lives with its subject, as a function
``run(args, settings, sources) -> int`` (``run_<action>`` where one module serves several
actions of a command group, as ``daemon.ops.buffer`` does). A subparser names its body as
``"module:function"``, imported only when that command runs, so ``specd --help`` or
``specd status`` never load MLX, and the OpenBLAS re-exec in `entry` happens before MLX does.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any, cast

from daemon.cli.parser import build_parser
from daemon.config import ConfigSources, Settings, load_settings
from daemon.core.backend import launch_rank, maybe_reexec_with_openblas
from daemon.errors import ConfigError, SpecdError

__all__ = ["build_parser", "entry", "main", "serve"]

# A command body: the parsed arguments, the loaded settings and where they came from -> exit code.
Handler = Callable[[argparse.Namespace, Settings, ConfigSources], int]


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"paths.data_dir": getattr(args, "data_dir", None)}
    if getattr(args, "host", None) is not None:
        out["server.host"] = args.host
    if getattr(args, "port", None) is not None:
        out["server.port"] = args.port
    return out


def serve(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd serve``'s body."""
    # `Server` owns serving; it needs the command-line overrides again for config reloads.
    from daemon.core.distributed import detect_group
    from daemon.server import Server
    from daemon.serving.distributed import run_follower

    group = detect_group()  # started by mlx.launch: rank 0 serves, the others follow it
    if group is not None and group.rank > 0:
        return run_follower(settings, group)
    return Server(settings, sources, overrides=_overrides(args), group=group).run()


def _load(args: argparse.Namespace) -> tuple[Settings, ConfigSources] | None:
    try:
        return load_settings(args.config, _overrides(args))
    except ConfigError as e:
        print(f"specd: {e}", file=sys.stderr)
        return None


def _body(func: Handler | str) -> Handler:
    """The command body a subparser names, as ``"module:function"`` or a function."""
    if isinstance(func, str):
        module, _, name = func.partition(":")
        return cast(Handler, getattr(importlib.import_module(module), name))
    return func


def _run(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    from daemon.logging import configure_logging, get_logger

    # One-shot commands print their own results; their log events go to the file only.
    console = settings.logging.console if args.command == "serve" else "off"
    log_file = settings.log_file if getattr(args, "log_to_file", True) else None
    if args.command == "serve" and (launch_rank() or 0) > 0:
        log_file = None  # ranks other than 0 never write into the (maybe shared) data dir
    configure_logging(settings.logging.level, log_file, console)
    try:
        return _body(args.func)(args, settings, sources)
    except KeyboardInterrupt:
        return 130
    except SpecdError as e:
        # Known failure kinds carry a message meant for the user; anything else is a bug.
        get_logger("cli").error("failed", error=str(e))
        print(f"specd: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Run one ``specd`` command in this process; returns its exit code.

    Never re-executes the process, so tests and other callers can use it in-process; the
    console script goes through `entry`.
    """
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    loaded = _load(args)
    if loaded is None:
        return 2
    return _run(args, *loaded)


def entry() -> int:
    """The ``specd`` console script and ``python -m daemon``.

    A command that loads models may first re-execute this process with the system OpenBLAS
    preloaded (Linux, `daemon.core.backend`): ``exec`` replaces the whole process, so only
    the program's own entry point may do it, never `main`.
    """
    argv = sys.argv[1:]
    args = build_parser().parse_args(argv)
    loaded = _load(args)
    if loaded is None:
        return 2
    settings, _ = loaded
    if getattr(args, "needs_mlx", False):
        maybe_reexec_with_openblas(settings.models.preload_openblas, argv)
    return _run(args, *loaded)


if __name__ == "__main__":
    sys.exit(entry())
