"""A buffer's records as JSON lines, for people and other tools (``specd buffer --jsonl``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from daemon.durable import atomic_write
from daemon.store.record import BufferRecord


def export_jsonl(
    records: Iterable[BufferRecord],
    path: Path,
    decode: Callable[[list[int]], str] | None = None,
) -> int:
    """Write one JSON object per record to ``path`` (atomically); returns the count."""
    n = 0

    def write(tmp: Path) -> None:
        nonlocal n
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(_export_line(rec, decode), ensure_ascii=False) + "\n")
                n += 1

    atomic_write(path, write, fsync=False)  # a view of the buffer: the buffer is the record
    return n


def _export_line(rec: BufferRecord, decode: Callable[[list[int]], str] | None) -> dict[str, Any]:
    draft_tokens = list(rec.output_tokens)
    disagreements = []
    for r in rec.rejections:
        if 0 <= r.position < len(draft_tokens):
            draft_tokens[r.position] = r.draft_token
        d: dict[str, Any] = {
            "position": r.position,
            "draft_token": r.draft_token,
            "target_token": r.target_token,
            "draft_prob": r.draft_prob,
        }
        if decode is not None:
            d["draft_text"] = decode([r.draft_token])
            d["target_text"] = decode([r.target_token])
        disagreements.append(d)
    return {
        "id": rec.id,
        "prompt": rec.prompt_text,
        "draft_output": decode(draft_tokens) if decode is not None else None,
        "target_output": rec.output_text,
        "disagreements": disagreements,
    }
