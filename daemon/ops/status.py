"""``specd status``: the running daemon's ``/status`` as a few readable lines.

Also the small formatters other commands share when they print the daemon's state for a person
(a training run's progress, a timestamp).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any
from urllib.parse import quote

from daemon.config import ConfigSources, Settings
from daemon.ops.client import DaemonClient

# `specd status` exits with this when no daemon runs for the data dir (like `systemctl status`).
NOT_RUNNING = 3


def run(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd status [--json]``."""
    client = DaemonClient.find(settings)
    if client is None:
        print(f"specd is not running (no live daemon for data dir {settings.paths.data_dir})")
        return NOT_RUNNING
    if getattr(args, "history", None):
        since = dt.datetime.now().timestamp() - HISTORY_WINDOWS[args.history]
        query = f"/status/history?since={since}&step={HISTORY_WINDOWS[args.history] / 60}"
        if getattr(args, "model", None):
            query += f"&model={quote(args.model)}"
        history = client.request("GET", query, timeout=60)
        print(json.dumps(history, indent=2) if args.json else format_history(history))
        return 0
    status = client.request("GET", "/status", timeout=30)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(client.base_url, status))
    return 0


HISTORY_WINDOWS = {"hour": 3600.0, "day": 86400.0, "week": 604800.0}
SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float | None]) -> str:
    """One character per value, scaled between the series' min and max; a gap is a space."""
    known = [v for v in values if v is not None]
    if not known:
        return " " * len(values)
    lo, hi = min(known), max(known)
    span = (hi - lo) or 1.0
    return "".join(
        " " if v is None else SPARKS[min(len(SPARKS) - 1, int((v - lo) / span * len(SPARKS)))]
        for v in values
    )


def format_history(history: dict[str, Any]) -> str:
    """``specd status --history``: the status page's series as terminal sparklines."""
    traffic = history["traffic"]
    buckets = traffic["buckets"]
    step = traffic["step"]

    def rng(values: list[float | None], unit: str) -> str:
        known = [v for v in values if v is not None]
        return f"{min(known):.3g}-{max(known):.3g} {unit}" if known else "no data"

    tps = [b["tokens_per_s"] for b in buckets]
    acc = [b["acceptance_rate"] for b in buckets]
    req = [b["requests"] * 3600 / step for b in buckets]
    start = _when(traffic["since"])
    lines = [
        f"{history['model']}: {len(buckets)} intervals of {step:.0f} s from {start}",
        f"  tokens/s     {sparkline(tps)}  {rng(tps, 'tok/s')}",
        f"  acceptance   {sparkline(acc)}  {rng(acc, '')}",
        f"  requests/h   {sparkline(req)}  {rng(req, '/h')}",
    ]
    adapters = history["adapters"]
    lines.append(f"  adapter in service: v{adapters['current']}")
    for run in history["runs"][-5:]:
        gate = run.get("gate") or {}
        losses = [s["loss"] for s in run["steps"]]
        lines.append(
            f"  run {run['run_id']}: {run['status']}, {gate.get('decision', '-')}, "
            f"loss {sparkline(losses[-30:])}"
        )
    return "\n".join(lines)


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


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
        f"v{st.get('adapter_version', 0)}, head "
        f"{models.get('draft_head_tokens') or 'full vocabulary'}"
        f"{' tokens' if models.get('draft_head_tokens') else ''}",
        f"  backend: {backend.get('device')} {models.get('dtype', '')}, BLAS {backend.get('blas')}",
        f"  requests: queue depth {st.get('queue_depth', 0)}, rolling acceptance "
        f"{pct(st.get('rolling_acceptance'))}",
    ]
    group = st.get("distributed")
    if group:
        hosts = group.get("hosts") or []
        lines.append(
            f"  group:   {group.get('size')} ranks ({group.get('backend')}): "
            + ", ".join(f"rank {r} {h}" for r, h in enumerate(hosts))
            + f"; target {group.get('split')}"
        )
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
        serving = training.get("in_service") or {}
        if serving.get("version"):
            speedup = serving.get("expected_speedup")
            lines.append(
                f"  adapter: v{serving['version']}, held-out agreement "
                f"{pct(serving.get('heldout_agreement'))}, expected speedup "
                f"{'-' if speedup is None else f'{speedup:.3f}x'} (gate's estimate)"
            )
        run = training.get("run")
        if run:
            lines.append(
                f"  run:     {run.get('run_id')} ({run.get('trigger')}), "
                f"{format_progress(run.get('progress'))}, {run.get('elapsed_s', 0):.0f}s"
            )
    return "\n".join(lines)


def format_progress(progress: dict[str, Any] | None) -> str:
    """A training run's progress (`RunProgress`, as ``/status`` shows it) in a few words."""
    if not progress:
        return "starting"
    text = str(progress.get("phase", "?"))
    if progress.get("total_steps"):
        text += f" step {progress.get('step', 0)}/{progress['total_steps']}"
    if progress.get("loss") is not None:
        text += f", loss {progress['loss']:.3f}"
    return text


def format_time(value: float | None) -> str:
    """A unix time as local ``YYYY-MM-DD HH:MM:SS``; ``-`` for none."""
    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(value).isoformat(sep=" ", timespec="seconds")
