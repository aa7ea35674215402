"""Replay buffer: what the target rejected of the draft, for every served request.

One SQLite database, ``<data_dir>/buffer.sqlite`` (mode 0600, WAL journal), one row per request.
Token-id lists and the per-rejection arrays (positions, draft/target tokens, the target's top-k
ids and log-probs) are packed little-endian int32/float32 blobs, so a record costs one row however
long its output or top-k is.

Writers and readers
-------------------
The serving side never touches the database itself: `BufferWriter.submit` hands a record to a
writer thread and returns a `concurrent.futures.Future` at once. The thread drains its queue,
writes each batch in one transaction, evicts the oldest rows beyond ``max_records`` and then
resolves each future to the record's row id, sets ``id``/``split``/``is_failure`` on the record
and calls ``on_commit(records)``.

`ReplayBuffer` is the reader (training, CLI) with its own connection; WAL lets it read while the
writer writes, from another thread or another process. Its few writes (`mark_used`, `purge`, `add`)
take SQLite's write lock and wait (``busy_timeout``) for the writer's current batch.

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

Bad files
---------
A file that is not a SQLite database, is corrupt, is some other application's database or has a
newer schema than this code knows raises `BufferError` naming the file. Nothing is ever written to
such a file, nor is it moved or deleted: the daemon refuses to start and the user decides.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import sqlite3
import sys
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from daemon.config import BufferSettings
from daemon.core.records import Rejection, acceptance_rate, is_failure_case
from daemon.errors import BufferError
from daemon.logging import get_logger

log = get_logger("buffer")


BUFFER_FILENAME = "buffer.sqlite"
SQLITE_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT_MS = 30_000
Split = Literal["train", "holdout"]
SPLITS = ("train", "holdout")


# --------------------------------------------------------------------------------------------
# Records


@dataclass
class BufferRecord:
    """One served request. ``id``, ``split`` and ``is_failure`` are filled in by the buffer.

    Setting ``split`` or ``is_failure`` before submitting overrides the buffer's own assignment
    (imports, tests). ``rejections`` may hold any objects with `Rejection`'s attributes.
    """

    prompt_text: str
    prompt_tokens: list[int]
    output_text: str
    output_tokens: list[int]
    stats: dict
    rejections: list[Rejection]
    target_id: str
    draft_id: str
    adapter_version: int = 0
    created: float = field(default_factory=time.time)
    id: int | None = None
    split: str | None = None
    is_failure: bool | None = None
    used_for_training: str | None = None

    @classmethod
    def from_result(
        cls,
        prompt_text: str,
        prompt_tokens: Sequence[int],
        result: Any,
        target_id: str,
        draft_id: str,
        adapter_version: int = 0,
    ) -> BufferRecord:
        """The record of one finished request (a `daemon.core.engine.GenerationResult`)."""
        return cls(
            prompt_text=prompt_text,
            prompt_tokens=list(prompt_tokens),
            output_text=result.text,
            output_tokens=list(result.tokens),
            stats=result.stats.to_dict(),
            rejections=list(result.rejections),
            target_id=target_id,
            draft_id=draft_id,
            adapter_version=adapter_version,
        )


def buffer_path(data_dir: str | os.PathLike[str]) -> Path:
    """Where the buffer lives inside the data directory."""
    return Path(data_dir) / BUFFER_FILENAME


def assign_split(prompt_text: str, holdout_fraction: float) -> Split:
    """``holdout`` for a stable ``holdout_fraction`` of prompts, chosen by the prompt's sha256.

    The same text always lands in the same split, in every process and on every machine.
    """
    digest = hashlib.sha256(prompt_text.encode("utf-8", "surrogatepass")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "holdout" if u < holdout_fraction else "train"


def draft_evidence(stats: dict, rejections: int) -> tuple[float | None, int]:
    """What a failure case is judged on: (the draft model's acceptance, rejections seen).

    The model's own rounds when it drafted in the request (tokens proposed by lookup or the
    suffix index say nothing about the model the loop trains). When it did not draft because
    the cost-aware policy judged it not worth running, the policy's running estimate of its
    acceptance, which probes across requests measured, counts as one piece of evidence: a
    draft too poor to run is what training is for. Older records: the request's acceptance.
    """
    by_source = stats.get("drafted_by_source")
    if isinstance(by_source, dict) and (by_source or "draft_acceptance_estimate" in stats):
        drafted = int(by_source.get("model", 0))
        if drafted:
            accepted = int((stats.get("accepted_by_source") or {}).get("model", 0))
            return acceptance_rate(accepted, drafted), rejections
        estimate = stats.get("draft_acceptance_estimate")
        return (float(estimate), 1) if estimate is not None else (None, rejections)
    return stats_acceptance_rate(stats), rejections


def stats_acceptance_rate(stats: dict) -> float | None:
    """A stored request's acceptance: the engine's ``acceptance_rate``, else ``accepted /
    drafted``; None if nothing was drafted (the engine reports 0.0 there: no evidence)."""
    if stats.get("drafted") == 0:
        return None
    rate = stats.get("acceptance_rate")
    if rate is not None:
        return float(rate)
    drafted, accepted = stats.get("drafted"), stats.get("accepted")
    if drafted is None or accepted is None:
        return None
    return acceptance_rate(int(accepted), int(drafted))


# --------------------------------------------------------------------------------------------
# Packing

_I32 = next(c for c in "ilh" if array(c).itemsize == 4)
_SWAP = sys.byteorder != "little"


def _pack(code: str, values: Iterable[Any]) -> bytes:
    conv = float if code == "f" else int
    a = array(code, [conv(v) for v in values])
    if _SWAP:
        a.byteswap()
    return a.tobytes()


def _unpack(code: str, blob: bytes | None) -> list[Any]:
    a = array(code)
    if blob:
        a.frombytes(blob)
        if _SWAP:
            a.byteswap()
    return a.tolist()


def pack_ids(ids: Iterable[int]) -> bytes:
    """Token ids as a little-endian int32 blob."""
    return _pack(_I32, ids)


def unpack_ids(blob: bytes | None) -> list[int]:
    return _unpack(_I32, blob)


def _pack_floats(values: Iterable[float]) -> bytes:
    return _pack("f", values)


def _unpack_floats(blob: bytes | None) -> list[float]:
    return _unpack("f", blob)


def _json_default(obj: Any) -> Any:
    for conv in (int, float):  # numpy / mlx scalars
        try:
            value = conv(obj)
        except (TypeError, ValueError):
            continue
        if value == obj:
            return value
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


# --------------------------------------------------------------------------------------------
# Schema

_COLUMNS = (
    "id",
    "created",
    "target_id",
    "draft_id",
    "adapter_version",
    "prompt_text",
    "prompt_tokens",
    "output_text",
    "output_tokens",
    "stats",
    "drafted",
    "accepted",
    "acceptance_rate",
    "num_rejections",
    "split",
    "is_failure",
    "used_for_training",
    "rej_position",
    "rej_context_length",
    "rej_draft_token",
    "rej_draft_prob",
    "rej_target_token",
    "rej_top_k",
    "rej_top_ids",
    "rej_top_logprobs",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM records"
_INSERT = (
    f"INSERT INTO records ({', '.join(_COLUMNS[1:])}) "
    f"VALUES ({', '.join('?' for _ in _COLUMNS[1:])})"
)
_PENDING_WHERE = "is_failure = 1 AND split = 'train' AND used_for_training IS NULL"


def _migrate_v1(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE records (
            id INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused, even after eviction
            created REAL NOT NULL,                  -- unix time
            target_id TEXT NOT NULL,
            draft_id TEXT NOT NULL,
            adapter_version INTEGER NOT NULL DEFAULT 0,  -- 0 = no adapter
            prompt_text TEXT NOT NULL,              -- after the chat template
            prompt_tokens BLOB NOT NULL,            -- int32 LE
            output_text TEXT NOT NULL,
            output_tokens BLOB NOT NULL,            -- int32 LE
            stats TEXT NOT NULL,                    -- the engine's statistics, JSON
            drafted INTEGER,                        -- copied from stats for queries
            accepted INTEGER,
            acceptance_rate REAL,
            num_rejections INTEGER NOT NULL,
            split TEXT NOT NULL CHECK (split IN ('train', 'holdout')),
            is_failure INTEGER NOT NULL CHECK (is_failure IN (0, 1)),
            used_for_training TEXT,                 -- training run id, NULL = not yet
            -- rejections, one element per rejection (int32/float32 LE):
            rej_position BLOB NOT NULL,
            rej_context_length BLOB NOT NULL,
            rej_draft_token BLOB NOT NULL,
            rej_draft_prob BLOB NOT NULL,           -- float32
            rej_target_token BLOB NOT NULL,
            rej_top_k BLOB NOT NULL,                -- how many top entries each rejection has
            rej_top_ids BLOB NOT NULL,              -- all rejections' top ids, concatenated
            rej_top_logprobs BLOB NOT NULL          -- float32, aligned with rej_top_ids
        )
        """
    )
    conn.execute("CREATE INDEX records_created ON records (created, id)")
    conn.execute("CREATE INDEX records_split_created ON records (split, created, id)")
    conn.execute(f"CREATE INDEX records_pending ON records (id) WHERE {_PENDING_WHERE}")


# Forward migrations: MIGRATIONS[i] takes a database from user_version i to i + 1.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_v1]
SCHEMA_VERSION = len(MIGRATIONS)


def _check_header(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            header = f.read(100)
    except OSError as e:
        raise BufferError(f"{path}: cannot read buffer database: {e.strerror or e}") from e
    if header and (len(header) < 100 or not header.startswith(SQLITE_MAGIC)):
        raise BufferError(
            f"{path}: not a SQLite database (bad header); refusing to use or overwrite it. "
            "Move it aside to start with an empty buffer."
        )


def _chmod_private(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            if p.exists() and (p.stat().st_mode & 0o777) != 0o600:
                os.chmod(p, 0o600)
        except OSError:
            pass


def _create_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return  # another process got there first
    except OSError as e:
        raise BufferError(f"{path}: cannot create buffer database: {e.strerror or e}") from e
    os.close(fd)


# Database files this process has opened a connection to (see `open_connection`).
_OPENED: set[Path] = set()


def open_connection(
    path: str | os.PathLike[str],
    *,
    create: bool = True,
    synchronous: str = "FULL",
    verify: bool = False,
) -> sqlite3.Connection:
    """A connection to the buffer at ``path``, validated, in WAL mode and migrated.

    Raises `BufferError` for a missing (with ``create=False``), unreadable, non-SQLite, corrupt,
    foreign or newer-schema file, without writing anything to it. ``verify`` also runs
    ``PRAGMA quick_check`` (reads the whole file: finds damage beyond the header and schema).
    """
    path = Path(path)
    if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
        raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
    if path.exists():
        if not path.is_file():
            raise BufferError(f"{path}: buffer database path is not a regular file")
        # Closing any descriptor of the file drops this process's POSIX locks on it, SQLite's
        # included: another process could then checkpoint and delete the WAL under a live
        # connection. So the raw header is read only before this process has a connection.
        if path.resolve() not in _OPENED:
            _check_header(path)
    elif create:
        _create_file(path)
    else:
        raise BufferError(f"{path}: buffer database does not exist")

    uri = f"file:{quote(str(path.resolve()))}?mode=rw"
    try:
        conn = sqlite3.connect(
            uri,
            uri=True,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error as e:
        raise BufferError(f"{path}: cannot open buffer database: {e}") from e
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Read-only probes first: nothing is written until the file is known to be ours.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        rows = conn.execute("SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
        objects = {name for (name,) in rows}
        if version > SCHEMA_VERSION:
            raise BufferError(
                f"{path}: buffer schema version {version} is newer than this specd supports "
                f"(version {SCHEMA_VERSION}); upgrade specd or move the file aside"
            )
        if version == 0 and objects:
            raise BufferError(
                f"{path}: not a specd buffer (SQLite database with tables "
                f"{', '.join(sorted(objects))} and no schema version); refusing to modify it"
            )
        if version >= 1 and "records" not in objects:
            raise BufferError(f"{path}: buffer database (version {version}) has no records table")
        if verify and version >= 1:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise BufferError(
                    f"{path}: buffer database is corrupt ({'; '.join(problems)}); "
                    "the file was left untouched"
                )
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            log.warning("buffer_wal_unavailable", path=str(path), journal_mode=mode)
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        if version < SCHEMA_VERSION:
            _migrate(conn, path)
    except BufferError:
        conn.close()
        raise
    except sqlite3.DatabaseError as e:
        conn.close()
        raise BufferError(
            f"{path}: cannot read buffer database ({e}); the file was left untouched"
        ) from e
    _chmod_private(path)
    _OPENED.add(path.resolve())
    return conn


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have
        if version > SCHEMA_VERSION:
            raise BufferError(
                f"{path}: buffer schema version {version} is newer than this specd supports "
                f"(version {SCHEMA_VERSION})"
            )
        for v in range(version, SCHEMA_VERSION):
            MIGRATIONS[v](conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if version < SCHEMA_VERSION:
        log.info("buffer_migrated", path=str(path), from_version=version, to_version=SCHEMA_VERSION)


# --------------------------------------------------------------------------------------------
# Row <-> record


def _encode(record: BufferRecord, settings: BufferSettings) -> tuple[tuple[Any, ...], str, bool]:
    """Insert parameters for ``record`` plus its split and failure flag."""
    stats = dict(record.stats or {})
    rejections = list(record.rejections or ())
    split = record.split or assign_split(record.prompt_text, settings.holdout_fraction)
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'holdout', not {split!r}")
    failure = record.is_failure
    if failure is None:
        failure = is_failure_case(
            *draft_evidence(stats, len(rejections)), settings.failure_threshold
        )
    top_k: list[int] = []
    top_ids: list[int] = []
    top_lp: list[float] = []
    for r in rejections:
        ids, lps = list(r.top_ids), list(r.top_logprobs)
        if len(ids) != len(lps):
            raise ValueError(
                f"rejection at position {r.position}: {len(ids)} top ids but {len(lps)} log-probs"
            )
        top_k.append(len(ids))
        top_ids += ids
        top_lp += lps
    rate = stats_acceptance_rate(stats)
    drafted, accepted = stats.get("drafted"), stats.get("accepted")
    params = (
        float(record.created),
        str(record.target_id),
        str(record.draft_id),
        int(record.adapter_version or 0),
        str(record.prompt_text),
        pack_ids(record.prompt_tokens),
        str(record.output_text),
        pack_ids(record.output_tokens),
        json.dumps(stats, default=_json_default),
        None if drafted is None else int(drafted),
        None if accepted is None else int(accepted),
        rate,
        len(rejections),
        split,
        int(bool(failure)),
        record.used_for_training,
        pack_ids(r.position for r in rejections),
        pack_ids(r.context_length for r in rejections),
        pack_ids(r.draft_token for r in rejections),
        _pack_floats(r.draft_prob for r in rejections),
        pack_ids(r.target_token for r in rejections),
        pack_ids(top_k),
        pack_ids(top_ids),
        _pack_floats(top_lp),
    )
    return params, split, bool(failure)


def _decode(row: sqlite3.Row | tuple[Any, ...]) -> BufferRecord:
    r = dict(zip(_COLUMNS, row, strict=True))
    positions = unpack_ids(r["rej_position"])
    contexts = unpack_ids(r["rej_context_length"])
    drafts = unpack_ids(r["rej_draft_token"])
    probs = _unpack_floats(r["rej_draft_prob"])
    targets = unpack_ids(r["rej_target_token"])
    counts = unpack_ids(r["rej_top_k"])
    top_ids = unpack_ids(r["rej_top_ids"])
    top_lp = _unpack_floats(r["rej_top_logprobs"])
    rejections = []
    start = 0
    for i, k in enumerate(counts):
        rejections.append(
            Rejection(
                position=positions[i],
                context_length=contexts[i],
                draft_token=drafts[i],
                draft_prob=probs[i],
                target_token=targets[i],
                top_ids=top_ids[start : start + k],
                top_logprobs=top_lp[start : start + k],
            )
        )
        start += k
    return BufferRecord(
        prompt_text=r["prompt_text"],
        prompt_tokens=unpack_ids(r["prompt_tokens"]),
        output_text=r["output_text"],
        output_tokens=unpack_ids(r["output_tokens"]),
        stats=json.loads(r["stats"]),
        rejections=rejections,
        target_id=r["target_id"],
        draft_id=r["draft_id"],
        adapter_version=r["adapter_version"],
        created=r["created"],
        id=r["id"],
        split=r["split"],
        is_failure=bool(r["is_failure"]),
        used_for_training=r["used_for_training"],
    )


def _evict(conn: sqlite3.Connection, max_records: int) -> int:
    """Delete the oldest train rows (then oldest holdout rows) beyond ``max_records``."""
    excess = conn.execute("SELECT count(*) FROM records").fetchone()[0] - max_records
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


def _insert(
    conn: sqlite3.Connection, encoded: Sequence[tuple[Any, ...]], max_records: int
) -> tuple[list[int], int]:
    """Insert rows and evict in one transaction; returns the new ids and the eviction count."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        ids = [int(conn.execute(_INSERT, params).lastrowid or 0) for params in encoded]
        evicted = _evict(conn, max_records)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return ids, evicted


def _size_on_disk(path: Path) -> int:
    total = 0
    for p in (path, Path(f"{path}-wal")):
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return total


def _resolve(path: str | os.PathLike[str]) -> Path:
    """A database file (``*.sqlite``/``*.db``) or a data directory, existing or not."""
    p = Path(path).expanduser()
    if p.suffix in (".sqlite", ".sqlite3", ".db") and not p.is_dir():
        return p
    return p / BUFFER_FILENAME


# --------------------------------------------------------------------------------------------
# Writer


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
        self.path = _resolve(path)
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
                params, split, failure = _encode(p.record, settings)
            except Exception as e:
                log.warning("buffer_record_rejected", error=str(e))
                p.future.set_exception(e)
                continue
            ok.append((p, split, failure))
            rows.append(params)
        if not rows:
            return
        try:
            ids, evicted = _insert(conn, rows, settings.max_records)
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


# --------------------------------------------------------------------------------------------
# Reader


class ReplayBuffer:
    """Reads (and curates) the buffer; safe beside a `BufferWriter` in any thread or process.

    ``path`` is the database file or the data directory. One instance may be shared between
    threads (calls are serialised on its connection).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        settings: BufferSettings | None = None,
        *,
        create: bool = True,
        verify: bool = False,
    ) -> None:
        self.path = _resolve(path)
        self.settings = settings or BufferSettings()
        self.create = create
        self.verify = verify
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()

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
        sql = f"{_SELECT} {'WHERE ' + where if where else ''} {tail}"
        return [_decode(row) for row in self._query(sql, params)]

    # queries
    def count(self, split: str | None = None) -> int:
        if split is None:
            return self._query("SELECT count(*) FROM records")[0][0]
        return self._query("SELECT count(*) FROM records WHERE split = ?", (split,))[0][0]

    def get(self, record_id: int) -> BufferRecord | None:
        rows = self._records("id = ?", (record_id,))
        return rows[0] if rows else None

    def ids(self) -> set[int]:
        return {i for (i,) in self._query("SELECT id FROM records")}

    def pending_failure_count(self) -> int:
        """Failure cases in the train split not yet used for training (cheap: partial index)."""
        return self._query(f"SELECT count(*) FROM records WHERE {_PENDING_WHERE}")[0][0]

    def pending_failures(self, limit: int | None = None) -> list[BufferRecord]:
        """Train-split failure cases no training run has used yet, oldest first."""
        return self._records(
            _PENDING_WHERE, (-1 if limit is None else limit,), "ORDER BY id LIMIT ?"
        )

    def sample_replay(
        self,
        n: int,
        exclude_ids: Iterable[int] = (),
        seed: int | None = None,
        before: float | None = None,
    ) -> list[BufferRecord]:
        """Up to ``n`` random train rows (used for training or not), excluding ``exclude_ids``
        (the failures being trained on) and, with ``before``, rows created at or after it.
        Reproducible for a given ``seed`` and buffer content; holdout rows are never returned."""
        if n <= 0:
            return []
        exclude = set(exclude_ids)
        sql = "SELECT id FROM records WHERE split = 'train'"
        params: tuple[Any, ...] = ()
        if before is not None:
            sql, params = sql + " AND created < ?", (before,)
        candidates = [i for (i,) in self._query(sql + " ORDER BY id", params) if i not in exclude]
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

    def recent_outputs(self, max_tokens: int, split: str = "train") -> list[list[int]]:
        """The output tokens of the newest records of ``split``, oldest first, as many as fit
        in ``max_tokens`` (what the suffix drafting index is rebuilt from at start)."""
        out: list[list[int]] = []
        total, offset, page = 0, 0, 256
        while total < max_tokens:
            rows = self._query(
                "SELECT output_tokens FROM records WHERE split = ? "
                "ORDER BY created DESC, id DESC LIMIT ? OFFSET ?",
                (split, page, offset),
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
        return _size_on_disk(self.path)

    def stats(self, trend_window: int = 1000, trend_buckets: int = 10) -> dict[str, Any]:
        """Counts by split and failure, pending failures, disk size and acceptance trends.

        ``acceptance_trend``: the last ``trend_window`` records in time order, cut into
        ``trend_buckets`` buckets, each with its mean per-request acceptance rate and its
        token-weighted rate (sum accepted / sum drafted). ``acceptance_by_adapter``: the same per
        adapter version (0 = base draft), over train and holdout separately and together.
        """
        with self._lock:
            conn = self._db()
            try:
                conn.execute("BEGIN")  # one snapshot for all the numbers
                try:
                    counts = conn.execute(
                        "SELECT split, is_failure, used_for_training IS NOT NULL, count(*) "
                        "FROM records GROUP BY 1, 2, 3"
                    ).fetchall()
                    span = conn.execute("SELECT min(created), max(created) FROM records").fetchone()
                    recent = conn.execute(
                        "SELECT created, acceptance_rate, drafted, accepted FROM records "
                        "ORDER BY created DESC, id DESC LIMIT ?",
                        (max(0, trend_window),),
                    ).fetchall()
                    by_adapter = conn.execute(
                        "SELECT adapter_version, split, count(*), avg(acceptance_rate), "
                        "sum(accepted), sum(drafted) FROM records GROUP BY 1, 2 ORDER BY 1, 2"
                    ).fetchall()
                finally:
                    conn.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                raise BufferError(f"{self.path}: {e}") from e

        out: dict[str, Any] = {
            "path": str(self.path),
            "schema_version": SCHEMA_VERSION,
            "records": 0,
            "train": 0,
            "holdout": 0,
            "failures": 0,
            "train_failures": 0,
            "holdout_failures": 0,
            "used_for_training": 0,
            "pending_failures": 0,
            "max_records": self.settings.max_records,
            "size_bytes": self.size_on_disk(),
            "oldest": span[0],
            "newest": span[1],
        }
        for split, failure, used, n in counts:
            out["records"] += n
            out[split] += n
            if failure:
                out["failures"] += n
                out[f"{split}_failures"] += n
            if used:
                out["used_for_training"] += n
            if split == "train" and failure and not used:
                out["pending_failures"] += n

        recent.reverse()
        trend = []
        if recent:
            buckets = max(1, min(trend_buckets, len(recent)))
            for b in range(buckets):
                chunk = recent[b * len(recent) // buckets : (b + 1) * len(recent) // buckets]
                trend.append({"start": chunk[0][0], "end": chunk[-1][0], **_acceptance(chunk)})
        out["acceptance_trend"] = trend

        adapters: dict[int, dict[str, Any]] = {}
        for version, split, n, mean, acc, drafted in by_adapter:
            entry = adapters.setdefault(version, {"adapter_version": version, "records": 0})
            entry["records"] += n
            entry[split] = {
                "records": n,
                "mean_acceptance": mean,
                "token_acceptance": acceptance_rate(acc or 0, drafted or 0),
            }
        for entry in adapters.values():
            parts = [entry[s] for s in SPLITS if s in entry]
            rated = [p for p in parts if p["mean_acceptance"] is not None]
            weight = sum(p["records"] for p in rated)
            entry["mean_acceptance"] = (
                sum(p["mean_acceptance"] * p["records"] for p in rated) / weight if weight else None
            )
        out["acceptance_by_adapter"] = list(adapters.values())
        return out

    # writes
    def add(self, records: Iterable[BufferRecord]) -> list[int]:
        """Insert records synchronously (imports, tests); sets ``id``/``split``/``is_failure``."""
        records = list(records)
        encoded = [_encode(r, self.settings) for r in records]
        with self._lock:
            try:
                ids, _ = _insert(self._db(), [e[0] for e in encoded], self.settings.max_records)
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
        out = Path(path)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        n = 0
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for rec in self.iter_records(split=split):
                    f.write(json.dumps(_export_line(rec, decode), ensure_ascii=False) + "\n")
                    n += 1
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return n


def _acceptance(rows: Sequence[tuple[Any, ...]]) -> dict[str, Any]:
    rates = [r[1] for r in rows if r[1] is not None]
    drafted = sum(r[2] or 0 for r in rows)
    accepted = sum(r[3] or 0 for r in rows)
    return {
        "records": len(rows),
        "mean_acceptance": sum(rates) / len(rates) if rates else None,
        "token_acceptance": acceptance_rate(accepted, drafted),
    }


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
