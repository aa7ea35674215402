"""``specd bench buffer``: what the replay buffer's counts cost as it grows.

``/status`` and the metrics read `ReplayBuffer.stats` and `count` on every scrape; both come
from the counts table (`daemon.store.schema`), so their latency should stay flat from a thousand
records to a hundred thousand. Beside them, for comparison, the GROUP BY scan over ``records``
that ``stats`` ran before the counts table. Uses a private temporary database, no model.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from daemon.bench.report import print_table, provenance, write_json
from daemon.config import BufferSettings, ConfigSources, Settings
from daemon.core.records import Rejection
from daemon.store.buffer import BufferRecord, ReplayBuffer

# The per-request scans stats() ran before the counts table (schema version 1).
_OLD_SCANS = (
    "SELECT split, is_failure, used_for_training IS NOT NULL, count(*) FROM records "
    "GROUP BY 1, 2, 3",
    "SELECT adapter_version, split, count(*), avg(acceptance_rate), sum(accepted), sum(drafted) "
    "FROM records GROUP BY 1, 2 ORDER BY 1, 2",
)


def _record(rng: random.Random, i: int) -> BufferRecord:
    """A small record: a 64-token prompt, 32 output tokens, one rejection with a top-8."""
    drafted = rng.randrange(1, 40)
    return BufferRecord(
        prompt_text=f"benchmark prompt {i}",
        prompt_tokens=[rng.randrange(32_000) for _ in range(64)],
        output_text="x" * 32,
        output_tokens=[rng.randrange(32_000) for _ in range(32)],
        stats={"drafted": drafted, "accepted": rng.randrange(0, drafted + 1)},
        rejections=[Rejection(3, 67, 11, 0.4, 12, list(range(8)), [-0.5] * 8)],
        target_id="bench-target",
        draft_id="bench-draft",
        adapter_version=rng.randrange(0, 4),
        created=1_700_000_000.0 + i,
    )


def _old_scans(conn: sqlite3.Connection) -> None:
    for sql in _OLD_SCANS:
        conn.execute(sql).fetchall()


def _median_ms(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def run_buffer_bench(
    sizes: Sequence[int] = (1_000, 10_000, 100_000),
    repeat: int = 20,
    directory: str | Path | None = None,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """One row per buffer size: median milliseconds of ``stats(trend_window=200,
    trend_buckets=4)`` (what ``/status`` asks), ``count()`` and the old GROUP BY scans, on a
    buffer grown to that many records (some marked used for training, as the loop would)."""
    rng = random.Random(seed)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(dir=directory, prefix="specd-bench-buffer-") as tmp:
        settings = BufferSettings(max_records=max(sizes))
        with ReplayBuffer(Path(tmp) / "buffer.sqlite", settings) as buf:
            n = 0
            for size in sorted(sizes):
                while n < size:
                    batch = [_record(rng, n + i) for i in range(min(2_000, size - n))]
                    buf.add(batch)
                    buf.mark_used([r.id for r in batch[::5] if r.id is not None], "bench")
                    n += len(batch)
                old = sqlite3.connect(f"file:{buf.path}?mode=ro", uri=True)
                rows[f"{size} records"] = {
                    "records": buf.count(),
                    "stats_ms": _median_ms(
                        lambda: buf.stats(trend_window=200, trend_buckets=4), repeat
                    ),
                    "count_ms": _median_ms(buf.count, repeat),
                    "pending_ms": _median_ms(buf.pending_failure_count, repeat),
                    "old_scan_ms": _median_ms(lambda: _old_scans(old), repeat),  # noqa: B023
                    "size_mb": buf.size_on_disk() / 1e6,
                }
                old.close()
    return rows


def run(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd bench buffer [--records N,N,...] [--repeat R] [--json OUT]``."""
    rows = run_buffer_bench(args.records, repeat=args.repeat)
    print_table(rows, ["records", "stats_ms", "count_ms", "pending_ms", "old_scan_ms", "size_mb"])
    write_json(args.json, {"rows": rows, **provenance()})
    return 0
