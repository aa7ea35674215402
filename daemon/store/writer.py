"""The buffer's writer: a thread that stores what the serving side submits, and retries.

The serving side never touches the database itself: `BufferWriter.submit` hands a record to a
writer thread and returns a `concurrent.futures.Future` at once. The thread drains its queue,
writes each batch in one transaction (`insert_rows`), evicts the oldest rows beyond
``max_records`` and then resolves each future to the record's row id, sets
``id``/``split``/``is_failure`` on the record and calls ``on_commit(records)``.

Durability
----------
A future resolves only after COMMIT has returned. In WAL mode COMMIT appends the transaction's
frames to ``buffer.sqlite-wal`` with write(2); from then on the data belongs to the kernel, so a
SIGKILL of the daemon (or a crash) cannot lose it: the next open replays the WAL. That much already
holds with ``synchronous=NORMAL``. We use ``synchronous=FULL`` by default, which also fsyncs the WAL
at every commit, so an acknowledged record survives a power cut or kernel panic too. The cost is
one fsync per *batch*, paid on the writer thread, never on the generation thread. (On macOS
``fsync`` does not flush the drive's cache; ``PRAGMA fullfsync`` would, and is left off.)
Pass ``synchronous="NORMAL"`` to `BufferWriter` to trade power-loss durability for fewer fsyncs.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from daemon.config import BufferSettings
from daemon.errors import BufferError
from daemon.logging import get_logger
from daemon.store.codec import encode_record
from daemon.store.record import SPLITS, BufferRecord
from daemon.store.schema import INSERT, counted, open_connection, resolve_path

log = get_logger("buffer")


def _evict(conn: sqlite3.Connection, max_records: int) -> int:
    """Delete the oldest train rows (then oldest holdout rows) beyond ``max_records``."""
    excess = counted(conn) - max_records  # the counts table: no scan per batch
    evicted = 0
    for split in SPLITS:
        if excess <= 0:
            break
        n = conn.execute(
            "DELETE FROM records WHERE id IN (SELECT id FROM records WHERE split = ? "
            "ORDER BY created, id LIMIT ?)",
            (split, excess),
        ).rowcount
        excess -= n
        evicted += n
    return evicted


def insert_rows(
    conn: sqlite3.Connection, encoded: Sequence[tuple[Any, ...]], max_records: int
) -> tuple[list[int], int]:
    """Insert rows and evict in one transaction; returns the new ids and the eviction count."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        ids = [int(conn.execute(INSERT, params).lastrowid or 0) for params in encoded]
        evicted = _evict(conn, max_records)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return ids, evicted


@dataclass
class _Pending:
    record: BufferRecord
    future: Future[int]


@dataclass
class _Call:  # runs on the writer thread, with its connection
    fn: Callable[[sqlite3.Connection], Any]
    future: Future[Any]


_STOP = object()
OnCommit = Callable[[list[BufferRecord]], None]


class BufferWriter:
    """Writes records on its own thread; `submit` never blocks on the database.

    ``path`` is the database file or the data directory. ``on_commit(records)`` runs on the writer
    thread after each committed batch (exceptions are logged, not raised; keep it short and hand
    heavy work such as training to another thread). ``settings`` may be
    replaced at any time (config reload); each batch uses the current value. ``verify`` runs
    SQLite's quick_check when starting (the daemon's start-up), so that a damaged file is refused
    before anything is written to it.

    A batch that fails to commit (a full disk, an I/O error) is not lost: its records wait in
    memory, at most ``retry_limit`` of them (the oldest give way, counted in ``dropped``), and
    are written again every ``retry_s`` seconds and at close. Their submitters' futures fail at
    once (a response does not wait for the disk); ``on_commit`` runs when they do commit.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        settings: BufferSettings,
        on_commit: OnCommit | None = None,
        *,
        max_batch: int = 256,
        synchronous: str = "FULL",
        verify: bool = True,
        retry_limit: int = 1000,
        retry_s: float = 5.0,
    ) -> None:
        self.path = resolve_path(path)
        self.settings = settings
        self.on_commit = on_commit
        self.max_batch = max(1, max_batch)
        self.synchronous = synchronous
        self.verify = verify
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self.committed = 0  # records committed since start
        self.evicted = 0
        self.retry_limit = retry_limit
        self.retry_s = retry_s
        self._retry: deque[BufferRecord] = deque()  # failed to commit, to be written again
        self._retry_at = 0.0  # monotonic time of the next attempt
        self.dropped = 0  # records lost: the retry queue was full, or still failing at close
        self.commit_failures = 0  # batches that failed to commit

    # lifecycle
    def start(self) -> BufferWriter:
        """Open (create, migrate) the database and start the thread; `BufferError` if unusable."""
        with self._lock:
            if self._closed:
                raise RuntimeError("buffer writer is closed")
            if self._thread is not None:
                return self
            self._conn = open_connection(
                self.path, synchronous=self.synchronous, verify=self.verify
            )
            self._thread = threading.Thread(target=self._run, name="buffer-writer", daemon=True)
            self._thread.start()
        log.info("buffer_writer_started", path=str(self.path), synchronous=self.synchronous)
        return self

    def __enter__(self) -> BufferWriter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    @property
    def retry_backlog(self) -> int:
        """Records that failed to commit and wait in memory for another attempt."""
        return len(self._retry)

    @property
    def backlog(self) -> int:
        """Items waiting for the writer thread (approximate)."""
        return self._queue.qsize()

    def submit(self, record: BufferRecord) -> Future[int]:
        """Queue ``record``; the future resolves to its row id once durable (after COMMIT).

        The writer owns the record from now on and sets ``id``, ``split`` and ``is_failure`` on
        it at commit. A record that cannot be encoded fails its own future only.
        """
        fut: Future[int] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("buffer writer is closed")
            if self._thread is None:
                raise RuntimeError("buffer writer is not started")
            self._queue.put(_Pending(record, fut))
        return fut

    def pragma(self, name: str, timeout: float | None = 30) -> Any:
        """The writer connection's ``PRAGMA name`` as SQLite reports it (``synchronous``: 2 is
        FULL), read on the writer thread: what the writes really run with."""
        if not name.isidentifier():
            raise ValueError(f"not a pragma name: {name!r}")
        fut: Future[Any] = Future()
        with self._lock:
            if self._thread is None or self._closed:
                raise RuntimeError("buffer writer is not running")
            self._queue.put(_Call(lambda c: c.execute(f"PRAGMA {name}").fetchone()[0], fut))
        return fut.result(timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is committed (or failed); False on timeout."""
        with self._lock:
            thread = self._thread
            if thread is None:
                return self._queue.empty()
            if self._closed or not thread.is_alive():  # closing: everything queued is handled
                thread.join(timeout)
                return not thread.is_alive()
            done = threading.Event()
            self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Commit everything queued, stop the thread and close the connection.

        Returns False if the thread did not finish within ``timeout``.
        """
        with self._lock:
            if self._closed:
                thread = self._thread
                if thread is not None:
                    thread.join(timeout)
                return thread is None or not thread.is_alive()
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(_STOP)
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            log.warning("buffer_writer_close_timeout", backlog=self.backlog)
            return False
        log.info("buffer_writer_stopped", committed=self.committed)
        return True

    # thread
    def _run(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            while True:
                try:
                    # with records to retry, wake up for them even when nothing else comes
                    wait = max(0.0, self._retry_at - time.monotonic()) if self._retry else None
                    items = [self._queue.get(timeout=wait)]
                except queue.Empty:
                    items = []
                while len(items) < self.max_batch:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                pending = [it for it in items if isinstance(it, _Pending)]
                stopping = any(it is _STOP for it in items)
                if self._retry and (stopping or time.monotonic() >= self._retry_at):
                    self._write_retries(conn, final=stopping)
                if pending:
                    try:
                        self._write(conn, pending)
                    except BaseException as e:  # never let the thread die silently
                        log.exception("buffer_write_failed", records=len(pending))
                        for p in pending:
                            if not p.future.done():
                                p.future.set_exception(e)
                for it in items:
                    if isinstance(it, threading.Event):
                        it.set()
                    elif isinstance(it, _Call):
                        try:
                            it.future.set_result(it.fn(conn))
                        except Exception as e:
                            it.future.set_exception(e)
                if stopping:
                    if self._retry:  # the batch that just failed gets its last chance too
                        self._write_retries(conn, final=True)
                    break
        finally:
            self._drain_after_stop()
            conn.close()

    def _keep_for_retry(self, records: list[BufferRecord], error: BaseException) -> None:
        self.commit_failures += 1
        self._retry.extend(records)
        over = len(self._retry) - self.retry_limit
        for _ in range(max(0, over)):
            self._retry.popleft()
        if over > 0:
            self.dropped += over
        self._retry_at = time.monotonic() + self.retry_s
        log.error(
            "buffer_commit_failed",
            path=str(self.path),
            records=len(records),
            error=str(error),
            kept_for_retry=len(self._retry),
            dropped=max(0, over),
            dropped_total=self.dropped,
        )

    def _write_retries(self, conn: sqlite3.Connection, final: bool) -> None:
        """Write the records that failed before; at close (``final``) the ones that still
        fail are counted as dropped."""
        records = list(self._retry)
        self._retry.clear()
        before = self.commit_failures
        for i in range(0, len(records), self.max_batch):
            batch = records[i : i + self.max_batch]
            futures = [_Pending(r, Future()) for r in batch]
            self._write(conn, futures)
        if self.commit_failures == before:
            log.info("buffer_retry_committed", records=len(records))
        elif final:
            self.dropped += len(self._retry)
            log.error("buffer_records_dropped", records=len(self._retry), at="close")
            self._retry.clear()

    def _drain_after_stop(self) -> None:
        while True:
            try:
                it = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(it, _Pending | _Call) and not it.future.done():
                it.future.set_exception(RuntimeError("buffer writer stopped"))
            elif isinstance(it, threading.Event):
                it.set()

    def _write(self, conn: sqlite3.Connection, pending: list[_Pending]) -> None:
        settings = self.settings
        ok: list[tuple[_Pending, str, bool]] = []
        rows: list[tuple[Any, ...]] = []
        for p in pending:
            if not p.future.set_running_or_notify_cancel():
                continue  # cancelled by the submitter
            try:
                params, split, failure = encode_record(p.record, settings)
            except Exception as e:
                log.warning("buffer_record_rejected", error=str(e))
                p.future.set_exception(e)
                continue
            ok.append((p, split, failure))
            rows.append(params)
        if not rows:
            return
        try:
            ids, evicted = insert_rows(conn, rows, settings.max_records)
        except Exception as e:
            err = BufferError(f"{self.path}: could not store {len(rows)} record(s): {e}")
            err.__cause__ = e
            for p, _, _ in ok:
                p.future.set_exception(err)
            self._keep_for_retry([p.record for p, _, _ in ok], e)
            return
        self.committed += len(ids)
        self.evicted += evicted
        records = []
        for (p, split, failure), row_id in zip(ok, ids, strict=True):
            p.record.id, p.record.split, p.record.is_failure = row_id, split, failure
            records.append(p.record)
        for (p, _, _), row_id in zip(ok, ids, strict=True):
            p.future.set_result(row_id)
        if evicted:
            log.debug("buffer_evicted", records=evicted)
        if self.on_commit is not None:
            try:
                self.on_commit(records)
            except Exception:
                log.exception("buffer_on_commit_failed")
