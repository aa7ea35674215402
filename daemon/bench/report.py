"""How the benchmark commands report: a plain table on stdout and, with ``--json OUT``, a file.

No MLX here: the benchmark bodies import this, and so does anything that only prints results.
"""

from __future__ import annotations

import json
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
