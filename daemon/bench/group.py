"""``specd bench group --ranks 1,2``: the same greedy requests served by 1, 2, ... ranks of this
machine (the ring backend over loopback), side by side.

Each rank count runs as that many processes of ``specd bench group --worker`` joined by MLX's
ring backend from a hostfile (as ``mlx.launch`` would start them): rank 0 decodes with
specd's engine exactly as the daemon does in a group (`MirroredTarget`), the others follow.
Per row: tokens/s for the target alone and for speculative decoding, the target forwards and
the tokens each carried, the time in rank 0's messages, and the measured time of one
``all_sum`` of a verify round's activations; a tensor-parallel forward makes two per layer,
so ``comm_ms_per_round`` = 2 x layers x that + the message. ``identical`` says whether the
greedy tokens equal the first row's.

``estimate`` is arithmetic, not a measurement: the per-round traffic of a 70B target split
over two Macs (``LINKS``), from the same formula as the measured rows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import mlx.core as mx

from daemon.bench.report import print_table, write_json
from daemon.config import ConfigSources, Settings
from daemon.core.backend import launcher_free_environment
from daemon.core.distributed import (
    Channel,
    Group,
    MirroredTarget,
    Watchdog,
    detect_group,
    follow,
    loopback_hostfile,
)
from daemon.core.engine import SamplingParams, SpeculativeConfig, SpeculativeEngine
from daemon.core.models import load_pair, load_sharded_target
from daemon.core.prompts import encode_prompt, read_prompts
from daemon.errors import DistributedError

# The paper estimate: Llama-3-70B's shape, fp16 activations, and two links. The link figures
# are assumptions (nominal bandwidth; a per-message latency typical of each), not measured.
LLAMA70B = {"layers": 80, "hidden": 8192, "bytes_per_value": 2}
LINKS = {
    "ethernet_10g_ring": {"bytes_per_s": 1.25e9, "latency_s": 60e-6},
    "thunderbolt5_jaccl": {"bytes_per_s": 10e9, "latency_s": 10e-6},
    "wifi_ring": {"bytes_per_s": 0.1e9, "latency_s": 2e-3},
}
# 70B at 4 bits is ~40 GB of weights; an M3 Ultra reads ~800 GB/s, so a forward (memory
# bound, a verify round costs about one step) takes ~50 ms on one Mac, ~25 ms split in two.
FORWARD_S_ONE_MAC = 0.050
PROBE_REPEATS = 50


def _timed(group: Group, tokens: int, hidden: int, once: Callable[[mx.array], None]) -> float:
    """Every rank: the time of ``once`` on ``tokens`` x ``hidden`` float32 activations (rank 0
    says how many tokens; the others learn it from the first collective)."""
    said = mx.distributed.all_sum(
        mx.array([tokens if group.rank == 0 else 0], dtype=mx.int32),
        group=group.handle,
        stream=mx.cpu,
    )
    x = mx.zeros((1, max(1, cast(int, said.item())), hidden), dtype=mx.float32)
    once(x)  # warm-up
    t0 = time.perf_counter()
    for _ in range(PROBE_REPEATS):
        once(x)
    return (time.perf_counter() - t0) / PROBE_REPEATS


def _allsum_seconds(group: Group, tokens: int, hidden: int) -> float:
    """One all_sum of a round's activations (a tensor split makes two per layer)."""
    return _timed(
        group, tokens, hidden, lambda x: mx.eval(mx.distributed.all_sum(x, group=group.handle))
    )


def _handoff_seconds(group: Group, tokens: int, hidden: int) -> float:
    """One trip of a round's activations round the ranks (0 -> 1 -> ... -> 0: a layer
    split's hand-offs in one forward)."""
    rank, size, g = group.rank, group.size, group.handle

    def trip(x: mx.array) -> None:
        if rank == 0:
            sent = mx.distributed.send(x, 1, group=g, stream=mx.cpu)
            back = mx.distributed.recv(x.shape, x.dtype, size - 1, group=g, stream=mx.cpu)
            mx.eval(mx.depends(back, sent))
        else:
            got = mx.distributed.recv(x.shape, x.dtype, rank - 1, group=g, stream=mx.cpu)
            mx.eval(mx.distributed.send(got, (rank + 1) % size, group=g, stream=mx.cpu))

    return _timed(group, tokens, hidden, trip)


def _probe(group: Group, tokens: int, hidden: int, pipeline: bool) -> float:
    return (_handoff_seconds if pipeline else _allsum_seconds)(group, tokens, hidden)


def _train_worker(args: argparse.Namespace, settings: Settings, group: Group | None) -> int:
    """Every rank: LoRA steps of the draft on its share of ``args.train`` examples from the
    buffer, gradients averaged over the group at each update (data parallel); rank 0 writes
    the timing."""
    from daemon.adaptation.data import collate, make_examples
    from daemon.adaptation.lora import apply_lora
    from daemon.adaptation.trainer import Trainer
    from daemon.store.buffer import ReplayBuffer

    rank, size = (group.rank, group.size) if group is not None else (0, 1)
    pair = load_pair(settings, lazy_target=True)  # the draft's share of the target only
    with ReplayBuffer(settings.paths.data_dir, settings.buffer, create=False) as buffer:
        rows = list(itertools.islice(buffer.iter_records(split="train"), args.train))
    examples, _ = make_examples(rows, settings.data, "replay")
    per_rank = len(examples) // size
    if per_rank < 2:
        raise DistributedError(f"bench group --train: {len(examples)} examples for {size} ranks")
    mine = examples[rank::size][:per_rank]
    cfg = settings.training
    mx.random.seed(cfg.seed)
    apply_lora(pair.draft, cfg.lora)
    trainer = Trainer(
        pair.draft,
        cfg,
        per_rank,
        vocab_limit=pair.shared_vocab,
        group=group.handle if group is not None else None,
    )
    pair.draft.train()
    vocab = pair.shared_vocab
    trainer.micro_step(collate(mine[:1], vocab), mine[:1])  # warm-up
    trainer.update()
    t0 = time.perf_counter()
    for ex in mine[1:]:
        trainer.micro_step(collate([ex], vocab), [ex])
        trainer.update()
    seconds = time.perf_counter() - t0
    steps = per_rank - 1
    if rank == 0:
        row = {
            "examples_per_s": steps * size / seconds,
            "seconds_per_step": seconds / steps,
            "examples": steps * size,
            "seconds": seconds,
            "last_loss": trainer.stats.losses[-1] if trainer.stats.losses else None,
        }
        Path(args.out).write_text(json.dumps({"rows": {"train": row}, "split": ""}))
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    group = detect_group()
    if args.train:
        return _train_worker(args, settings, group)
    timeout = settings.server.rank_timeout_seconds

    def expired(what: str, seconds: float) -> None:
        print(f"bench group: no answer for {seconds:.0f} s ({what})", file=sys.stderr)

    if group is not None and group.rank > 0:
        loaded = load_sharded_target(settings, group)
        guard = Watchdog(timeout, expired)
        follow(loaded.model, Channel(group), guard)
        guard.stop()
        pipeline = loaded.split.startswith("pipeline")
        _probe(group, 0, int(loaded.model.args.hidden_size), pipeline)
        return 0

    prompts = [p.messages for p in read_prompts(args.prompts, limit=args.limit)]
    pair = load_pair(settings, group)
    channel: Channel | None = None
    mirror: MirroredTarget | None = None
    watchdog: Watchdog | None = None
    if group is not None:
        channel = Channel(group)
        watchdog = Watchdog(timeout, expired)
        mirror = MirroredTarget(pair.target, channel, watchdog)
        pair.target = mirror
    encoded = [encode_prompt(pair.tokenizer, p) for p in prompts]
    config = SpeculativeConfig.from_settings(settings.speculative, pair.max_context)
    engines = {
        "target_only": replace(config, model_draft=False, lookup=False),
        "speculative": config,
    }
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    out: dict[str, Any] = {"rows": {}}
    for name, cfg in engines.items():
        engine = SpeculativeEngine(pair.target, pair.draft, pair.tokenizer, cfg)
        engine.run(encoded[0], replace(greedy, max_tokens=8))  # warm-up
        messages0 = channel.messages if channel else 0
        seconds0 = channel.seconds if channel else 0.0
        total_s, tokens, rounds, verified = 0.0, 0, 0, 0
        outputs = []
        for prompt in encoded:
            t0 = time.perf_counter()
            result = engine.run(prompt, greedy)
            total_s += time.perf_counter() - t0
            tokens += len(result.tokens)
            # a round's forward carries its last token and the tokens drafted; the prompt's
            # prefill counts as one more pass
            n = result.stats.target_passes - (1 if len(prompt) > 1 else 0)
            rounds += n
            verified += n + result.stats.drafted
            outputs.append(result.tokens)
        messages = (channel.messages - messages0) if channel else 0
        out["rows"][name] = {
            "tokens_per_s": tokens / total_s if total_s else 0.0,
            "tokens": tokens,
            "seconds": total_s,
            "rounds": rounds,
            "tokens_per_forward": verified / max(1, rounds),
            "message_ms_per_forward": (
                1000 * ((channel.seconds if channel else 0.0) - seconds0) / max(1, messages)
            ),
        }
        out[f"outputs_{name}"] = outputs
    args_ = pair.target.args
    out["layers"] = int(args_.num_hidden_layers)
    out["hidden"] = int(args_.hidden_size)
    out["split"] = pair.split
    if group is not None and mirror is not None and watchdog is not None:
        mirror.stop_followers()
        watchdog.stop()
        per_round = max(1, round(out["rows"]["speculative"]["tokens_per_forward"]))
        out["round_tokens"] = per_round
        pipeline = pair.split.startswith("pipeline")
        probe = _probe(group, per_round, out["hidden"], pipeline)
        out["handoff_s" if pipeline else "allsum_s"] = probe
    Path(args.out).write_text(json.dumps(out))
    return 0


def _launch(
    args: argparse.Namespace, ranks: int, out: Path, split: str | None = None
) -> tuple[int, str]:
    """Run the worker as ``ranks`` processes of one ring group on loopback, started directly
    from a hostfile (mlx.launch's relay loop would take a core of this machine from them);
    returns rank 0's exit status and the tail of every rank's output."""
    cmd = [sys.executable, "-m", "daemon", "bench", "group", "--worker", "--out", str(out)]
    if args.config is not None:
        cmd += ["--config", str(args.config)]
    if args.data_dir is not None:
        cmd += ["--data-dir", str(args.data_dir)]
    if args.prompts is not None:
        cmd += ["--prompts", str(args.prompts), "--limit", str(args.limit)]
    cmd += ["--max-tokens", str(args.max_tokens)]
    if args.train:
        cmd += ["--train", str(args.train)]
    # the one-rank row runs alone even when this command was itself launched in a group
    env = launcher_free_environment(dict(os.environ))
    if split is not None:
        env["SPECD_MODELS__SPLIT"] = split
    logs = [out.with_suffix(f".rank{r}.log") for r in range(ranks)]
    if ranks > 1:
        hostfile = loopback_hostfile(out.with_suffix(".hosts.json"), ranks)
        envs = [{**env, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(r)} for r in range(ranks)]
    else:
        envs = [env]
    procs = [
        subprocess.Popen(cmd, env=e, stdout=log.open("w"), stderr=subprocess.STDOUT)
        for e, log in zip(envs, logs, strict=True)
    ]
    try:
        codes = [p.wait(args.timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = " | ".join(
        f"rank {r}: " + " ".join(log.read_text().strip().splitlines()[-2:])
        for r, log in enumerate(logs)
        if codes[r] != 0
    )
    return codes[0] if all(c == 0 for c in codes) else max(codes), tails


def _row(
    got: dict[str, Any], first: dict[str, Any], name: str, row: dict[str, Any], ranks: int
) -> dict[str, Any]:
    """A result row with its ratio to the first row and, for a group, its communication:
    tensor, two all-reduces per layer; pipeline, one trip round the ranks."""
    rate = "examples_per_s" if name == "train" else "tokens_per_s"
    base = first["rows"][name][rate]
    row["ratio_vs_first"] = row[rate] / base if base else None
    if name == "train":
        return row
    row["identical"] = got[f"outputs_{name}"] == first[f"outputs_{name}"]
    values = got.get("round_tokens", 1) * got["hidden"]
    if "allsum_s" in got:
        row["allsum_ms"] = got["allsum_s"] * 1000
        row["comm_ms_per_round"] = (
            2 * got["layers"] * got["allsum_s"] * 1000 + row["message_ms_per_forward"]
        )
        row["bytes_per_round"] = 2 * got["layers"] * values * 4
    if "handoff_s" in got:
        row["handoff_ms"] = got["handoff_s"] * 1000
        row["comm_ms_per_round"] = got["handoff_s"] * 1000 + row["message_ms_per_forward"]
        row["bytes_per_round"] = ranks * values * 4
    row["split"] = got["split"] or "one process"
    return row


def estimate(round_tokens: int) -> dict[str, Any]:
    """Per-round time of a 70B target split over two Macs, on each link in `LINKS`, both
    ways: tensor (both Macs read half the weights at once, then two all-reduces per layer;
    a two-rank ring moves the whole payload once each way) and pipeline (the Macs take
    turns over their halves, with one hand-off each way); ``crossover_latency_us``: the
    per-message latency below which tensor's round is the shorter on that link."""
    layers, hidden, width = LLAMA70B["layers"], LLAMA70B["hidden"], LLAMA70B["bytes_per_value"]
    payload = round_tokens * hidden * width
    out: dict[str, Any] = {
        "round_tokens": round_tokens,
        "bytes_per_round": 2 * layers * payload,
        "pipeline_bytes_per_round": 2 * payload,
        "forward_ms_one_mac": FORWARD_S_ONE_MAC * 1000,
        "forward_ms_split": FORWARD_S_ONE_MAC * 500,
    }
    for name, link in LINKS.items():
        transfer = payload / link["bytes_per_s"]
        per = link["latency_s"] + transfer
        comm = 2 * layers * per
        # tensor: F/2 + 2L (lat + x); pipeline: F + 2 (lat + x); equal at this latency
        crossover = (FORWARD_S_ONE_MAC / 2) / (2 * layers - 2) - transfer
        out[name] = {
            "comm_ms_per_round": comm * 1000,
            "round_ms": (FORWARD_S_ONE_MAC / 2 + comm) * 1000,
            "pipeline_comm_ms_per_round": 2 * per * 1000,
            "pipeline_round_ms": (FORWARD_S_ONE_MAC + 2 * per) * 1000,
            "crossover_latency_us": max(0.0, crossover * 1e6),
        }
    return out


def run(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    if args.worker:
        return _worker(args, settings)
    if args.prompts is None and not args.train:
        raise DistributedError("bench group needs --prompts (or --train N)")
    rows: dict[str, Any] = {}
    first: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="specd-bench-group-") as tmp:
        splits: list[str | None] = list(args.split) if args.split else [None]
        runs = [(r, sp) for r in args.ranks for sp in (splits if r > 1 else [None])]
        for n, split in runs:
            prefix = f"ranks_{n}" if split is None or len(splits) == 1 else f"ranks_{n}_{split}"
            out = Path(tmp) / f"{prefix}.json"
            print(f"bench group: {n} rank(s){f', {split}' if split else ''} ...", flush=True)
            code, tails = _launch(args, n, out, split)
            if code != 0 or not out.exists():
                rows[prefix] = {"error": tails or f"exit {code}"}
                continue
            got = json.loads(out.read_text())
            first = first or got
            for name, row in got["rows"].items():
                rows[f"{prefix}_{name}"] = _row(got, first, name, row, n)
    if args.train:
        print_table(rows, ["examples_per_s", "seconds_per_step", "ratio_vs_first", "error"])
        write_json(args.json, rows)
        return 0
    print_table(
        rows,
        [
            "tokens_per_s",
            "ratio_vs_first",
            "tokens_per_forward",
            "message_ms_per_forward",
            "allsum_ms",
            "handoff_ms",
            "comm_ms_per_round",
            "bytes_per_round",
            "identical",
            "error",
        ],
    )
    # the round size of a group's rows (the cost-aware policy drafts by measured costs)
    spec = [r for r in rows.values() if "allsum_ms" in r and r["tokens_per_forward"] > 1]
    round_tokens = max(1, round(spec[0]["tokens_per_forward"])) if spec else 4
    paper = estimate(round_tokens)
    print(
        f"estimate, 70B over two Macs ({round_tokens} tokens per verify round, "
        f"{paper['bytes_per_round'] / 1e6:.1f} MB all-reduced per round): "
        + "; ".join(
            f"{name} tensor {paper[name]['round_ms']:.1f} ms per round "
            f"({paper[name]['comm_ms_per_round']:.1f} ms comm), pipeline "
            f"{paper[name]['pipeline_round_ms']:.1f} ms"
            for name in LINKS
        )
        + f" (one Mac, if it fit: {paper['forward_ms_one_mac']:.0f} ms)"
    )
    write_json(args.json, {**rows, "estimate_70b_two_macs": paper})
    return 0
