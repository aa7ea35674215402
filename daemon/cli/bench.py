"""``specd bench``: one function per benchmark, adding its subparser; each body is the
benchmark module's ``run``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.cli.args import (
    common,
    loss_list,
    prompt_args,
    rank_list,
    repetitions,
    row_counts,
    size_list,
    split_list,
)

if TYPE_CHECKING:
    from daemon.cli.args import Commands


def add_bench(sub: Commands) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks (print a table, optionally write JSON)",
        description="Benchmarks on the configured model pair.",
    )
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    _speed(bsub)
    _group(bsub)
    _serve(bsub)
    _adapt(bsub)
    _blas(bsub)
    _buffer(bsub)
    _train(bsub)
    _draft(bsub)
    _gate(bsub)
    _workloads(bsub)
    _report(bsub)


def _speed(bsub: Commands) -> None:
    q = bsub.add_parser(
        "speed",
        help="target-only vs mlx-lm speculative vs specd, side by side",
        description="Greedy decoding speed on the same prompts, in one process: "
        "target-only (mlx-lm), mlx-lm's speculative path with the "
        "same draft, specd's engine with a fixed k, with its defaults (everything on), and "
        "with each drafting source alone (model, lookup, suffix; the suffix index is the "
        "data dir's recorded outputs).",
    )
    common(q)
    prompt_args(q, limit=8, max_tokens=64, required=False)
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
        type=repetitions,
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


def _group(bsub: Commands) -> None:
    q = bsub.add_parser(
        "group",
        help="the same requests served by 1, 2, ... ranks (MLX distributed), side by side",
        description="Greedy requests on the configured pair served by one process and by "
        "groups of ranks on this machine (the ring backend over loopback): tokens/s, "
        "tokens per target forward, time in rank 0's messages, the measured time of one "
        "all_sum of a round's activations and the communication per round; then a paper "
        "estimate for a 70B target over two Macs.",
    )
    common(q)
    prompt_args(q, limit=4, max_tokens=64, required=False)
    q.add_argument(
        "--ranks",
        type=rank_list,
        default=[1, 2],
        help="rank counts to compare (default 1,2); the target must split that many ways",
    )
    q.add_argument(
        "--split",
        type=split_list,
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


def _serve(bsub: Commands) -> None:
    q = bsub.add_parser(
        "serve",
        help="concurrent streaming clients over HTTP vs the engine called directly",
        description="Time to first token and tokens/s for N concurrent streaming clients against "
        "a private in-process server on the configured pair, and the overhead versus calling "
        "the engine directly on the same prompts.",
    )
    common(q)
    prompt_args(q, limit=8, max_tokens=64, required=False)
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


def _adapt(bsub: Commands) -> None:
    q = bsub.add_parser(
        "adapt",
        help="the adaptive loop end to end: eval before, train traffic, eval after",
        description="Measure the engine on the eval prompts, send the train prompts through it "
        "exactly as the daemon serves them (the loop trains, gates and swaps with the configured "
        "min_failure_cases), then measure the eval prompts again, again without the adapter "
        "(the adapter's own share), and the target alone before and after. Uses a private "
        "data dir.",
    )
    common(q)
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
        type=repetitions,
        default=1,
        metavar="N",
        help="after the traffic, measure the service with and without the adapter and the "
        "target alone N times, interleaved; report the repetition with the median share and "
        "every share (default 1)",
    )
    q.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    q.set_defaults(func="daemon.bench.adapt:run", needs_mlx=True)


def _blas(bsub: Commands) -> None:
    q = bsub.add_parser(
        "blas",
        help="MLX's bundled BLAS vs the system OpenBLAS on the target (Linux)",
        description="Prefill (256 tokens) and decode speed of the target in two child "
        "processes, one with MLX's bundled reference BLAS and one with OpenBLAS preloaded.",
    )
    common(q)
    q.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    q.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    q.set_defaults(func="daemon.bench.blas:run", needs_mlx=False)


def _buffer(bsub: Commands) -> None:
    q = bsub.add_parser(
        "buffer",
        help="replay buffer stats() and count() latency at growing sizes (no model)",
        description="Fill a temporary replay buffer with small records and time stats() as "
        "/status asks it, count() and pending_failure_count() at each size, beside the "
        "GROUP BY scan stats() ran before the counts table.",
    )
    common(q)
    q.add_argument(
        "--records",
        type=size_list,
        default=[1_000, 10_000, 100_000],
        metavar="N,N,...",
        help="buffer sizes to measure (default 1000,10000,100000)",
    )
    q.add_argument("--repeat", type=int, default=20, help="calls timed per size (median; 20)")
    q.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    q.set_defaults(func="daemon.bench.buffer:run", needs_mlx=False)


def _train(bsub: Commands) -> None:
    q = bsub.add_parser(
        "train",
        help="training throughput, peak memory, held-out agreement before -> after",
        description="Train the configured draft on the buffer in this process (nothing is "
        "marked used, the adapter is discarded unless --out keeps it) and report throughput, "
        "peak memory and held-out agreement before and after.",
    )
    common(q)
    q.add_argument("--epochs", type=int)
    q.add_argument("--max-steps", type=int)
    # one run keeps its adapter; several runs (per loss, per traffic size) keep none
    mode = q.add_mutually_exclusive_group()
    mode.add_argument(
        "--out", type=Path, metavar="DIR", help="keep the adapter here (for bench speed --adapter)"
    )
    mode.add_argument(
        "--losses",
        type=loss_list,
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
        type=row_counts,
        metavar="N1,N2",
        help="a learning curve: one run per N, each from a fresh draft on the buffer's oldest "
        "N pending failure cases (and replay from before them), all scored on the same holdout",
    )
    q.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    q.set_defaults(func="daemon.bench.train:run", needs_mlx=True)


def _draft(bsub: Commands) -> None:
    q = bsub.add_parser(
        "draft",
        help="layer-skip draft candidates: agreement and cost per token",
        description="Teacher-forced agreement of layer-skip drafts with the "
        "target's greedy answers, and their decode cost relative to "
        "the target.",
    )
    common(q)
    prompt_args(q, limit=16, max_tokens=64)
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


def _gate(bsub: Commands) -> None:
    q = bsub.add_parser(
        "gate",
        help="how often the speed gate installs a simulated candidate that is no better",
        description="Simulated held-out rows for candidates as good as the draft in service "
        "(delta 0) or worse: the share the gate's bootstrap would install, per row count.",
    )
    common(q)
    q.add_argument("--rows", type=int, nargs="+", default=[3, 5, 10, 20, 40], metavar="N")
    q.add_argument(
        "--deltas", type=float, nargs="+", default=[0.0, -0.03], metavar="D",
        help="candidate agreement minus the served draft's (default: 0 -0.03)",
    )  # fmt: skip
    q.add_argument("--trials", type=int, default=400, help="candidates per row (default 400)")
    q.add_argument("--confidence", type=float, help="default: training.gate_confidence")
    q.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    q.set_defaults(func="daemon.bench.gate:run", needs_mlx=False)


def _workloads(bsub: Commands) -> None:
    q = bsub.add_parser(
        "workloads",
        help="write the benchmark prompt files, generated from Python's standard library",
        description="Code, docs, edit and multi-turn chat prompts (train and eval, a fixed "
        "split) and autocomplete prefixes, from the installed Python's standard library; "
        "the same Python version writes the same files (MANIFEST.json names it).",
    )
    common(q)
    q.add_argument(
        "--out", type=Path, default=Path("benchmarks/workloads"), metavar="DIR",
        help="where to write them (default benchmarks/workloads)",
    )  # fmt: skip
    q.add_argument("--per-kind", type=int, default=120, help="prompts per kind (default 120)")
    q.add_argument("--autocomplete", type=int, default=16, help="prefixes (default 16)")
    q.set_defaults(func="daemon.bench.workloads:run", needs_mlx=False)


def _report(bsub: Commands) -> None:
    q = bsub.add_parser(
        "report",
        help="write benchmarks/BENCHMARKS.md from the result files in benchmarks/results/",
    )
    common(q)
    q.add_argument("--results", type=Path, default=Path("benchmarks/results"), metavar="DIR")
    q.add_argument("--out", type=Path, default=Path("benchmarks/BENCHMARKS.md"), metavar="FILE")
    q.set_defaults(func="daemon.bench.report:run", needs_mlx=False)
