"""``specd models ...``: the models a daemon serves, and model files a person manages."""

from __future__ import annotations

import argparse
from typing import Any

from daemon.config import ConfigSources, Settings
from daemon.errors import DaemonError
from daemon.ops.client import DaemonClient


def run_list(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd models list``: the served models (models.target first) as configured, and, when
    the daemon runs, whether each is loaded and its adapter version."""
    live: dict[str, dict[str, Any]] = {}
    client = DaemonClient.find(settings)
    if client is not None:
        try:
            live = {m["id"]: m for m in client.request("GET", "/v1/models", timeout=10)["data"]}
        except (DaemonError, KeyError, TypeError) as e:
            print(f"(the daemon did not list its models: {e})")
    rows = [("name", "target", "loaded", "adapter")]
    for name in settings.models.names():
        m, state = settings.models.entry(name), live.get(name)
        loaded = "-" if state is None else ("yes" if state.get("loaded") else "no")
        adapter = "-" if state is None else f"v{state.get('adapter_version') or 0}"
        rows.append((name, m.target, loaded, adapter))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    if client is None:
        print("(no daemon running for this data dir: loaded and adapter unknown)")
    return 0


def run_import_gguf(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd models import-gguf GGUF OUTDIR [--overwrite]``."""
    from daemon.core.gguf import import_gguf

    out = import_gguf(args.gguf, args.outdir, overwrite=args.overwrite)
    print(f"imported {args.gguf} -> {out}")
    return 0
