"""``specd status``: the running daemon's ``/status`` as a few readable lines.

Also the small formatters other commands share when they print the daemon's state for a person
(a training run's progress, a timestamp).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any

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
