"""The ``specd`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.backend import maybe_reexec_with_openblas
from daemon.config import ConfigError, ConfigSources, Settings, load_settings

Handler = Callable[[argparse.Namespace, Settings, ConfigSources], int]


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common options")
    g.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="main config file (default: $SPECD_CONFIG or the platform config dir); "
        "drop-ins are read from conf.d/ next to it",
    )
    g.add_argument(
        "--data-dir",
        type=Path,
        metavar="PATH",
        help="where the daemon keeps its buffer, adapters, imported models and logs",
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"paths.data_dir": getattr(args, "data_dir", None)}
    if getattr(args, "host", None) is not None:
        out["server.host"] = args.host
    if getattr(args, "port", None) is not None:
        out["server.port"] = args.port
    return out


def cmd_serve(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    from daemon.server import Server

    return Server(settings, sources).run()


def cmd_import_gguf(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    from daemon.gguf import import_gguf

    out = import_gguf(args.gguf, args.outdir, overwrite=args.overwrite)
    print(f"imported {args.gguf} -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specd",
        description="A resident speculative-decoding daemon whose draft model adapts to your "
        "traffic.",
    )
    parser.add_argument("--version", action="version", version=f"specd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "serve",
        help="load the models and serve until stopped",
        description="Load the target and draft models and serve in the "
        "foreground until SIGINT/SIGTERM.",
    )
    _common(p)
    p.add_argument("--host", help="address to bind (default from server.host)")
    p.add_argument("--port", type=int, help="port to bind (default from server.port)")
    p.set_defaults(func=cmd_serve, needs_mlx=True)

    p = sub.add_parser("models", help="manage models", description="Manage models.")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    q = msub.add_parser(
        "import-gguf",
        help="convert a llama GGUF file into an MLX model directory",
        description="Convert a llama-architecture GGUF file (Q4_0, Q4_1, Q8_0, "
        "F16, F32 tensors) into an MLX model directory that "
        "mlx_lm.load opens.",
    )
    _common(q)
    q.add_argument("gguf", type=Path, metavar="GGUF")
    q.add_argument("outdir", type=Path, metavar="OUTDIR")
    q.add_argument("--overwrite", action="store_true", help="replace an existing OUTDIR")
    q.set_defaults(func=cmd_import_gguf, needs_mlx=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``specd`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        settings, sources = load_settings(args.config, _overrides(args))
    except ConfigError as e:
        print(f"specd: {e}", file=sys.stderr)
        return 2
    if getattr(args, "needs_mlx", False):
        maybe_reexec_with_openblas(settings.models.preload_openblas, argv)

    from daemon.logging import configure_logging, get_logger

    configure_logging(settings.logging.level, settings.log_file, settings.logging.console)
    handler: Handler = args.func
    try:
        return handler(args, settings, sources)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        # Known failure kinds carry a message meant for the user; anything else is a bug.
        from daemon.gguf import GGUFImportError
        from daemon.models import ModelLoadError

        if isinstance(e, ModelLoadError | GGUFImportError | ConfigError):
            get_logger("cli").error("failed", error=str(e))
            print(f"specd: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
