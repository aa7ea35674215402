"""The ``specd`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.config import ConfigError, ConfigSources, Settings, load_settings
from daemon.core.backend import maybe_reexec_with_openblas

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

    return Server(settings, sources, overrides=_overrides(args)).run()


def cmd_import_gguf(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    from daemon.core.gguf import import_gguf

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
    from daemon.bench.speed import bench_speed
    from daemon.core.models import load_pair
    from daemon.core.prompts import read_prompts
    from daemon.store.adapters import AdapterError, AdapterStore, apply_adapter, load_adapter_dir

    prompts = [p.messages for p in read_prompts(args.prompts, limit=args.limit)]
    pair = load_pair(settings)
    k = args.num_draft_tokens or settings.speculative.num_draft_tokens
    draft, adapter = pair.draft, "none"
    if args.adapter == "current":
        store = AdapterStore.for_data_dir(settings.paths.data_dir)
        version = store.current()
        if version is None:
            raise AdapterError(f"no current adapter in {store.root}")
        store.verify(version)  # the checksum check the daemon makes before a swap
        draft, adapter = apply_adapter(pair.fresh_draft, version), f"v{version.version}"
    elif args.adapter is not None:
        draft, adapter = load_adapter_dir(pair.fresh_draft, args.adapter), str(args.adapter)
    print(
        f"bench speed: {len(prompts)} prompts, max_tokens={args.max_tokens}, k={k}, "
        f"target={pair.target_id}, draft={pair.draft_id}, adapter={adapter}"
    )
    result = bench_speed(pair.target, draft, pair.tokenizer, prompts, args.max_tokens, k)
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


def cmd_bench_serve(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    import signal
    import tempfile
    import threading

    from daemon.bench.serve import bench_direct, bench_serve
    from daemon.core.engine import SpeculativeConfig, SpeculativeEngine
    from daemon.core.models import load_pair
    from daemon.core.prompts import read_prompts
    from daemon.server import Server

    prompts = [p.messages for p in read_prompts(args.prompts, limit=args.limit)]
    pair = load_pair(settings)
    engine = SpeculativeEngine(
        pair.target,
        pair.draft,
        pair.tokenizer,
        SpeculativeConfig.from_settings(settings.speculative, pair.max_context),
    )
    print(
        f"bench serve: {len(prompts)} prompts, {args.clients} clients, "
        f"max_tokens={args.max_tokens}; direct engine first, then over HTTP"
    )
    direct = bench_direct(engine, pair.tokenizer, prompts, args.max_tokens)
    # A private server on a free port with a throwaway buffer: benchmark traffic is not recorded
    # into the user's buffer, and the user's daemon (if any) is left alone.
    with tempfile.TemporaryDirectory(prefix="specd-bench-") as tmp:
        bench_settings = settings.model_copy(deep=True)
        bench_settings.paths.data_dir = Path(tmp)
        bench_settings.server.port = 0
        bench_settings.server.host = "127.0.0.1"
        bench_settings.server.api_key = None
        srv = Server(bench_settings, sources, pair)
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        while not srv.ready.wait(0.1):
            if not thread.is_alive():
                raise RuntimeError("benchmark server failed to start")
        try:
            result = bench_serve(
                srv.url, None, prompts, args.clients, args.max_tokens, direct=direct
            )
        finally:
            srv.handle_exit(signal.SIGTERM, None)
            thread.join(60)
    result["direct"] = direct
    print(json.dumps(result, indent=2))
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
    from daemon.bench.draft import bench_draft
    from daemon.core.models import load_pair
    from daemon.core.prompts import read_prompts

    prompts = [p.messages for p in read_prompts(args.prompts, limit=args.limit)]
    pair = load_pair(settings)
    candidates = dict(_candidate(c) for c in args.candidate)
    result = bench_draft(pair.target, pair.tokenizer, prompts, candidates, args.max_tokens)
    _print_table(result, ["layers", "heldout_agreement", "step_ms", "cost_ratio"])
    _write_json(args.json, result)
    return 0


def cmd_collect(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    from daemon.core.prompts import PromptFileError, PromptItem, read_prompts
    from daemon.ops.collect import collect

    items = [PromptItem(messages=[{"role": "user", "content": p}]) for p in args.prompt or []]
    if args.prompts_file is not None:
        items += read_prompts(args.prompts_file, limit=args.limit)
    if not items:
        raise PromptFileError("nothing to collect: give -p PROMPT and/or --prompts-file FILE")
    summary = collect(
        settings, items, args.max_tokens, progress=not args.quiet, use_daemon=not args.in_process
    )
    d = summary.to_dict()
    print(f"collected through: {summary.mode}")
    print(
        f"requests: {d['requests']}  failure cases: {d['failure_cases']}  "
        f"acceptance rate: {d['acceptance_rate']:.3f} ({d['accepted']}/{d['drafted']} drafted)  "
        f"completion tokens: {d['completion_tokens']}"
    )
    if d["pending_failures"] is not None:
        print(
            f"pending failures in the buffer: {d['pending_failures']} "
            f"(training starts at {settings.training.min_failure_cases})"
        )
    for err in d["errors"]:
        print(f"error: {err}", file=sys.stderr)
    return 1 if d["errors"] and not d["requests"] else 0


def _open_buffer(settings: Settings):
    from daemon.store.buffer import ReplayBuffer, buffer_path

    path = buffer_path(settings.paths.data_dir)
    if not path.exists():
        raise ConfigError(f"{path}: no replay buffer yet (serve or collect some requests first)")
    return ReplayBuffer(path, settings.buffer, create=False).open()


def _ts(value: float | None) -> str:
    import datetime as dt

    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(value).isoformat(sep=" ", timespec="seconds")


def cmd_buffer_stats(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    with _open_buffer(settings) as buf:
        st = buf.stats()
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"buffer: {st['path']} ({st['size_bytes'] / 1e6:.2f} MB, schema v{st['schema_version']})")
    print(
        f"records: {st['records']} / {st['max_records']}  (train {st['train']}, "
        f"holdout {st['holdout']})  from {_ts(st['oldest'])} to {_ts(st['newest'])}"
    )
    print(
        f"failure cases: {st['failures']}  (train {st['train_failures']}, "
        f"holdout {st['holdout_failures']})  used for training: {st['used_for_training']}"
    )
    print(
        f"pending failures: {st['pending_failures']}  "
        f"(training starts at {settings.training.min_failure_cases})"
    )
    if st["acceptance_trend"]:
        print("acceptance trend (oldest -> newest):")
        for b in st["acceptance_trend"]:
            rate = b.get("token_acceptance")
            rate_s = "-" if rate is None else f"{rate:.3f}"
            print(f"  {_ts(b['start'])}  {b.get('records', 0):>5} requests  acceptance {rate_s}")
    for a in st["acceptance_by_adapter"]:
        m = a["mean_acceptance"]
        print(
            f"adapter v{a['adapter_version']}: {a['records']} requests, mean acceptance "
            f"{'-' if m is None else f'{m:.3f}'}"
        )
    return 0


def cmd_buffer_export(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    from daemon.core.models import load_tokenizer

    tokenizer = load_tokenizer(settings.models.target, settings.models_dir)
    with _open_buffer(settings) as buf:
        n = buf.export_jsonl(args.jsonl, decode=tokenizer.decode)
    print(f"exported {n} records to {args.jsonl}")
    return 0


def _parse_date(text: str) -> float:
    import datetime as dt

    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid date {text!r}: use ISO format, e.g. 2026-11-01 or 2026-11-01T12:00"
        ) from None
    return when.timestamp()


def cmd_buffer_purge(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    with _open_buffer(settings) as buf:
        n = buf.purge(None if args.all else args.before)
    print(f"purged {n} records" + ("" if args.all else f" created before {_ts(args.before)}"))
    return 0


def _print_gate(decision: dict[str, Any], version: int | None) -> None:
    before, after = decision.get("heldout_before"), decision.get("heldout_after")
    if before is not None and after is not None:
        print(
            f"held-out agreement: before {before:.4f} -> after {after:.4f} ({after - before:+.4f})"
        )
    what = {"install": "installed", "reject": "kept as rejected", "error": "failed"}
    print(
        f"adapter: {what.get(decision['decision'], decision['decision'])}"
        + (f" as v{version}" if version else "")
        + f" ({decision.get('reason')})"
    )


def cmd_train(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    import time

    from daemon.ops.client import DaemonClient

    client = DaemonClient.find(settings)
    if client is not None:
        body = {k: v for k, v in (("epochs", args.epochs), ("max_steps", args.max_steps)) if v}
        run_id = client.request("POST", "/admin/train", body)["run_id"]
        print(
            f"training run {run_id} started by the running daemon at {client.base_url} "
            "(every step: specd logs --training --follow)"
        )
        shown = None
        while True:
            time.sleep(2)
            training = client.request("GET", "/status", timeout=30).get("training") or {}
            run = training.get("run") or {}
            if not args.quiet and run.get("run_id") == run_id:
                p = run.get("progress") or {}
                # a line per phase, and per tenth of the training steps
                mark = (p.get("phase"), 10 * p.get("step", 0) // max(1, p.get("total_steps", 1)))
                if mark != shown:
                    shown = mark
                    print(f"  {format_progress(p)}", flush=True)
            last = training.get("last_run") or {}
            if last.get("run_id") == run_id:
                _print_gate(last, last.get("adapter_version"))
                return 0 if last.get("decision") != "error" else 1
    from daemon.adaptation.loop import train_and_gate

    print("training in a subprocess (no daemon running for this data dir)")
    result, decision, version = train_and_gate(
        settings, sources.main_file, args.epochs, args.max_steps, progress=not args.quiet
    )
    m = result.get("metrics") or {}
    if m:
        ex = m.get("examples", {})
        print(
            f"trained on {ex.get('failures', 0)} failure cases + {ex.get('replay', 0)} replay "
            f"rows: {m.get('steps')} steps, loss {m.get('loss_first', 0):.3f} -> "
            f"{m.get('loss_last', 0):.3f}, {m.get('tokens_per_s', 0):.0f} tokens/s"
        )
    elif result.get("error"):
        print(f"training failed: {result['error']}", file=sys.stderr)
    _print_gate(decision, version.version if version else None)
    return 0 if decision["decision"] != "error" else 1


def cmd_adapters(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    from daemon.ops.client import DaemonClient
    from daemon.store.adapters import AdapterStore

    client = DaemonClient.find(settings)
    if args.action == "rollback":
        if client is not None:
            body = {} if args.version is None else {"version": args.version}
            out = client.request("POST", "/admin/adapters/rollback", body)
            where = f"live in the daemon at {client.base_url}"
        else:
            store = AdapterStore.for_data_dir(settings.paths.data_dir)
            previous = store.current_version()
            target = store.rollback_target(args.version)
            store.set_current(target)
            out = {"previous_version": previous, "adapter_version": target}
            where = "(no daemon running: used at its next start)"
        print(f"adapter v{out['previous_version']} -> v{out['adapter_version']} {where}")
        return 0
    store = AdapterStore.for_data_dir(settings.paths.data_dir)
    current = store.current_version()
    versions = store.versions()
    if not versions:
        print(f"no adapters yet in {store.root}")
        return 0
    for v in versions:
        gate_info = v.manifest.get("gate") or {}
        before, after = gate_info.get("heldout_before"), gate_info.get("heldout_after")
        scores = f"{before:.4f} -> {after:.4f}" if before is not None and after is not None else "-"
        mark = "*" if v.version == current else " "
        print(
            f"{mark} v{v.version:<4} {v.status:<9} {_ts(v.manifest.get('created'))}  "
            f"parent v{v.manifest.get('parent', 0)}  held-out {scores}"
        )
    if current == 0:
        print("* none: the draft serves without an adapter")
    return 0


def cmd_bench_adapt(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    from daemon.bench.adapt import bench_adapt
    from daemon.core.prompts import read_prompts

    train = [p.messages for p in read_prompts(args.train_prompts, limit=args.train_limit)]
    eval_items = read_prompts(args.eval_prompts, limit=args.eval_limit)
    evals = [p.messages for p in eval_items]
    # broken down by the prompt file's "domain" field when every eval prompt has one
    domains = [p.meta.get("domain") for p in eval_items]
    groups = [str(d) for d in domains] if all(d is not None for d in domains) else None
    print(
        f"bench adapt: {len(train)} train prompts, {len(evals)} eval prompts, "
        f"max_tokens={args.max_tokens}, min_failure_cases="
        f"{settings.training.min_failure_cases}"
    )
    result = bench_adapt(
        settings, sources.main_file, train, evals, args.max_tokens, eval_groups=groups
    )
    rows = {k: result[k] for k in ("target_only", "before", "after")}
    for when in ("before", "after"):
        for g, m in result[when].get("by_group", {}).items():
            rows[f"{when}[{g}]"] = m
    _print_table(
        rows,
        [
            "tokens_per_s",
            "speedup_vs_target",
            "acceptance_rate",
            "mean_accepted_length",
            "heldout_agreement",
            "adapter_version",
        ],
    )
    print(
        f"training runs: {result['training_runs']}, adapters installed: "
        f"{result['adapters_installed']}, wall: {result['wall_s']:.0f}s"
    )
    _write_json(args.json, result)
    return 0


def cmd_bench_blas(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    from daemon.bench.blas import bench_blas, blas_probe
    from daemon.core.models import load_pair

    if args.probe:  # the child: one measurement in this process's environment
        print(json.dumps(blas_probe(load_pair(settings).target)))
        return 0
    base = ["bench", "blas"]
    if args.config:
        base += ["--config", str(args.config)]
    base += ["--data-dir", str(settings.paths.data_dir)]
    result = bench_blas(base)
    rows = {k: v for k, v in result.items() if isinstance(v, dict)}
    _print_table(rows, ["blas", "prefill_tokens_per_s", "decode_tokens_per_s"])
    print(
        f"OpenBLAS speed-up: prefill {result['prefill_speedup']:.1f}x, "
        f"decode {result['decode_speedup']:.1f}x"
    )
    _write_json(args.json, result)
    return 0


def cmd_bench_train(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    from daemon.adaptation.training import bench_train

    result = bench_train(
        settings, epochs=args.epochs, max_steps=args.max_steps, out_dir=args.out, progress=True
    )
    _print_table(
        {"train": result},
        [
            "heldout_before",
            "heldout_after",
            "examples",
            "steps",
            "tokens_per_s",
            "peak_memory_bytes",
            "train_seconds",
        ],
    )
    _write_json(args.json, {"train": result})
    return 0


def cmd_service(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    from daemon.ops.install import execute, plan

    config = args.config.expanduser().resolve() if args.config else None
    data_dir = args.data_dir.expanduser().resolve() if args.data_dir else None
    p = plan(args.action, settings, config, data_dir, manager=args.manager)
    return execute(p, args.action, args.dry_run)


def cmd_logs(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    from daemon.ops.logview import parse_since, show_logs

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return show_logs(settings.log_file, follow=args.follow, training=args.training, since=since)


def cmd_status(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    from daemon.ops.client import DaemonClient

    client = DaemonClient.find(settings)
    if client is None:
        print(f"specd is not running (no live daemon for data dir {settings.paths.data_dir})")
        return 3
    status = client.request("GET", "/status", timeout=30)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(client.base_url, status))
    return 0


def format_status(url: str, st: dict[str, Any]) -> str:
    """/status as a few readable lines."""

    def pct(v: Any) -> str:
        return "-" if v is None else f"{v:.1%}"

    models = st.get("models", {})
    backend = st.get("backend", {})
    lines = [
        f"specd at {url}  (up {st.get('uptime_s', 0):.0f}s, pid {st.get('pid', '?')})",
        f"  target:  {models.get('target')}",
        f"  draft:   {models.get('draft')} ({models.get('draft_kind')}), adapter "
        f"v{st.get('adapter_version', 0)}",
        f"  backend: {backend.get('device')} {models.get('dtype', '')}, BLAS {backend.get('blas')}",
        f"  requests: queue depth {st.get('queue_depth', 0)}, rolling acceptance "
        f"{pct(st.get('rolling_acceptance'))}",
    ]
    buf = st.get("buffer")
    if buf:
        lines.append(
            f"  buffer:  {buf.get('records')} records, {buf.get('pending_failures')} pending "
            f"failures, {buf.get('size_bytes', 0) / 1e6:.1f} MB"
        )
    training = st.get("training")
    if training:
        lines.append(
            "  training: "
            + ", ".join(f"{k}={v}" for k, v in training.items() if not isinstance(v, dict | list))
        )
        run = training.get("run")
        if run:
            lines.append(
                f"  run:     {run.get('run_id')} ({run.get('trigger')}), "
                f"{format_progress(run.get('progress'))}, {run.get('elapsed_s', 0):.0f}s"
            )
    return "\n".join(lines)


def format_progress(progress: dict[str, Any] | None) -> str:
    """A training run's progress (`daemon.adaptation.training.RunProgress`) in a few words."""
    if not progress:
        return "starting"
    text = str(progress.get("phase", "?"))
    if progress.get("total_steps"):
        text += f" step {progress.get('step', 0)}/{progress['total_steps']}"
    if progress.get("loss") is not None:
        text += f", loss {progress['loss']:.3f}"
    return text


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
    p.set_defaults(func=cmd_train, needs_mlx=True)

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
    p.set_defaults(func=cmd_adapters, log_to_file=False)

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
    p.set_defaults(func=cmd_collect, needs_mlx=True)

    p = sub.add_parser(
        "buffer",
        help="inspect and manage the replay buffer",
        description="Inspect and manage the replay buffer of draft failures.",
    )
    bsub = p.add_subparsers(dest="buffer_command", metavar="ACTION", required=True)
    q = bsub.add_parser("stats", help="counts, pending failures, size, acceptance trend")
    _common(q)
    q.add_argument("--json", action="store_true", help="print the raw statistics as JSON")
    q.set_defaults(func=cmd_buffer_stats)
    q = bsub.add_parser(
        "export",
        help="write failures.jsonl-style records",
        description="Export every record as JSON Lines: prompt, draft_output (the output with "
        "each rejected position showing the draft's token), target_output, disagreements.",
    )
    _common(q)
    q.add_argument("--jsonl", type=Path, required=True, metavar="OUT")
    q.set_defaults(func=cmd_buffer_export, needs_mlx=True)
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
    q.set_defaults(func=cmd_buffer_purge)

    p = sub.add_parser(
        "status",
        help="show the running daemon's status",
        description="Print the running daemon's /status (found via runtime.json in the data dir).",
    )
    _common(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=cmd_status, log_to_file=False)

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
    p.set_defaults(func=cmd_logs, log_to_file=False)

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
    p.set_defaults(func=cmd_service, log_to_file=False)

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
    q.add_argument(
        "--adapter",
        metavar="DIR|current",
        help="measure the draft with this mlx-lm adapter directory (e.g. `bench train --out`), "
        "or the data dir's current one (default: no adapter)",
    )
    q.set_defaults(func=cmd_bench_speed, needs_mlx=True)

    q = bsub.add_parser(
        "serve",
        help="concurrent streaming clients over HTTP vs the engine called directly",
        description="Time to first token and tokens/s for N concurrent streaming clients against "
        "a private in-process server on the configured pair, and the overhead versus calling "
        "the engine directly on the same prompts.",
    )
    _common(q)
    _prompt_args(q, limit=8, max_tokens=64)
    q.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    q.set_defaults(func=cmd_bench_serve, needs_mlx=True)

    q = bsub.add_parser(
        "adapt",
        help="the adaptive loop end to end: eval before, train traffic, eval after",
        description="Measure the engine on the eval prompts, send the train prompts through it "
        "exactly as the daemon serves them (the loop trains, gates and swaps with the configured "
        "min_failure_cases), then measure the eval prompts again. Uses a private data dir.",
    )
    _common(q)
    q.add_argument("--train-prompts", type=Path, required=True, metavar="A.jsonl")
    q.add_argument("--eval-prompts", type=Path, required=True, metavar="B.jsonl")
    q.add_argument("--train-limit", type=int, help="use at most this many train prompts")
    q.add_argument("--eval-limit", type=int, help="use at most this many eval prompts")
    q.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (64)")
    q.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    q.set_defaults(func=cmd_bench_adapt, needs_mlx=True)

    q = bsub.add_parser(
        "blas",
        help="MLX's bundled BLAS vs the system OpenBLAS on the target (Linux)",
        description="Prefill (256 tokens) and decode speed of the target in two child "
        "processes, one with MLX's bundled reference BLAS and one with OpenBLAS preloaded.",
    )
    _common(q)
    q.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    q.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    q.set_defaults(func=cmd_bench_blas, needs_mlx=False)

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
    q.add_argument(
        "--out", type=Path, metavar="DIR", help="keep the adapter here (for bench speed --adapter)"
    )
    q.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    q.set_defaults(func=cmd_bench_train, needs_mlx=True)

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

    # One-shot commands print their own results; their log events go to the file only.
    console = settings.logging.console if args.command == "serve" else "off"
    log_file = settings.log_file if getattr(args, "log_to_file", True) else None
    configure_logging(settings.logging.level, log_file, console)
    handler: Handler = args.func
    try:
        return handler(args, settings, sources)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        # Known failure kinds carry a message meant for the user; anything else is a bug.
        from daemon.core.gguf import GGUFImportError
        from daemon.core.models import ModelLoadError
        from daemon.core.prompts import PromptFileError
        from daemon.ops.client import DaemonError
        from daemon.ops.install import ServiceError
        from daemon.store.adapters import AdapterError
        from daemon.store.buffer import BufferError

        known = (
            ModelLoadError,
            GGUFImportError,
            ConfigError,
            PromptFileError,
            BufferError,
            DaemonError,
            ServiceError,
            AdapterError,
        )
        if isinstance(e, known):
            get_logger("cli").error("failed", error=str(e))
            print(f"specd: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
