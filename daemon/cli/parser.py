"""``specd``'s argument parser: one function per command, adding its subparser (the
benchmarks' in `daemon.cli.bench`); each names its body as ``"module:function"``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from daemon import __version__
from daemon.cli.args import DRAFT_HELP, common, parse_date
from daemon.cli.bench import add_bench

if TYPE_CHECKING:
    from daemon.cli.args import Commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specd",
        description="A resident speculative-decoding daemon whose draft model adapts to your "
        "traffic.",
    )
    parser.add_argument("--version", action="version", version=f"specd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _train(sub)
    _adapters(sub)
    _serve(sub)
    _models(sub)
    _collect(sub)
    _warmup(sub)
    _buffer(sub)
    _status(sub)
    _logs(sub)
    _service(sub)
    add_bench(sub)
    return parser


def _train(sub: Commands) -> None:
    p = sub.add_parser(
        "train",
        help="train the draft on the buffer now (through the same gate)",
        description="Train the draft's LoRA adapter on the pending failure cases (plus replay) "
        "in a subprocess, print held-out agreement before and after, and install the adapter "
        "only if it beats the one in service by training.min_improvement. Uses the running "
        "daemon when there is one.",
    )
    common(p)
    p.add_argument("--epochs", type=int, help="passes over the examples (training.epochs)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func="daemon.ops.train:run_train", needs_mlx=True)


def _adapters(sub: Commands) -> None:
    p = sub.add_parser(
        "adapters",
        help="list adapter versions or roll back",
        description="List the stored adapter versions, or put another one in "
        "service (live when the daemon runs).",
    )
    p.add_argument("action", choices=["list", "rollback"])
    p.add_argument(
        "version",
        type=int,
        nargs="?",
        help="rollback target (default: the installed version before the current; 0 = no adapter)",
    )
    common(p)
    p.set_defaults(func="daemon.ops.train:run_adapters", log_to_file=False)


def _serve(sub: Commands) -> None:
    p = sub.add_parser(
        "serve",
        help="load the models and serve until stopped",
        description="Load the target and draft models and serve in the "
        "foreground until SIGINT/SIGTERM.",
    )
    common(p)
    p.add_argument("--host", help="address to bind (default from server.host)")
    p.add_argument("--port", type=int, help="port to bind (default from server.port)")
    p.set_defaults(func="daemon.cli:serve", needs_mlx=True)


def _models(sub: Commands) -> None:
    p = sub.add_parser("models", help="manage models", description="Manage models.")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    q = msub.add_parser(
        "list",
        help="the models served (models.target and models.targets), loaded or not",
        description="The models the daemon serves, by the name a request gives: "
        "models.target first, then models.targets; with the daemon running, whether each "
        "is loaded now and its draft adapter version.",
    )
    common(q)
    q.set_defaults(func="daemon.ops.models:run_list", needs_mlx=False)
    q = msub.add_parser(
        "add",
        help="serve another model by name (a drop-in; a running daemon adds it live)",
        description="Write conf.d/60-model-NAME.yaml with models.targets.NAME: a running "
        "daemon serves the model from then on (loaded on its first request), the others "
        "untouched; it adapts its own draft on its own traffic.",
    )
    common(q)
    q.add_argument("name", metavar="NAME", help="the name requests give in 'model'")
    q.add_argument("target", metavar="PATH_OR_REPO", help="an MLX model directory or HF repo id")
    q.add_argument("--draft", metavar="KIND_OR_MODEL", help=DRAFT_HELP)
    q.add_argument(
        "--draft-layers", metavar="I,J,...", help="layer-skip draft layers (default: models.*)"
    )
    q.add_argument(
        "--feature-layers",
        metavar="I,J,...",
        help="target layers a feature draft reads besides the final ones (default: models.*)",
    )
    q.set_defaults(func="daemon.ops.models:run_add", needs_mlx=False)
    q = msub.add_parser(
        "remove",
        help="stop serving a model `models add` added (a running daemon drops it live)",
        description="Delete the drop-in `specd models add NAME` wrote; a running daemon stops "
        "serving the model (its stored adapters stay in the data dir).",
    )
    common(q)
    q.add_argument("name", metavar="NAME")
    q.set_defaults(func="daemon.ops.models:run_remove", needs_mlx=False)
    q = msub.add_parser(
        "pull",
        help="download an MLX model from Hugging Face and serve it (models add)",
        description="Download REPO with mlx-lm's Hugging Face download (a local directory is "
        "taken as it is), then `specd models add` it under --name (default: the repo's last "
        "part).",
    )
    common(q)
    q.add_argument("repo", metavar="REPO", help="e.g. mlx-community/Qwen2.5-Coder-7B-Instruct-4bit")
    q.add_argument("--name", help="the name requests give (default: the repo's last part)")
    q.add_argument("--draft", metavar="KIND_OR_MODEL", help=DRAFT_HELP)
    q.add_argument("--draft-layers", metavar="I,J,...", help="layer-skip draft layers")
    q.add_argument("--feature-layers", metavar="I,J,...", help="as for models add")
    q.set_defaults(func="daemon.ops.models:run_pull", needs_mlx=False)
    q = msub.add_parser(
        "import-gguf",
        help="convert a llama GGUF file into an MLX model directory",
        description="Convert a llama-architecture GGUF file (Q4_0, Q4_1, Q8_0, "
        "F16, F32 tensors) into an MLX model directory that "
        "mlx_lm.load opens.",
    )
    common(q)
    q.add_argument("gguf", type=Path, metavar="GGUF")
    q.add_argument("outdir", type=Path, metavar="OUTDIR")
    q.add_argument("--overwrite", action="store_true", help="replace an existing OUTDIR")
    q.set_defaults(func="daemon.ops.models:run_import_gguf", needs_mlx=True)


def _collect(sub: Commands) -> None:
    p = sub.add_parser(
        "collect",
        help="run prompts through the engine and record them",
        description="Run prompts through the engine and record them in the replay buffer exactly "
        "as serving would: through the running daemon if one is up for this data dir, else in "
        "this process.",
    )
    common(p)
    p.add_argument(
        "-p",
        "--prompt",
        action="append",
        metavar="TEXT",
        help="a prompt, sent as one user message (repeatable)",
    )
    p.add_argument(
        "--prompts-file",
        type=Path,
        metavar="F.jsonl",
        help="JSON Lines with 'prompt' or 'messages' per line",
    )
    p.add_argument(
        "--conversations",
        type=Path,
        metavar="F.jsonl",
        help="multi-turn: one {'turns': [user messages]} per line, each turn sent with the "
        "conversation so far (the target's answers between) and recorded",
    )
    p.add_argument(
        "--limit", type=int, help="use at most this many prompts (conversations) from each file"
    )
    p.add_argument(
        "--max-tokens", type=int, help="new tokens per prompt (default: sampling.max_tokens)"
    )
    p.add_argument("--in-process", action="store_true", help="never use a running daemon")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func="daemon.ops.collect:run", needs_mlx=True)


def _warmup(sub: Commands) -> None:
    p = sub.add_parser(
        "warmup",
        help="have the target write requests and answer them, for the draft to learn from",
        description="The target writes user requests (sampled after its chat template's user "
        "header) and answers them greedily; the buffer keeps them as train rows the "
        "adaptation loop trains on, never as held-out rows and never for drafting. For a "
        "draft with little or no traffic yet. Needs a chat model.",
    )
    common(p)
    p.add_argument("--rows", type=int, default=256, help="rows to add (default: 256)")
    p.add_argument(
        "--max-tokens", type=int, help="tokens per answer (default: data.max_output_length)"
    )
    p.add_argument(
        "--seed", type=int, help="sampling seed (default: the number of such rows stored)"
    )
    p.add_argument(
        "--like-traffic",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show the target a stored request of real traffic and its answer as an earlier "
        "turn before each request it writes, so it writes requests of that kind (default: "
        "when the buffer holds any; --no-like-traffic: general requests)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func="daemon.ops.warmup:run", needs_mlx=True)


def _buffer(sub: Commands) -> None:
    p = sub.add_parser(
        "buffer",
        help="inspect and manage the replay buffer",
        description="Inspect and manage the replay buffer of draft failures.",
    )
    bsub = p.add_subparsers(dest="buffer_command", metavar="ACTION", required=True)
    q = bsub.add_parser("stats", help="counts, pending failures, size, acceptance trend")
    common(q)
    q.add_argument("--json", action="store_true", help="print the raw statistics as JSON")
    q.set_defaults(func="daemon.ops.buffer:run_stats")
    q = bsub.add_parser(
        "export",
        help="write failures.jsonl-style records",
        description="Export every record as JSON Lines: prompt, draft_output (the output with "
        "each rejected position showing the draft's token), target_output, disagreements.",
    )
    common(q)
    q.add_argument("--jsonl", type=Path, required=True, metavar="OUT")
    q.set_defaults(func="daemon.ops.buffer:run_export", needs_mlx=True)
    q = bsub.add_parser("purge", help="delete records")
    common(q)
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--before",
        type=parse_date,
        metavar="DATE",
        help="delete records created before this ISO date/time",
    )
    g.add_argument("--all", action="store_true", help="delete every record")
    q.set_defaults(func="daemon.ops.buffer:run_purge")


def _status(sub: Commands) -> None:
    p = sub.add_parser(
        "status",
        help="show the running daemon's status",
        description="Print the running daemon's /status (found via runtime.json in the data dir).",
    )
    common(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.add_argument(
        "--history",
        choices=["hour", "day", "week"],
        help="tokens/s, acceptance and requests over that window as sparklines, and the "
        "training runs (GET /status/history; the status page at / draws the same)",
    )
    p.add_argument("--model", help="with --history: the served model (default: the target)")
    p.set_defaults(func="daemon.ops.status:run", log_to_file=False)


def _logs(sub: Commands) -> None:
    p = sub.add_parser(
        "logs",
        help="pretty-print the JSON log",
        description="Pretty-print the daemon's JSON log for humans.",
    )
    common(p)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument(
        "--training",
        action="store_true",
        help="only training health: steps, evaluations, adapters, swaps",
    )
    p.add_argument("--since", metavar="T", help="only records after T: 10m, 2h, 1d or ISO time")
    p.set_defaults(func="daemon.ops.logview:run", log_to_file=False)


def _service(sub: Commands) -> None:
    p = sub.add_parser(
        "service",
        help="install as a launchd agent / systemd user unit",
        description="Render the launchd user agent (macOS) or systemd user unit "
        "(Linux) with this install's paths and load it.",
    )
    p.add_argument("action", choices=["install", "uninstall", "status"])
    common(p)
    p.add_argument("--dry-run", action="store_true", help="print what would be written and run")
    p.add_argument("--manager", choices=["launchd", "systemd"], help=argparse.SUPPRESS)
    p.add_argument(
        "--group-rank",
        type=int,
        metavar="N",
        help="serve as rank N of a group across machines (with --hostfile; README, "
        "'Beyond one machine')",
    )
    p.add_argument(
        "--hostfile",
        type=Path,
        metavar="HOSTS.json",
        help="the group's ring hostfile: one list of 'address:port' per rank",
    )
    p.set_defaults(func="daemon.ops.install:run", log_to_file=False)
