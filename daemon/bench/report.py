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
    """Write ``data`` to ``path`` as indented JSON and say so; nothing when ``path`` is None.
    A result without its `provenance` (commands that take it at their start give it) gets
    it now."""
    if path is not None:
        if not {"provenance", "run", "commit"} & set(data):
            data = {**data, "provenance": provenance()}
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {path}")


def _program() -> str:
    """The command's name: ``specd``, however it was started (``python -m daemon`` runs the
    same CLI)."""
    name = Path(sys.argv[0]).name
    return "specd" if name in ("__main__.py", "-m", "daemon") else name


def provenance() -> dict[str, Any]:
    """What a result file needs to be compared later: the commit (``dirty`` when tracked files
    other than result files differ from it; None outside a git checkout), the machine and the
    command line."""

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
        # result files written by earlier runs are outputs, not the code that ran
        "dirty": (
            bool(
                git("status", "--porcelain", "--untracked-files=no", ":/", ":!/benchmarks/results")
            )
            if commit
            else None
        ),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "backend": _backend(),
        },
        "command": shlex.join([_program(), *sys.argv[1:]]),
        # settings given as environment overrides are part of what ran
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("SPECD_")},
    }


def _backend() -> dict[str, Any] | None:
    """MLX's device and the BLAS it runs on (None where MLX cannot be imported)."""
    try:
        from daemon.core.backend import backend_info

        return backend_info()
    except ImportError:
        return None


# --------------------------------------------------------------------------------------------
# BENCHMARKS.md, generated from the result files


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    if v is None:
        return "-"
    return str(v).replace("|", "\\|")


def _section(name: str, data: dict[str, Any]) -> list[str]:
    """One result file: where it came from, its rows as a table (the scalar fields each row
    has), and its other scalar figures."""
    # where the run came from: "provenance" (bench adapt, older: "run")
    meta_key = "provenance" if "provenance" in data else "run"
    prov = data.get(meta_key) or {}
    machine = prov.get("machine") or {}
    backend = machine.get("backend") or {}
    out = [f"## {name}", ""]
    out.append(f"- command: `{prov.get('command', '?')}`")
    env = prov.get("environment")
    if env:
        out.append("- environment: " + ", ".join(f"`{k}={v}`" for k, v in env.items()))
    commit = prov.get("commit")
    dirty = " (with uncommitted changes)" if prov.get("dirty") else ""
    out.append(f"- commit: `{commit[:12] if commit else '?'}`{dirty}")
    where = f"{machine.get('processor', '?')}, {machine.get('cpus', '?')} cores"
    where += f", {machine.get('platform', '?')}, Python {machine.get('python', '?')}"
    if backend:
        where += f", MLX {backend.get('mlx_version')} on {backend.get('device')}"
        where += f" (BLAS: {backend.get('blas')})"
    out.append(f"- machine: {where}")
    if prov.get("note"):  # what the file's own fields cannot say (added by hand, e.g. a bug)
        out.append(f"- note: {prov['note']}")
    out.append("")
    rows = {k: v for k, v in data.items() if isinstance(v, dict) and k != meta_key}
    columns: list[str] = []
    for row in rows.values():
        for key, value in row.items():
            if key not in columns and not isinstance(value, dict | list):
                columns.append(key)
    if rows and columns:
        out.append("| row | " + " | ".join(columns) + " |")
        out.append("| --- " * (len(columns) + 1) + "|")
        for row_name, row in rows.items():
            out.append(f"| {row_name} | " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
        out.append("")
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict | list)}
    if scalars:
        out += [", ".join(f"{k}: {_cell(v)}" for k, v in scalars.items()), ""]
    return out


def render_benchmarks(results: Path) -> str:
    """``BENCHMARKS.md``: every result file in ``results`` (sorted by name), as written."""
    lines = [
        "# Benchmark results",
        "",
        "Generated by `specd bench report` from the JSON files in `benchmarks/results/`; do not",
        "edit by hand. Each section names the command that wrote its file, the commit and the",
        "machine. The prompts are those of `benchmarks/workloads/` or generated by the command.",
        "",
    ]
    for path in sorted(results.glob("*.json")):
        lines += _section(path.stem, json.loads(path.read_text(encoding="utf-8")))
    return "\n".join(lines).rstrip() + "\n"


def run(args: Any, settings: Any, sources: Any) -> int:
    """``specd bench report``: write BENCHMARKS.md from the result files."""
    text = render_benchmarks(args.results)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} from {len(list(args.results.glob('*.json')))} result files")
    return 0
