"""Replay buffer: what the target rejected of the draft, for every served request.

The buffer is one SQLite database with one row per request; its rooms:

- `daemon.store.record`: `BufferRecord` and the rules that classify it (split, failure case);
- `daemon.store.codec`: a record as one row (token lists and rejections as packed blobs);
- `daemon.store.schema`: the file, its schema and migrations, refusing files that are not ours;
- `daemon.store.writer`: `BufferWriter`, the serving side's writer thread, and its durability;
- here: `ReplayBuffer`, the reader (training, CLI, ``/status``), its statistics and export.

Writers and readers
-------------------
The serving side never touches the database itself: it submits records to a `BufferWriter`.
`ReplayBuffer` is the reader with its own connection; WAL lets it read while the writer writes,
from another thread or another process. Its few writes (`mark_used`, `purge`, `add`) take
SQLite's write lock and wait (``busy_timeout``) for the writer's current batch.

Counts (`ReplayBuffer.count`, `pending_failure_count`, `stats`) come from the schema's counts
table, which triggers keep equal to what a ``GROUP BY`` over ``records`` would give, so
``/status`` and the metrics cost the same with a hundred records as with a hundred thousand.
"""

from __future__ import annotations

import copy
import json
import os
import random
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemon.config import BufferSettings
from daemon.core.records import acceptance_rate
from daemon.errors import BufferError
from daemon.store.codec import decode_row, encode_record, unpack_ids
from daemon.store.export import export_jsonl
from daemon.store.record import SPLITS, SYNTHETIC_DRAFT, BufferRecord, assign_split
from daemon.store.schema import (
    PENDING_COUNTED,
    PENDING_WHERE,
    SCHEMA_VERSION,
    SELECT,
    buffer_path,
    counted,
    open_connection,
    resolve_path,
    size_on_disk,
)
from daemon.store.writer import BufferWriter, insert_rows

# What callers import from here: the buffer's public names, wherever they live.
__all__ = [
    "BufferRecord",
    "BufferStats",
    "BufferWriter",
    "ReplayBuffer",
    "assign_split",
    "buffer_path",
]


@dataclass
class TrendBucket:
    """Consecutive records in time order (created ``start`` .. ``end``) and their acceptance."""

    start: float
    end: float
    records: int
    mean_acceptance: float | None  # mean per-request rate over the requests that drafted
    token_acceptance: float | None  # sum accepted / sum drafted


@dataclass
class SplitAcceptance:
    """One adapter version's records in one split."""

    records: int
    mean_acceptance: float | None
    token_acceptance: float | None


@dataclass
class AdapterAcceptance:
    """Records served with one adapter version (0 = base draft): per split and together."""

    adapter_version: int
    records: int = 0
    train: SplitAcceptance | None = None  # None: no record of that split
    holdout: SplitAcceptance | None = None
    mean_acceptance: float | None = None


@dataclass
class BufferStats:
    """What `ReplayBuffer.stats` reports (the CLI's ``buffer stats``, ``/status``'s buffer)."""

    path: str
    schema_version: int
    records: int = 0
    train: int = 0
    holdout: int = 0
    failures: int = 0
    train_failures: int = 0
    holdout_failures: int = 0
    used_for_training: int = 0
    pending_failures: int = 0
    max_records: int = 0
    size_bytes: int = 0
    oldest: float | None = None
    newest: float | None = None
    acceptance_trend: list[TrendBucket] = field(default_factory=list)
    acceptance_by_adapter: list[AdapterAcceptance] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; an adapter's split without records is left out, as it always was."""
        out = asdict(self)
        for entry in out["acceptance_by_adapter"]:
            for split in SPLITS:
                if entry[split] is None:
                    del entry[split]
        return out


@dataclass
class _Counted:
    """A row of the counts table (`daemon.store.schema`)."""

    split: str
    is_failure: int
    used: int
    adapter_version: int
    records: int
    rated: int
    rate_sum: float
    accepted: int
    drafted: int


class ReplayBuffer:
    """Reads (and curates) the buffer; safe beside a `BufferWriter` in any thread or process.

    ``path`` is the database file or the data directory. One instance may be shared between
    threads (calls are serialised on its connection). ``target``: only that target's records
    are read (`for_target`: the same connection, scoped; a daemon serving several models keeps
    them in one file and each model trains on its own).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        settings: BufferSettings | None = None,
        *,
        create: bool = True,
        verify: bool = False,
        target: str | None = None,
    ) -> None:
        self.path = resolve_path(path)
        self.settings = settings or BufferSettings()
        self.create = create
        self.verify = verify
        self.target = target
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()

    def for_target(self, target: str) -> ReplayBuffer:
        """This buffer seen through ``target``'s records only (sharing its connection)."""
        scoped = copy.copy(self)
        scoped.target = target
        return scoped

    def _scope(self, where: str, params: Sequence[Any]) -> tuple[str, list[Any]]:
        """``where`` narrowed to this buffer's target, if it has one."""
        if self.target is None:
            return where, list(params)
        return (f"target_id = ? AND ({where})" if where else "target_id = ?"), [
            self.target,
            *params,
        ]

    def open(self) -> ReplayBuffer:
        with self._lock:
            if self._conn is None:
                self._conn = open_connection(self.path, create=self.create, verify=self.verify)
        return self

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> ReplayBuffer:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # plumbing
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.open()
        assert self._conn is not None
        return self._conn

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db().execute(sql, params).fetchall()
            except sqlite3.DatabaseError as e:
                raise BufferError(f"{self.path}: {e}") from e

    def _write(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            conn = self._db()
            try:
                conn.execute("BEGIN IMMEDIATE")
                n = conn.execute(sql, params).rowcount
                conn.execute("COMMIT")
                return n
            except sqlite3.DatabaseError as e:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise BufferError(f"{self.path}: {e}") from e

    def _records(self, where: str = "", params: Sequence[Any] = (), tail: str = "") -> list:
        where, args = self._scope(where, params)  # the target's ? comes first in the SQL too
        sql = f"{SELECT} {'WHERE ' + where if where else ''} {tail}"
        return [decode_row(row) for row in self._query(sql, args)]

    # queries
    def _counted(self, where: str = "", params: Sequence[Any] = ()) -> int:
        with self._lock:
            where, args = self._scope(where, params)
            try:
                return counted(self._db(), where, args)
            except sqlite3.DatabaseError as e:
                raise BufferError(f"{self.path}: {e}") from e

    def count(self, split: str | None = None) -> int:
        """Records (of ``split``), read from the counts table: no scan, however many there are."""
        return self._counted() if split is None else self._counted("split = ?", (split,))

    def get(self, record_id: int) -> BufferRecord | None:
        rows = self._records("id = ?", (record_id,))
        return rows[0] if rows else None

    def ids(self) -> set[int]:
        where, args = self._scope("", ())
        return {
            i
            for (i,) in self._query(
                f"SELECT id FROM records {'WHERE ' + where if where else ''}", args
            )
        }

    def synthetic_requests(self, target: str) -> set[str]:
        """The requests of ``target``'s stored rows no user sent (`SYNTHETIC_DRAFT`), so that
        a later warmup writes new ones."""
        rows = self._query(
            "SELECT prompt_text FROM records WHERE target_id = ? AND draft_id = ?",
            (target, SYNTHETIC_DRAFT),
        )
        return {text for (text,) in rows}

    def pending_failure_count(self) -> int:
        """Failure cases in the train split not yet used for training (the counts table)."""
        return self._counted(PENDING_COUNTED)

    def pending_failures(self, limit: int | None = None) -> list[BufferRecord]:
        """Train-split failure cases no training run has used yet, oldest first."""
        return self._records(
            PENDING_WHERE, (-1 if limit is None else limit,), "ORDER BY id LIMIT ?"
        )

    def sample_replay(
        self,
        n: int,
        exclude_ids: Iterable[int] = (),
        seed: int | None = None,
        before: float | None = None,
        traffic_only: bool = False,
    ) -> list[BufferRecord]:
        """Up to ``n`` random train rows (used for training or not), excluding ``exclude_ids``
        (the failures being trained on) and, with ``before``, rows created at or after it; with
        ``traffic_only``, rows users sent (not `SYNTHETIC_DRAFT`) only. Reproducible for a
        given ``seed`` and buffer content; holdout rows are never returned."""
        if n <= 0:
            return []
        exclude = set(exclude_ids)
        where, params = self._scope("split = 'train'", ())
        if traffic_only:
            where, params = where + " AND draft_id != ?", [*params, SYNTHETIC_DRAFT]
        if before is not None:
            where, params = where + " AND created < ?", [*params, before]
        sql = f"SELECT id FROM records WHERE {where} ORDER BY id"
        candidates = [i for (i,) in self._query(sql, params) if i not in exclude]
        chosen = random.Random(seed).sample(candidates, min(n, len(candidates)))
        found: dict[int, BufferRecord] = {}
        for start in range(0, len(chosen), 500):
            chunk = chosen[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            for rec in self._records(f"id IN ({marks})", chunk):
                found[rec.id] = rec
        return [found[i] for i in chosen if i in found]  # a row may vanish between the queries

    def holdout(self, limit: int | None = None) -> list[BufferRecord]:
        """Holdout rows, oldest first (a stable evaluation set until eviction)."""
        return self._records(
            "split = 'holdout'", (-1 if limit is None else limit,), "ORDER BY created, id LIMIT ?"
        )

    def iter_records(
        self, split: str | None = None, before: float | None = None, batch_size: int = 256
    ) -> Iterator[BufferRecord]:
        """All records (of ``split``, created before ``before``) in time order, fetched in pages
        so no read transaction stays open between them."""
        last: tuple[float, int] = (float("-inf"), -1)
        while True:
            where = ["(created, id) > (?, ?)"]
            params: list[Any] = [*last]
            if split is not None:
                where.append("split = ?")
                params.append(split)
            if before is not None:
                where.append("created < ?")
                params.append(before)
            page = self._records(
                " AND ".join(where), [*params, batch_size], "ORDER BY created, id LIMIT ?"
            )
            yield from page
            if len(page) < batch_size:
                return
            last = (page[-1].created, page[-1].id)

    def iter_stats(
        self, since: float, until: float, batch_size: int = 1000
    ) -> Iterator[tuple[float, int, dict[str, Any]]]:
        """``(created, adapter_version, stats)`` of the records created in ``[since, until)``,
        in time order, in pages (the statistics only: what the status page's history sums)."""
        last: tuple[float, int] = (since, -1)
        while True:
            where, params = self._scope(
                "(created, id) > (?, ?) AND created < ?", [last[0], last[1], until]
            )
            rows = self._query(
                f"SELECT created, id, adapter_version, stats FROM records WHERE {where} "
                "ORDER BY created, id LIMIT ?",
                [*params, batch_size],
            )
            for created, _, version, stats in rows:
                try:
                    decoded = json.loads(stats)
                except ValueError:  # one bad row must not hide the rest
                    decoded = {}
                yield created, version, decoded if isinstance(decoded, dict) else {}
            if len(rows) < batch_size:
                return
            last = (rows[-1][0], rows[-1][1])

    def recent_outputs(self, max_tokens: int, split: str = "train") -> list[list[int]]:
        """The output tokens of the newest records of ``split``, oldest first, as many as fit
        in ``max_tokens`` (what the suffix drafting index is rebuilt from at start); rows no
        user sent (`SYNTHETIC_DRAFT`) are not what traffic repeats, so they are left out."""
        where, params = self._scope("split = ? AND draft_id != ?", [split, SYNTHETIC_DRAFT])
        out: list[list[int]] = []
        total, offset, page = 0, 0, 256
        while total < max_tokens:
            rows = self._query(
                f"SELECT output_tokens FROM records WHERE {where} "
                "ORDER BY created DESC, id DESC LIMIT ? OFFSET ?",
                (*params, page, offset),
            )
            for (blob,) in rows:
                ids = unpack_ids(blob)
                out.append(ids)
                total += len(ids)
                if total >= max_tokens:
                    break
            if len(rows) < page:
                break
            offset += page
        out.reverse()
        return out

    def size_on_disk(self) -> int:
        """Bytes used by the database and its WAL."""
        return size_on_disk(self.path)

    def stats(self, trend_window: int = 1000, trend_buckets: int = 10) -> BufferStats:
        """Counts by split and failure, pending failures, disk size and acceptance trends.

        ``acceptance_trend``: the last ``trend_window`` records in time order, cut into
        ``trend_buckets`` buckets, each with its mean per-request acceptance rate and its
        token-weighted rate (sum accepted / sum drafted). ``acceptance_by_adapter``: the same per
        adapter version (0 = base draft), over train and holdout separately and together.
        Counts and sums come from the counts table; the trend reads ``trend_window`` rows.
        """
        with self._lock:
            conn = self._db()
            try:
                conn.execute("BEGIN")  # one snapshot for all the numbers
                where, args = self._scope("records > 0", ())
                mine, margs = self._scope("", ())
                mine = f"WHERE {mine}" if mine else ""
                try:
                    # summed over targets: one row per key, as when there was one target
                    counts = conn.execute(
                        "SELECT split, is_failure, used, adapter_version, sum(records), "
                        "sum(rated), sum(rate_sum), sum(accepted), sum(drafted) "
                        f"FROM record_counts WHERE {where} GROUP BY 1, 2, 3, 4 "
                        "ORDER BY adapter_version, split",
                        args,
                    ).fetchall()
                    # two subqueries: min() and max() in one SELECT would scan the whole table
                    span = conn.execute(
                        f"SELECT (SELECT min(created) FROM records {mine}), "
                        f"(SELECT max(created) FROM records {mine})",
                        [*margs, *margs],
                    ).fetchone()
                    recent = conn.execute(
                        f"SELECT created, acceptance_rate, drafted, accepted FROM records {mine} "
                        "ORDER BY created DESC, id DESC LIMIT ?",
                        (*margs, max(0, trend_window)),
                    ).fetchall()
                finally:
                    conn.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                raise BufferError(f"{self.path}: {e}") from e
        rows = [_Counted(*row) for row in counts]
        st = BufferStats(
            path=str(self.path),
            schema_version=SCHEMA_VERSION,
            max_records=self.settings.max_records,
            size_bytes=self.size_on_disk(),
            oldest=span[0],
            newest=span[1],
        )
        _tally(st, rows)
        recent.reverse()
        st.acceptance_trend = _trend(recent, trend_buckets)
        st.acceptance_by_adapter = _by_adapter(rows)
        return st

    # writes
    def add(self, records: Iterable[BufferRecord]) -> list[int]:
        """Insert records synchronously (imports, tests); sets ``id``/``split``/``is_failure``."""
        records = list(records)
        encoded = [encode_record(r, self.settings) for r in records]
        with self._lock:
            try:
                ids, _ = insert_rows(self._db(), [e[0] for e in encoded], self.settings.max_records)
            except sqlite3.DatabaseError as e:
                raise BufferError(f"{self.path}: {e}") from e
        for rec, (_, split, failure), row_id in zip(records, encoded, ids, strict=True):
            rec.id, rec.split, rec.is_failure = row_id, split, failure
        return ids

    def mark_used(self, ids: Iterable[int], run_id: str) -> int:
        """Record that training run ``run_id`` used these (train) rows; returns rows updated."""
        ids = list(ids)
        total = 0
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            sql = (
                "UPDATE records SET used_for_training = ? "
                f"WHERE split = 'train' AND id IN ({marks})"
            )
            total += self._write(sql, [run_id, *chunk])
        return total

    def purge(self, before: float | None = None) -> int:
        """Delete records created before ``before`` (unix time), or all of them; returns count."""
        if before is None:
            return self._write("DELETE FROM records")
        return self._write("DELETE FROM records WHERE created < ?", (before,))

    def export_jsonl(
        self,
        path: str | os.PathLike[str],
        decode: Callable[[list[int]], str] | None = None,
        *,
        split: str | None = None,
    ) -> int:
        """Write one JSON object per record to ``path`` (atomically); returns the count.

        Each line: ``prompt``, ``draft_output`` (the output with every rejected position showing
        the draft's token, rendered with ``decode``; null without it), ``target_output`` and
        ``disagreements`` (``position``, ``draft_token``, ``target_token``, ``draft_prob`` and,
        with ``decode``, ``draft_text``/``target_text``), plus the record's ``id``.
        """
        return export_jsonl(self.iter_records(split=split), Path(path), decode)


def _tally(st: BufferStats, rows: Iterable[_Counted]) -> None:
    """Add the counts table's rows to ``st``'s counts."""
    for r in rows:
        st.records += r.records
        if r.split == "train":
            st.train += r.records
        else:
            st.holdout += r.records
        if r.is_failure:
            st.failures += r.records
            if r.split == "train":
                st.train_failures += r.records
            else:
                st.holdout_failures += r.records
        if r.used:
            st.used_for_training += r.records
        if r.split == "train" and r.is_failure and not r.used:
            st.pending_failures += r.records


def _trend(recent: Sequence[tuple[Any, ...]], buckets: int) -> list[TrendBucket]:
    """``recent`` rows (created, acceptance_rate, drafted, accepted), oldest first, in buckets."""
    if not recent:
        return []
    n = max(1, min(buckets, len(recent)))
    out = []
    for b in range(n):
        chunk = recent[b * len(recent) // n : (b + 1) * len(recent) // n]
        rates = [r[1] for r in chunk if r[1] is not None]
        out.append(
            TrendBucket(
                start=chunk[0][0],
                end=chunk[-1][0],
                records=len(chunk),
                mean_acceptance=sum(rates) / len(rates) if rates else None,
                token_acceptance=acceptance_rate(
                    sum(r[3] or 0 for r in chunk), sum(r[2] or 0 for r in chunk)
                ),
            )
        )
    return out


def _by_adapter(rows: Iterable[_Counted]) -> list[AdapterAcceptance]:
    """Acceptance per adapter version and split from the counts table's rows."""
    sums: dict[tuple[int, str], list[float]] = {}  # records, rated, rate_sum, accepted, drafted
    for r in rows:
        acc = sums.setdefault((r.adapter_version, r.split), [0, 0, 0.0, 0, 0])
        for i, v in enumerate((r.records, r.rated, r.rate_sum, r.accepted, r.drafted)):
            acc[i] += v
    adapters: dict[int, AdapterAcceptance] = {}
    for (version, split), (n, rated, rate_sum, accepted, drafted) in sorted(sums.items()):
        entry = adapters.setdefault(version, AdapterAcceptance(adapter_version=version))
        entry.records += int(n)
        part = SplitAcceptance(
            records=int(n),
            mean_acceptance=rate_sum / rated if rated else None,
            token_acceptance=acceptance_rate(int(accepted), int(drafted)),
        )
        setattr(entry, split, part)
    for entry in adapters.values():
        # each split's mean weighted by its records, as the per-split means always were
        parts = [p for p in (entry.train, entry.holdout) if p and p.mean_acceptance is not None]
        weight = sum(p.records for p in parts)
        if weight:
            entry.mean_acceptance = (
                sum(p.mean_acceptance * p.records for p in parts if p.mean_acceptance is not None)
                / weight
            )
    return list(adapters.values())
