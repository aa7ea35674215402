"""``specd models ...``: model files a person manages (today: importing a GGUF file)."""

from __future__ import annotations

import argparse

from daemon.config import ConfigSources, Settings
from daemon.core.gguf import import_gguf


def run_import_gguf(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd models import-gguf GGUF OUTDIR [--overwrite]``."""
    out = import_gguf(args.gguf, args.outdir, overwrite=args.overwrite)
    print(f"imported {args.gguf} -> {out}")
    return 0
