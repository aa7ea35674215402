"""The ``specd`` command line: the parser, and dispatch to each command's body.

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
from pathlib import Path
from typing import Any, cast

from daemon import __version__
from daemon.config import TRAINING_LOSSES, ConfigSources, Settings, load_settings
from daemon.core.backend import launch_rank, maybe_reexec_with_openblas
from daemon.errors import ConfigError, SpecdError

# A command body: the parsed arguments, the loaded settings and where they came from -> exit code.
Handler = Callable[[argparse.Namespace, Settings, ConfigSources], int]

DRAFT_HELP = (
    "auto (the default: a feature draft where the target allows one), feature, layer-skip, "
    "or a draft model's directory or HF repo id"
)


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


def _loss_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in TRAINING_LOSSES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown loss {', '.join(bad) or repr(text)}; expected some of "
            f"{', '.join(TRAINING_LOSSES)}"
        )
    return names


def _counts(text: str, what: str) -> list[int]:
    try:
        counts = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}")
    return counts


def _rank_list(text: str) -> list[int]:
    return _counts(text, "rank counts like 1,2")


def _row_counts(text: str) -> list[int]:
    return sorted(set(_counts(text, "failure-case counts like 50,100")))


def _split_list(text: str) -> list[str]:
    splits = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in splits if t not in ("auto", "tensor", "pipeline")]
    if not splits or bad:
        raise argparse.ArgumentTypeError(
            f"expected splits among auto, tensor, pipeline (like tensor,pipeline); got {text!r}"
        )
    return splits


def _size_list(text: str) -> list[int]:
    return _counts(text, "record counts like 1000,10000")


def _repetitions(text: str) -> int:
    what = "a number of repetitions, at least 1"
    counts = _counts(text, what)
    if len(counts) != 1:
        raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}")
    return counts[0]


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"paths.data_dir": getattr(args, "data_dir", None)}
    if getattr(args, "host", None) is not None:
        out["server.host"] = args.host
    if getattr(args, "port", None) is not None:
        out["server.port"] = args.port
    return out


def _serve(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    # `Server` owns serving; it needs the command-line overrides again for config reloads.
    from daemon.core.distributed import detect_group
    from daemon.server import Server
    from daemon.serving.distributed import run_follower

    group = detect_group()  # started by mlx.launch: rank 0 serves, the others follow it
    if group is not None and group.rank > 0:
        return run_follower(settings, group)
    return Server(settings, sources, overrides=_overrides(args), group=group).run()


def _parse_date(text: str) -> float:
    import datetime as dt

    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid date {text!r}: use ISO format, e.g. 2026-11-01 or 2026-11-01T12:00"
        ) from None
    return when.timestamp()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specd",
        description="A resident speculative-decoding daemon whose draft model adapts to your "
        "traffic.",
    )
    parser.add_argument("--version", action="version", version=f"specd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train",
        help="train the draft on the buffer now (through the same gate)",
        description="Train the draft's LoRA adapter on the pending failure cases (plus replay) "
        "in a subprocess, print held-out agreement before and after, and install the adapter "
        "only if it beats the one in service by training.min_improvement. Uses the running "
        "daemon when there is one.",
    )
    _common(p)
    p.add_argument("--epochs", type=int, help="passes over the examples (training.epochs)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func="daemon.ops.train:run_train", needs_mlx=True)

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
    _common(p)
    p.set_defaults(func="daemon.ops.train:run_adapters", log_to_file=False)

    p = sub.add_parser(
        "serve",
        help="load the models and serve until stopped",
        description="Load the target and draft models and serve in the "
        "foreground until SIGINT/SIGTERM.",
    )
    _common(p)
    p.add_argument("--host", help="address to bind (default from server.host)")
    p.add_argument("--port", type=int, help="port to bind (default from server.port)")
    p.set_defaults(func=_serve, needs_mlx=True)

    p = sub.add_parser("models", help="manage models", description="Manage models.")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    q = msub.add_parser(
        "list",
        help="the models served (models.target and models.targets), loaded or not",
        description="The models the daemon serves, by the name a request gives: "
        "models.target first, then models.targets; with the daemon running, whether each "
        "is loaded now and its draft adapter version.",
    )
    _common(q)
    q.set_defaults(func="daemon.ops.models:run_list", needs_mlx=False)
    q = msub.add_parser(
        "add",
        help="serve another model by name (a drop-in; a running daemon adds it live)",
        description="Write conf.d/60-model-NAME.yaml with models.targets.NAME: a running "
        "daemon serves the model from then on (loaded on its first request), the others "
        "untouched; it adapts its own draft on its own traffic.",
    )
    _common(q)
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
    _common(q)
    q.add_argument("name", metavar="NAME")
    q.set_defaults(func="daemon.ops.models:run_remove", needs_mlx=False)
    q = msub.add_parser(
        "pull",
        help="download an MLX model from Hugging Face and serve it (models add)",
        description="Download REPO with mlx-lm's Hugging Face download (a local directory is "
        "taken as it is), then `specd models add` it under --name (default: the repo's last "
        "part).",
    )
    _common(q)
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
    _common(q)
    q.add_argument("gguf", type=Path, metavar="GGUF")
    q.add_argument("outdir", type=Path, metavar="OUTDIR")
    q.add_argument("--overwrite", action="store_true", help="replace an existing OUTDIR")
    q.set_defaults(func="daemon.ops.models:run_import_gguf", needs_mlx=True)

    p = sub.add_parser(
        "collect",
        help="run prompts through the engine and record them",
        description="Run prompts through the engine and record them in the replay buffer exactly "
        "as serving would: through the running daemon if one is up for this data dir, else in "
        "this process.",
    )
    _common(p)
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
    p.add_argument("--limit", type=int, help="use at most this many prompts from the file")
    p.add_argument(
        "--max-tokens", type=int, help="new tokens per prompt (default: sampling.max_tokens)"
    )
    p.add_argument("--in-process", action="store_true", help="never use a running daemon")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func="daemon.ops.collect:run", needs_mlx=True)

    p = sub.add_parser(
        "buffer",
        help="inspect and manage the replay buffer",
        description="Inspect and manage the replay buffer of draft failures.",
    )
    bsub = p.add_subparsers(dest="buffer_command", metavar="ACTION", required=True)
    q = bsub.add_parser("stats", help="counts, pending failures, size, acceptance trend")
    _common(q)
    q.add_argument("--json", action="store_true", help="print the raw statistics as JSON")
    q.set_defaults(func="daemon.ops.buffer:run_stats")
    q = bsub.add_parser(
        "export",
        help="write failures.jsonl-style records",
        description="Export every record as JSON Lines: prompt, draft_output (the output with "
        "each rejected position showing the draft's token), target_output, disagreements.",
    )
    _common(q)
    q.add_argument("--jsonl", type=Path, required=True, metavar="OUT")
    q.set_defaults(func="daemon.ops.buffer:run_export", needs_mlx=True)
    q = bsub.add_parser("purge", help="delete records")
    _common(q)
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--before",
        type=_parse_date,
        metavar="DATE",
        help="delete records created before this ISO date/time",
    )
    g.add_argument("--all", action="store_true", help="delete every record")
    q.set_defaults(func="daemon.ops.buffer:run_purge")

    p = sub.add_parser(
        "status",
        help="show the running daemon's status",
        description="Print the running daemon's /status (found via runtime.json in the data dir).",
    )
    _common(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.add_argument(
        "--history",
        choices=["hour", "day", "week"],
        help="tokens/s, acceptance and requests over that window as sparklines, and the "
        "training runs (GET /status/history; the status page at / draws the same)",
    )
    p.add_argument("--model", help="with --history: the served model (default: the target)")
    p.set_defaults(func="daemon.ops.status:run", log_to_file=False)

    p = sub.add_parser(
        "logs",
        help="pretty-print the JSON log",
        description="Pretty-print the daemon's JSON log for humans.",
    )
    _common(p)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument(
        "--training",
        action="store_true",
        help="only training health: steps, evaluations, adapters, swaps",
    )
    p.add_argument("--since", metavar="T", help="only records after T: 10m, 2h, 1d or ISO time")
    p.set_defaults(func="daemon.ops.logview:run", log_to_file=False)

    p = sub.add_parser(
        "service",
        help="install as a launchd agent / systemd user unit",
        description="Render the launchd user agent (macOS) or systemd user unit "
        "(Linux) with this install's paths and load it.",
    )
    p.add_argument("action", choices=["install", "uninstall", "status"])
    _common(p)
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
        "same draft, specd's engine with a fixed k, with its defaults (everything on), and "
        "with each drafting source alone (model, lookup, suffix; the suffix index is the "
        "data dir's recorded outputs).",
    )
    _common(q)
    _prompt_args(q, limit=8, max_tokens=64, required=False)
    q.add_argument(
        "--workload",
        choices=["autocomplete"],
        help="instead of --prompts: prompts generated from the installed Python's standard "
        "library ('autocomplete': code prefixes sent raw, as /v1/completions does)",
    )
    q.add_argument(
        "--num-draft-tokens",
        type=int,
        metavar="K",
        help="draft tokens per round (default: speculative.num_draft_tokens)",
    )
    q.add_argument(
        "--adapter",
        metavar="DIR|current",
        help="measure the draft with this mlx-lm adapter directory (e.g. `bench train --out`), "
        "or the data dir's current one (default: no adapter)",
    )
    q.add_argument(
        "--repeat",
        type=_repetitions,
        default=1,
        metavar="N",
        help="run every row N times, interleaved; report the median and the spread (default 1)",
    )
    q.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE[,...]",
        help="add a row: specd's defaults with these speculative.* settings changed "
        "(repeatable), e.g. max_proposal_tokens=8",
    )
    q.add_argument(
        "--rows",
        metavar="ROW,...",
        help="run only these rows (target_only always; the variants too), e.g. "
        "specd_adaptive,specd_lookup",
    )
    q.set_defaults(func="daemon.bench.speed:run", needs_mlx=True)

    q = bsub.add_parser(
        "group",
        help="the same requests served by 1, 2, ... ranks (MLX distributed), side by side",
        description="Greedy requests on the configured pair served by one process and by "
        "groups of ranks on this machine (the ring backend over loopback): tokens/s, "
        "tokens per target forward, time in rank 0's messages, the measured time of one "
        "all_sum of a round's activations and the communication per round; then a paper "
        "estimate for a 70B target over two Macs.",
    )
    _common(q)
    _prompt_args(q, limit=4, max_tokens=64, required=False)
    q.add_argument(
        "--ranks",
        type=_rank_list,
        default=[1, 2],
        help="rank counts to compare (default 1,2); the target must split that many ways",
    )
    q.add_argument(
        "--split",
        type=_split_list,
        default=None,
        help="ways to split the target, compared side by side on each rank count, e.g. "
        "tensor,pipeline (default: models.split); rows are named ranks_N_SPLIT_... when more "
        "than one is given",
    )
    q.add_argument("--timeout", type=float, default=1800.0, help="seconds one rank count may take")
    q.add_argument(
        "--train",
        type=int,
        metavar="N",
        help="instead: time data-parallel LoRA steps of the draft on N buffer examples split "
        "across the ranks (gradients averaged each step), examples/s side by side",
    )
    q.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    q.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    q.set_defaults(func="daemon.bench.group:run", needs_mlx=True)

    q = bsub.add_parser(
        "serve",
        help="concurrent streaming clients over HTTP vs the engine called directly",
        description="Time to first token and tokens/s for N concurrent streaming clients against "
        "a private in-process server on the configured pair, and the overhead versus calling "
        "the engine directly on the same prompts.",
    )
    _common(q)
    _prompt_args(q, limit=8, max_tokens=64, required=False)
    q.add_argument(
        "--clients",
        default="4",
        help="concurrent clients (default 4); a list like 1,2,4,8 runs each count on one "
        "server, side by side, with tokens/s and TTFT relative to the first count",
    )
    q.add_argument(
        "--conversations",
        type=Path,
        metavar="FILE.jsonl",
        help="multi-turn instead: one {'turns': [user messages]} per line, each turn sent with "
        "the whole history; TTFT per turn with and without the prompt cache",
    )
    q.set_defaults(func="daemon.bench.serve:run", needs_mlx=True)

    q = bsub.add_parser(
        "adapt",
        help="the adaptive loop end to end: eval before, train traffic, eval after",
        description="Measure the engine on the eval prompts, send the train prompts through it "
        "exactly as the daemon serves them (the loop trains, gates and swaps with the configured "
        "min_failure_cases), then measure the eval prompts again, again without the adapter "
        "(the adapter's own share), and the target alone before and after. Uses a private "
        "data dir.",
    )
    _common(q)
    q.add_argument("--train-prompts", type=Path, required=True, metavar="A.jsonl")
    q.add_argument("--eval-prompts", type=Path, required=True, metavar="B.jsonl")
    q.add_argument("--train-limit", type=int, help="use at most this many train prompts")
    q.add_argument("--eval-limit", type=int, help="use at most this many eval prompts")
    q.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (64)")
    q.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sample train and eval traffic at this temperature (default 0: greedy)",
    )
    q.add_argument(
        "--repeat",
        type=_repetitions,
        default=1,
        metavar="N",
        help="after the traffic, measure the service with and without the adapter and the "
        "target alone N times, interleaved; report the repetition with the median share and "
        "every share (default 1)",
    )
    q.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    q.set_defaults(func="daemon.bench.adapt:run", needs_mlx=True)

    q = bsub.add_parser(
        "blas",
        help="MLX's bundled BLAS vs the system OpenBLAS on the target (Linux)",
        description="Prefill (256 tokens) and decode speed of the target in two child "
        "processes, one with MLX's bundled reference BLAS and one with OpenBLAS preloaded.",
    )
    _common(q)
    q.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    q.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    q.set_defaults(func="daemon.bench.blas:run", needs_mlx=False)

    q = bsub.add_parser(
        "buffer",
        help="replay buffer stats() and count() latency at growing sizes (no model)",
        description="Fill a temporary replay buffer with small records and time stats() as "
        "/status asks it, count() and pending_failure_count() at each size, beside the "
        "GROUP BY scan stats() ran before the counts table.",
    )
    _common(q)
    q.add_argument(
        "--records",
        type=_size_list,
        default=[1_000, 10_000, 100_000],
        metavar="N,N,...",
        help="buffer sizes to measure (default 1000,10000,100000)",
    )
    q.add_argument("--repeat", type=int, default=20, help="calls timed per size (median; 20)")
    q.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    q.set_defaults(func="daemon.bench.buffer:run", needs_mlx=False)

    q = bsub.add_parser(
        "train",
        help="training throughput, peak memory, held-out agreement before -> after",
        description="Train the configured draft on the buffer in this process (nothing is "
        "marked used, the adapter is discarded unless --out keeps it) and report throughput, "
        "peak memory and held-out agreement before and after.",
    )
    _common(q)
    q.add_argument("--epochs", type=int)
    q.add_argument("--max-steps", type=int)
    # one run keeps its adapter; several runs (per loss, per traffic size) keep none
    mode = q.add_mutually_exclusive_group()
    mode.add_argument(
        "--out", type=Path, metavar="DIR", help="keep the adapter here (for bench speed --adapter)"
    )
    mode.add_argument(
        "--losses",
        type=_loss_list,
        metavar="L1,L2",
        help="one run per training.loss (ce, fkl, tvd, jsd, acceptance), each from a fresh "
        "draft, with the holdout's expected acceptance greedy and at --temperature",
    )
    q.add_argument(
        "--temperature",
        type=float,
        default=0.7,
        help="temperature of the sampled acceptance column with --losses (default 0.7)",
    )
    mode.add_argument(
        "--rows",
        type=_row_counts,
        metavar="N1,N2",
        help="a learning curve: one run per N, each from a fresh draft on the buffer's oldest "
        "N pending failure cases (and replay from before them), all scored on the same holdout",
    )
    q.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    q.set_defaults(func="daemon.bench.train:run", needs_mlx=True)

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
    q.add_argument(
        "--head-tokens",
        default="0",
        metavar="N,N,...",
        help="also measure each candidate with its output head cut to N tokens (0: full head; "
        "default 0)",
    )
    q.set_defaults(func="daemon.bench.draft:run", needs_mlx=True)

    q = bsub.add_parser(
        "gate",
        help="how often the speed gate installs a simulated candidate that is no better",
        description="Simulated held-out rows for candidates as good as the draft in service "
        "(delta 0) or worse: the share the gate's bootstrap would install, per row count.",
    )
    _common(q)
    q.add_argument("--rows", type=int, nargs="+", default=[3, 5, 10, 20, 40], metavar="N")
    q.add_argument(
        "--deltas", type=float, nargs="+", default=[0.0, -0.03], metavar="D",
        help="candidate agreement minus the served draft's (default: 0 -0.03)",
    )  # fmt: skip
    q.add_argument("--trials", type=int, default=400, help="candidates per row (default 400)")
    q.add_argument("--confidence", type=float, help="default: training.gate_confidence")
    q.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    q.set_defaults(func="daemon.bench.gate:run", needs_mlx=False)

    q = bsub.add_parser(
        "workloads",
        help="write the benchmark prompt files, generated from Python's standard library",
        description="Code, docs, edit and multi-turn chat prompts (train and eval, a fixed "
        "split) and autocomplete prefixes, from the installed Python's standard library; "
        "the same Python version writes the same files (MANIFEST.json names it).",
    )
    _common(q)
    q.add_argument(
        "--out", type=Path, default=Path("benchmarks/workloads"), metavar="DIR",
        help="where to write them (default benchmarks/workloads)",
    )  # fmt: skip
    q.add_argument("--per-kind", type=int, default=120, help="prompts per kind (default 120)")
    q.add_argument("--autocomplete", type=int, default=16, help="prefixes (default 16)")
    q.set_defaults(func="daemon.bench.workloads:run", needs_mlx=False)

    q = bsub.add_parser(
        "report",
        help="write benchmarks/BENCHMARKS.md from the result files in benchmarks/results/",
    )
    _common(q)
    q.add_argument("--results", type=Path, default=Path("benchmarks/results"), metavar="DIR")
    q.add_argument("--out", type=Path, default=Path("benchmarks/BENCHMARKS.md"), metavar="FILE")
    q.set_defaults(func="daemon.bench.report:run", needs_mlx=False)
    return parser


def _prompt_args(
    p: argparse.ArgumentParser, limit: int, max_tokens: int, required: bool = True
) -> None:
    p.add_argument(
        "--prompts",
        type=Path,
        required=required,
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
