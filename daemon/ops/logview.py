"""``specd logs``: the JSON log pretty-printed for humans, optionally followed like ``tail -f``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from daemon.config import ConfigSources, Settings
from daemon.errors import ConfigError

TRAINING_COMPONENTS = {"training", "adaptation", "adapters"}
TRAINING_EVENT = re.compile(r"^(train|heldout|adapter|gate|swap|rollback)")
_FIRST = ("timestamp", "level", "component", "event")
_REL = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")


def parse_since(text: str, now: float | None = None) -> float:
    """``10m``/``2h``/``1d``/``30s`` ago, or an ISO date/time; returns a unix time."""
    m = _REL.match(text.strip())
    if m:
        seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return (now if now is not None else time.time()) - seconds
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"invalid --since {text!r}: use 10m, 2h, 1d or an ISO date/time") from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time, as a user types it
    return when.timestamp()


def _time(rec: dict[str, Any]) -> float | None:
    try:
        return dt.datetime.fromisoformat(str(rec["timestamp"]).replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return None


def is_training(rec: dict[str, Any]) -> bool:
    return rec.get("component") in TRAINING_COMPONENTS or bool(
        TRAINING_EVENT.match(str(rec.get("event", "")))
    )


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict | list):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def format_record(rec: dict[str, Any]) -> str:
    ts = _time(rec)
    stamp = dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "?"
    head = (
        f"{stamp} {str(rec.get('level', '?')).upper():7} {rec.get('component', '-'):10} "
        f"{rec.get('event', '')}"
    )
    rest = " ".join(f"{k}={_fmt_value(v)}" for k, v in rec.items() if k not in _FIRST)
    return f"{head}  {rest}" if rest else head


def _parse(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line:
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return {"event": line, "level": "raw"}
    return rec if isinstance(rec, dict) else None


def _follow(path: Path, f: TextIO | None) -> Iterator[str]:
    """Lines appended to ``path``, surviving rotation (reopens when the inode changes).
    ``f``: the file already read up to here (nothing between is lost); None: wait for it."""
    inode = os.fstat(f.fileno()).st_ino if f is not None else None
    while True:
        if f is None:
            try:
                f = path.open(encoding="utf-8", errors="replace")
                inode = os.fstat(f.fileno()).st_ino  # a rotated-in file is read from its start
            except FileNotFoundError:
                time.sleep(0.5)
                continue
        line = f.readline()
        if line:
            yield line
            continue
        try:
            if os.stat(path).st_ino != inode:
                f.close()
                f = None
                continue
        except FileNotFoundError:
            pass
        time.sleep(0.25)


def show_logs(
    path: Path,
    *,
    follow: bool = False,
    training: bool = False,
    since: float | None = None,
    out: TextIO | None = None,
) -> int:
    """Print the log's records (filtered), then keep following if asked."""
    out = out or sys.stdout

    def emit(line: str) -> None:
        rec = _parse(line)
        if rec is None or (training and not is_training(rec)):
            return
        if since is not None:
            t = _time(rec)
            if t is not None and t < since:
                return
        print(format_record(rec), file=out, flush=True)

    f: TextIO | None = None
    if path.exists():
        f = path.open(encoding="utf-8", errors="replace")
        # readline, not iteration: following goes on from exactly where this stops
        while line := f.readline():
            emit(line)
    elif not follow:
        print(f"no log file at {path} yet", file=sys.stderr)
        return 1
    try:
        if follow:
            for line in _follow(path, f):
                emit(line)
    except KeyboardInterrupt:
        return 0
    finally:
        if f is not None and not f.closed:
            f.close()
    return 0


def run(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd logs [--follow] [--training] [--since T]`` on the data dir's log file."""
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return show_logs(settings.log_file, follow=args.follow, training=args.training, since=since)
