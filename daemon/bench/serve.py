"""``specd bench serve``: concurrent streaming clients against a running daemon.

`bench_serve` drives N client threads (stdlib ``http.client``, no extra dependency) that send
streaming chat completions to ``/v1/chat/completions`` and time each one: time to first token
(the first event carrying text), end-to-end latency and tokens (from the final usage chunk).
`bench_direct` runs the same prompts through a `SpeculativeEngine` in-process, one after the
other, so that ``bench_serve(..., direct=bench_direct(...))`` also reports the serving overhead.

A lone request is decoded speculatively; concurrent ones are decoded together (continuous
batching), so total throughput grows with the number of clients while each request's time to
first token stays near a lone request's (a new request joins the running batch).
`bench_scaling` runs several client counts on one server, side by side.

`run` is the ``specd bench serve`` command: it starts a private in-process `Server` on the
configured pair and measures it with these clients. It imports the models and the server
itself, so the client half of this module stays stdlib-only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import queue
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from daemon.bench.report import write_json
from daemon.core.prompts import read_conversations

if TYPE_CHECKING:
    from daemon.config import ConfigSources, Settings

__all__ = ["bench_direct", "bench_scaling", "bench_serve", "run", "summarize"]


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in [0, 100]); 0.0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """mean, p50, p95 and max of ``values`` (zeros when empty)."""
    return {
        "mean": sum(values) / len(values) if values else 0.0,
        "p50": _percentile(values, 50),
        "p95": _percentile(values, 95),
        "max": max(values) if values else 0.0,
    }


def _stream_chat(
    base: Any,
    api_key: str | None,
    messages: list[dict[str, Any]],
    max_tokens: int,
    model: str | None,
    timeout: float,
) -> dict[str, Any]:
    """One streaming request; returns its timings and token counts."""
    conn_cls = http.client.HTTPSConnection if base.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(base.hostname, base.port, timeout=timeout)
    body: dict[str, Any] = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    out: dict[str, Any] = {"ok": False, "ttft": None, "tokens": 0, "text_chunks": 0, "text": ""}
    t0 = time.perf_counter()
    try:
        conn.request("POST", base.path + "/v1/chat/completions", json.dumps(body), headers)
        resp = conn.getresponse()
        if resp.status != 200:
            out["error"] = f"HTTP {resp.status}: {resp.read(2000).decode(errors='replace')}"
            return out
        usage = None
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                out["ok"] = True
                break
            event = json.loads(data)
            if "error" in event:
                out["error"] = str(event["error"])
                break
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    out["text"] += choice["delta"]["content"]
                    out["text_chunks"] += 1
                    if out["ttft"] is None:
                        out["ttft"] = time.perf_counter() - t0
            if event.get("usage"):
                usage = event["usage"]
        if usage is not None:
            out["tokens"] = int(usage.get("completion_tokens", 0))
            out["prompt_tokens"] = int(usage.get("prompt_tokens", 0))
            details = usage.get("prompt_tokens_details") or {}
            out["cached_tokens"] = int(details.get("cached_tokens", 0))
            spec = usage.get("speculative") or {}
            out["drafted"] = int(spec.get("drafted", 0))
            out["accepted"] = int(spec.get("accepted", 0))
            out["batched_tokens"] = int(spec.get("batched_tokens", 0))
        else:  # a server without include_usage support: count text events
            out["tokens"] = out["text_chunks"]
    except (OSError, http.client.HTTPException, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        out["latency"] = time.perf_counter() - t0
        if out["ttft"] is None:
            out["ttft"] = out["latency"]
        conn.close()
    return out


def bench_serve(
    base_url: str,
    api_key: str | None,
    prompts: Sequence[list[dict[str, Any]]],
    clients: int,
    max_tokens: int,
    *,
    requests: int | None = None,
    direct: dict[str, Any] | None = None,
    model: str | None = None,
    warmup: bool = True,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Benchmark a running daemon with ``clients`` concurrent streaming chat clients.

    Args:
        base_url: the daemon's address, e.g. ``http://127.0.0.1:8765`` (a trailing ``/v1`` is
            ignored); ``runtime.json`` in the data directory has it.
        api_key: the bearer token (``server.api_key``), or None.
        prompts: chat prompts, each a list of ``{"role", "content"}`` messages.
        clients: number of concurrent clients (threads), >= 1.
        max_tokens: tokens per request (greedy decoding, temperature 0).
        requests: total requests (default ``max(len(prompts), clients)``); prompts are used in
            order, cycling; clients take the next request as soon as they are free.
        direct: `bench_direct` results on the same prompts and ``max_tokens``; adds
            ``overhead`` to the result.
        model: sent as ``model`` (default: omitted, i.e. the served model).
        warmup: send one untimed request first.
        timeout: socket timeout per request, in seconds.

    Returns:
        ``clients``, ``requests``, ``completed``, ``errors`` (+ ``error_samples``), ``wall_s``,
        ``tokens``, ``ttft_s`` and ``latency_s`` (mean/p50/p95/max over requests),
        ``total_tokens_per_s`` (all tokens over wall time), ``per_client_tokens_per_s``
        (each client's tokens over its busy time: mean/p50/p95/max), ``acceptance_rate`` and,
        with ``direct``, ``overhead``: ``direct_tokens_per_s``, ``throughput_ratio`` (served
        total / direct; 1.0 = no loss), ``overhead_pct`` ((direct / served - 1) * 100) and
        ``ttft_added_p50_s`` (served minus direct median TTFT; includes queueing when
        ``clients`` > 1).
    """
    if not prompts:
        raise ValueError("bench_serve needs at least one prompt")
    if clients < 1:
        raise ValueError("clients must be >= 1")
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    url = base_url.rstrip("/")
    url = url.removesuffix("/v1")
    base = urlsplit(url)
    if base.scheme not in ("http", "https") or not base.hostname:
        raise ValueError(f"base_url must be http(s)://host:port, got {base_url!r}")
    n_requests = requests if requests is not None else max(len(prompts), clients)

    if warmup:
        _stream_chat(base, api_key, list(prompts[0]), min(max_tokens, 8), model, timeout)

    work: queue.Queue[int] = queue.Queue()
    for i in range(n_requests):
        work.put(i)
    results: list[dict[str, Any] | None] = [None] * n_requests
    busy = [0.0] * clients
    client_tokens = [0] * clients

    def client(c: int) -> None:
        while True:
            try:
                i = work.get_nowait()
            except queue.Empty:
                return
            r = _stream_chat(
                base, api_key, list(prompts[i % len(prompts)]), max_tokens, model, timeout
            )
            results[i] = r
            busy[c] += r["latency"]
            if r["ok"]:
                client_tokens[c] += r["tokens"]

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    done = [r for r in results if r is not None]
    ok = [r for r in done if r["ok"]]
    errors = [r.get("error", "incomplete stream") for r in done if not r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    drafted = sum(r.get("drafted", 0) for r in ok)
    accepted = sum(r.get("accepted", 0) for r in ok)
    per_client = [client_tokens[c] / busy[c] for c in range(clients) if busy[c] > 0]
    total_tps = tokens / wall if wall > 0 else 0.0
    out: dict[str, Any] = {
        "clients": clients,
        "requests": n_requests,
        "completed": len(ok),
        "errors": len(errors),
        "error_samples": errors[:5],
        "max_tokens": max_tokens,
        "wall_s": wall,
        "tokens": tokens,
        "ttft_s": summarize([r["ttft"] for r in ok]),
        "latency_s": summarize([r["latency"] for r in ok]),
        "total_tokens_per_s": total_tps,
        "per_client_tokens_per_s": summarize(per_client),
        "acceptance_rate": accepted / drafted if drafted else None,
        # share of the tokens decoded in a batch with other requests (continuous batching)
        "batched_share": sum(r.get("batched_tokens", 0) for r in ok) / tokens if tokens else 0.0,
    }
    if direct is not None:
        d_tps = float(direct.get("tokens_per_s", 0.0))
        d_ttft = float(direct.get("ttft_s", {}).get("p50", 0.0))
        out["overhead"] = {
            "direct_tokens_per_s": d_tps,
            "throughput_ratio": total_tps / d_tps if d_tps > 0 else None,
            "overhead_pct": (d_tps / total_tps - 1.0) * 100.0 if total_tps > 0 else None,
            "ttft_added_p50_s": out["ttft_s"]["p50"] - d_ttft,
        }
    return out


def bench_conversations(
    urls: dict[str, str],
    conversations: Sequence[Sequence[str]],
    max_tokens: int,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Multi-turn conversations against each server in ``urls`` (name -> base URL), side by
    side: each conversation runs on every server before the next, so drift hits all alike.

    A turn sends the whole history, the server's own earlier answers included, as chat clients
    do. Returns a row per server and turn (``{name}_turn{i}``: ``ttft_s`` mean/p50/p95/max,
    ``prompt_tokens`` and ``cached_tokens`` means), ``identical`` (every answer the same on
    every server) and ``errors``.
    """
    bases = {name: urlsplit(url.rstrip("/").removesuffix("/v1")) for name, url in urls.items()}
    for base in bases.values():  # warm-up, untimed
        _stream_chat(base, None, [{"role": "user", "content": "Hi"}], 4, None, timeout)
    per: dict[str, dict[int, list[dict[str, Any]]]] = {name: {} for name in urls}
    answers: dict[str, list[str]] = {name: [] for name in urls}
    errors: list[str] = []
    for turns in conversations:
        for name, base in bases.items():
            history: list[dict[str, Any]] = []
            for i, user in enumerate(turns, 1):
                history.append({"role": "user", "content": user})
                r = _stream_chat(base, None, list(history), max_tokens, None, timeout)
                if not r["ok"]:
                    errors.append(f"{name} turn {i}: {r.get('error', 'incomplete stream')}")
                    break
                per[name].setdefault(i, []).append(r)
                answers[name].append(r["text"])
                history.append({"role": "assistant", "content": r["text"]})
    out: dict[str, Any] = {}
    for name, turns_seen in per.items():
        for i, rs in sorted(turns_seen.items()):
            out[f"{name}_turn{i}"] = {
                "requests": len(rs),
                "ttft_s": summarize([r["ttft"] for r in rs]),
                "prompt_tokens": sum(r.get("prompt_tokens", 0) for r in rs) / len(rs),
                "cached_tokens": sum(r.get("cached_tokens", 0) for r in rs) / len(rs),
            }
    texts = list(answers.values())
    out["identical"] = all(t == texts[0] for t in texts[1:])
    out["errors"] = errors
    return out


def bench_scaling(
    base_url: str,
    api_key: str | None,
    prompts: Sequence[list[dict[str, Any]]],
    client_counts: Sequence[int],
    max_tokens: int,
    *,
    requests_per_client: int = 2,
) -> dict[str, Any]:
    """`bench_serve` at each of ``client_counts`` on one server, side by side.

    Each count sends ``max(len(prompts), requests_per_client * clients)`` requests. Returns
    one row per count (``clients_N``: `bench_serve`'s result) and ``scaling``: per count, its
    total tokens/s and TTFT p50 over those of the smallest count (1 client: a lone request).
    """
    if not client_counts:
        raise ValueError("bench_scaling needs at least one client count")
    out: dict[str, Any] = {}
    for i, n in enumerate(client_counts):
        out[f"clients_{n}"] = bench_serve(
            base_url,
            api_key,
            prompts,
            n,
            max_tokens,
            requests=max(len(prompts), requests_per_client * n),
            warmup=i == 0,
        )
    base = out[f"clients_{client_counts[0]}"]
    b_tps, b_ttft = base["total_tokens_per_s"], base["ttft_s"]["p50"]
    out["scaling"] = {
        f"clients_{n}": {
            "total_tokens_per_s_ratio": out[f"clients_{n}"]["total_tokens_per_s"] / b_tps
            if b_tps
            else None,
            "ttft_p50_ratio": out[f"clients_{n}"]["ttft_s"]["p50"] / b_ttft if b_ttft else None,
        }
        for n in client_counts
    }
    return out


def bench_direct(
    engine: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, Any]]],
    max_tokens: int,
    *,
    warmup: bool = True,
) -> dict[str, Any]:
    """The same prompts through ``engine`` in-process, sequentially (greedy), for comparison.

    ``engine`` is a `daemon.core.engine.SpeculativeEngine` that nothing else uses meanwhile.
    Returns ``requests``, ``tokens``, ``seconds``, ``tokens_per_s`` (tokens over total time),
    ``ttft_s`` and ``latency_s`` (mean/p50/p95/max) and ``acceptance_rate``.
    """
    from daemon.core.engine import GenerationResult, SamplingParams
    from daemon.core.prompts import encode_prompt

    if not prompts:
        raise ValueError("bench_direct needs at least one prompt")
    encoded = [encode_prompt(tokenizer, list(p)) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    if warmup:
        engine.run(encoded[0], SamplingParams(temperature=0.0, max_tokens=min(max_tokens, 8)))
    ttfts, latencies = [], []
    tokens = drafted = accepted = 0
    for tok in encoded:
        result = GenerationResult()
        t0 = time.perf_counter()
        ttft = None
        for chunk in engine.generate(tok, params, result):
            if ttft is None and chunk.text:
                ttft = time.perf_counter() - t0
        latency = time.perf_counter() - t0
        ttfts.append(ttft if ttft is not None else latency)
        latencies.append(latency)
        tokens += result.stats.generation_tokens
        drafted += result.stats.drafted
        accepted += result.stats.accepted
    seconds = sum(latencies)
    return {
        "requests": len(encoded),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "ttft_s": summarize(ttfts),
        "latency_s": summarize(latencies),
        "acceptance_rate": accepted / drafted if drafted else None,
    }


def run(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd bench serve``: the engine called directly, then N clients over HTTP."""
    import signal
    import tempfile

    from daemon.core.engine import SpeculativeConfig, SpeculativeEngine
    from daemon.core.models import load_pair
    from daemon.core.prompts import read_prompts

    if args.conversations is not None:
        return _run_conversations(args, settings, sources)
    if args.prompts is None:
        raise SystemExit("bench serve: give --prompts FILE.jsonl or --conversations FILE.jsonl")
    prompts = [p.messages for p in read_prompts(args.prompts, limit=args.limit)]
    counts = _client_counts(args.clients)
    pair = load_pair(settings)
    if len(counts) > 1:
        return _run_scaling(args, settings, sources, pair, prompts, counts)
    engine = SpeculativeEngine(
        pair.target,
        pair.draft,
        pair.tokenizer,
        SpeculativeConfig.from_settings(settings.speculative, pair.max_context),
    )
    print(
        f"bench serve: {len(prompts)} prompts, {counts[0]} clients, "
        f"max_tokens={args.max_tokens}; direct engine first, then over HTTP"
    )
    direct = bench_direct(engine, pair.tokenizer, prompts, args.max_tokens)
    with tempfile.TemporaryDirectory(prefix="specd-bench-") as tmp:
        srv, thread = _private_server(settings, sources, pair, tmp)
        try:
            result = bench_serve(srv.url, None, prompts, counts[0], args.max_tokens, direct=direct)
        finally:
            srv.handle_exit(signal.SIGTERM, None)
            thread.join(60)
    result["direct"] = direct
    print(json.dumps(result, indent=2))
    write_json(args.json, result)
    return 0


def _client_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"bench serve: --clients takes counts >= 1 like 1,2,4,8, got {text!r}")
    return counts


def _run_scaling(
    args: argparse.Namespace,
    settings: Settings,
    sources: ConfigSources,
    pair: Any,
    prompts: list[list[dict[str, Any]]],
    counts: list[int],
) -> int:
    """``--clients 1,2,4,8``: each count against one private server, side by side."""
    import signal
    import tempfile

    from daemon.bench.report import print_table

    print(
        f"bench serve: {len(prompts)} prompts, clients {counts}, max_tokens={args.max_tokens}, "
        f"server.batch_size={settings.server.batch_size}"
    )
    with tempfile.TemporaryDirectory(prefix="specd-bench-") as tmp:
        srv, thread = _private_server(settings, sources, pair, tmp)
        try:
            result = bench_scaling(srv.url, None, prompts, counts, args.max_tokens)
        finally:
            srv.handle_exit(signal.SIGTERM, None)
            thread.join(60)
    rows = {}
    for n in counts:
        r, sc = result[f"clients_{n}"], result["scaling"][f"clients_{n}"]
        rows[f"clients_{n}"] = {
            "total_tok_s": r["total_tokens_per_s"],
            "x_total": sc["total_tokens_per_s_ratio"],
            "per_client_tok_s_p50": r["per_client_tokens_per_s"]["p50"],
            "ttft_p50_s": r["ttft_s"]["p50"],
            "ttft_p95_s": r["ttft_s"]["p95"],
            "x_ttft_p50": sc["ttft_p50_ratio"],
            "batched_share": r["batched_share"],
            "errors": r["errors"],
        }
    print_table(rows, list(next(iter(rows.values())).keys()))
    write_json(args.json, result)
    return 0


def _private_server(
    settings: Settings, sources: ConfigSources, pair: Any, tmp: str
) -> tuple[Any, threading.Thread]:
    """A `Server` on a free loopback port with a throwaway data dir (benchmark traffic is not
    recorded into the user's buffer) and no training (it would compete for the CPU)."""
    from pathlib import Path

    from daemon.server import Server

    s = settings.model_copy(deep=True)
    s.paths.data_dir = Path(tmp)
    s.server.port = 0
    s.server.host = "127.0.0.1"
    s.server.api_key = None
    s.training.enabled = False
    srv = Server(s, sources, pair)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.ready.wait(0.1):
        if not thread.is_alive():
            raise RuntimeError("benchmark server failed to start")
    return srv, thread


def _run_conversations(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``--conversations``: TTFT per turn with and without the prompt cache, side by side."""
    import signal
    import tempfile

    from daemon.bench.report import print_table
    from daemon.core.models import load_pair

    conversations = read_conversations(args.conversations, args.limit)
    pair = load_pair(settings)
    if not settings.server.prompt_cache_size:
        raise SystemExit("bench serve --conversations: server.prompt_cache_size is 0 (off)")
    off = settings.model_copy(deep=True)
    off.server.prompt_cache_size = 0
    print(
        f"bench serve: {len(conversations)} conversations, max_tokens={args.max_tokens}, "
        f"prompt cache {settings.server.prompt_cache_size} entries vs off"
    )
    servers = []
    with tempfile.TemporaryDirectory(prefix="specd-bench-") as a:
        with tempfile.TemporaryDirectory(prefix="specd-bench-") as b:
            try:
                servers = [
                    _private_server(settings, sources, pair, a),
                    _private_server(off, sources, pair, b),
                ]
                urls = {"cache": servers[0][0].url, "no_cache": servers[1][0].url}
                result = bench_conversations(urls, conversations, args.max_tokens)
            finally:
                for srv, thread in servers:
                    srv.handle_exit(signal.SIGTERM, None)
                    thread.join(60)
    turns = sorted({int(k.rsplit("turn", 1)[1]) for k in result if "_turn" in k})
    for i in turns:
        on, no = result.get(f"cache_turn{i}"), result.get(f"no_cache_turn{i}")
        if on and no and no["ttft_s"]["p50"] > 0:
            result[f"turn{i}_ttft_ratio"] = {
                "p50": on["ttft_s"]["p50"] / no["ttft_s"]["p50"],
                "mean": on["ttft_s"]["mean"] / no["ttft_s"]["mean"],
            }
    rows = {
        k: {
            "ttft_p50_s": v["ttft_s"]["p50"],
            "ttft_mean_s": v["ttft_s"]["mean"],
            "prompt_tokens": v["prompt_tokens"],
            "cached_tokens": v["cached_tokens"],
        }
        for k, v in result.items()
        if k.endswith(tuple(f"_turn{i}" for i in turns)) and isinstance(v, dict)
    }
    print_table(rows, ["ttft_p50_s", "ttft_mean_s", "prompt_tokens", "cached_tokens"])
    for i in turns:
        if f"turn{i}_ttft_ratio" in result:
            r = result[f"turn{i}_ttft_ratio"]
            print(
                f"turn {i}: TTFT with the cache / without: p50 {r['p50']:.3f}, mean {r['mean']:.3f}"
            )
    print(f"identical answers: {result['identical']}; errors: {len(result['errors'])}")
    write_json(args.json, result)
    return 0
