"""The ``specd`` command line."""

from __future__ import annotations

import argparse
import json
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


def _print_table(rows: dict[str, dict[str, Any]], columns: list[str]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return "-" if v is None else str(v)

    table = [["row", *columns]] + [
        [name, *(fmt(r.get(c)) for c in columns)] for name, r in rows.items()
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


def _write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {path}")


def cmd_bench_speed(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    from daemon.bench import bench_speed
    from daemon.models import load_pair
    from daemon.prompts import read_prompts

    prompts = [p.messages for p in read_prompts(args.prompts, limit=args.limit)]
    pair = load_pair(settings)
    k = args.num_draft_tokens or settings.speculative.num_draft_tokens
    print(
        f"bench speed: {len(prompts)} prompts, max_tokens={args.max_tokens}, k={k}, "
        f"target={pair.target_id}, draft={pair.draft_id}"
    )
    result = bench_speed(pair.target, pair.draft, pair.tokenizer, prompts, args.max_tokens, k)
    rows = {k: v for k, v in result.items() if isinstance(v, dict)}
    _print_table(
        rows,
        [
            "tokens_per_s",
            "ratio_vs_target",
            "acceptance_rate",
            "mean_accepted_length",
            "target_passes_per_token",
            "identical_to_target",
        ],
    )
    print(f"bookkeeping_overhead: {result['bookkeeping_overhead']:.2%}")
    _write_json(args.json, result)
    return 0


def _candidate(text: str) -> tuple[str, list[int]]:
    name, _, spec = text.rpartition("=")
    layers: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        layers += list(range(int(lo), int(hi or lo) + 1))
    return name or spec, layers


def cmd_bench_draft(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    from daemon.bench import bench_draft
    from daemon.models import load_pair
    from daemon.prompts import read_prompts

    prompts = [p.messages for p in read_prompts(args.prompts, limit=args.limit)]
    pair = load_pair(settings)
    candidates = dict(_candidate(c) for c in args.candidate)
    result = bench_draft(pair.target, pair.tokenizer, prompts, candidates, args.max_tokens)
    _print_table(result, ["layers", "heldout_agreement", "step_ms", "cost_ratio"])
    _write_json(args.json, result)
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

    p = sub.add_parser(
        "bench",
        help="benchmarks (print a table, optionally write JSON)",
        description="Benchmarks on the configured model pair.",
    )
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    q = bsub.add_parser(
        "speed",
        help="target-only vs mlx-lm speculative vs specd, side by side",
        description="Greedy decoding speed on the same prompts, in one process: "
        "target-only (mlx-lm), mlx-lm's speculative path with the "
        "same draft, specd's engine with fixed and adaptive k.",
    )
    _common(q)
    _prompt_args(q, limit=8, max_tokens=64)
    q.add_argument(
        "--num-draft-tokens",
        type=int,
        metavar="K",
        help="draft tokens per round (default: speculative.num_draft_tokens)",
    )
    q.set_defaults(func=cmd_bench_speed, needs_mlx=True)

    q = bsub.add_parser(
        "draft",
        help="layer-skip draft candidates: agreement and cost per token",
        description="Teacher-forced agreement of layer-skip drafts with the "
        "target's greedy answers, and their decode cost relative to "
        "the target.",
    )
    _common(q)
    _prompt_args(q, limit=16, max_tokens=64)
    q.add_argument(
        "--candidate",
        action="append",
        required=True,
        metavar="NAME=LAYERS",
        help="e.g. 'first4=0-3' or 'ends=0,1,28,29' (repeatable)",
    )
    q.set_defaults(func=cmd_bench_draft, needs_mlx=True)
    return parser


def _prompt_args(p: argparse.ArgumentParser, limit: int, max_tokens: int) -> None:
    p.add_argument(
        "--prompts",
        type=Path,
        required=True,
        metavar="FILE.jsonl",
        help="JSON Lines, one object per line with 'prompt' or 'messages'",
    )
    p.add_argument("--limit", type=int, default=limit, help=f"prompts to use (default {limit})")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=max_tokens,
        help=f"new tokens per prompt (default {max_tokens})",
    )
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")


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
        from daemon.prompts import PromptFileError

        if isinstance(e, ModelLoadError | GGUFImportError | ConfigError | PromptFileError):
            get_logger("cli").error("failed", error=str(e))
            print(f"specd: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
