"""How the benchmark commands report: a plain table on stdout and, with ``--json OUT``, a file.

No MLX here: the benchmark bodies import this, and so does anything that only prints results.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def print_table(rows: Mapping[str, Mapping[str, Any]], columns: list[str]) -> None:
    """One line per row, ``columns`` left to right; floats to 3 decimals, missing values ``-``."""

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


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` as indented JSON and say so; nothing when ``path`` is None."""
    if path is not None:
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {path}")


def provenance() -> dict[str, Any]:
    """What a result file needs to be compared later: the commit (``dirty`` when tracked files
    differ from it; None outside a git checkout), the machine and the command line."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(Path(__file__).parent), *args],
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {
        "commit": commit,
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
