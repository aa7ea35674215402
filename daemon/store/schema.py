"""The buffer's database file: where it lives, its schema and migrations, and opening it safely.

One SQLite database, ``<data_dir>/buffer.sqlite`` (mode 0600, WAL journal), one row per request
in ``records`` (`daemon.store.codec` packs a record into a row). Beside it, ``record_counts``
(schema version 2) keeps the counts and acceptance sums per (split, failure, used for training,
adapter version), maintained by triggers on every INSERT, DELETE and UPDATE of ``records``, so
the numbers ``/status`` shows on every scrape cost a few rows whatever the buffer holds.

Bad files
---------
A file that is not a SQLite database, is corrupt, is some other application's database or has a
newer schema than this code knows raises `BufferError` naming the file. Nothing is ever written to
such a file, nor is it moved or deleted: the daemon refuses to start and the user decides.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from daemon.errors import BufferError
from daemon.logging import get_logger

log = get_logger("buffer")

BUFFER_FILENAME = "buffer.sqlite"
SQLITE_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT_MS = 30_000


def buffer_path(data_dir: str | os.PathLike[str]) -> Path:
    """Where the buffer lives inside the data directory."""
    return Path(data_dir) / BUFFER_FILENAME


COLUMNS = (
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
SELECT = f"SELECT {', '.join(COLUMNS)} FROM records"
INSERT = (
    f"INSERT INTO records ({', '.join(COLUMNS[1:])}) VALUES ({', '.join('?' for _ in COLUMNS[1:])})"
)
PENDING_WHERE = "is_failure = 1 AND split = 'train' AND used_for_training IS NULL"


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
    conn.execute(f"CREATE INDEX records_pending ON records (id) WHERE {PENDING_WHERE}")


# The counts table: what `ReplayBuffer.stats`, `count` and eviction read instead of scanning
# ``records``. One row per (split, is_failure, used, adapter_version); ``records`` may reach 0
# (readers skip those rows). ``rate_sum``/``rated`` are sum()/count() of acceptance_rate.
_COUNT_ADD = """
    INSERT INTO record_counts
        (split, is_failure, used, adapter_version, records, rated, rate_sum, accepted, drafted)
    VALUES (
        new.split, new.is_failure, new.used_for_training IS NOT NULL, new.adapter_version, 1,
        new.acceptance_rate IS NOT NULL, coalesce(new.acceptance_rate, 0.0),
        coalesce(new.accepted, 0), coalesce(new.drafted, 0)
    )
    ON CONFLICT (split, is_failure, used, adapter_version) DO UPDATE SET
        records = records + 1, rated = rated + excluded.rated,
        rate_sum = rate_sum + excluded.rate_sum, accepted = accepted + excluded.accepted,
        drafted = drafted + excluded.drafted;
"""
# rate_sum restarts from exactly 0 when its last rated row goes, so float residue of the
# additions and subtractions cannot outlive the rows it came from.
_COUNT_REMOVE = """
    UPDATE record_counts SET
        records = records - 1,
        rated = rated - (old.acceptance_rate IS NOT NULL),
        rate_sum = CASE WHEN rated = (old.acceptance_rate IS NOT NULL) THEN 0.0
                        ELSE rate_sum - coalesce(old.acceptance_rate, 0.0) END,
        accepted = accepted - coalesce(old.accepted, 0),
        drafted = drafted - coalesce(old.drafted, 0)
    WHERE split = old.split AND is_failure = old.is_failure
        AND used = (old.used_for_training IS NOT NULL) AND adapter_version = old.adapter_version;
"""
_COUNTED_COLUMNS = (
    "split, is_failure, used_for_training, adapter_version, acceptance_rate, accepted, drafted"
)


def _migrate_v2(conn: sqlite3.Connection) -> None:
    """The counts table, its triggers, and its rows for the records already there."""
    conn.execute(
        """
        CREATE TABLE record_counts (
            split TEXT NOT NULL,
            is_failure INTEGER NOT NULL,
            used INTEGER NOT NULL,                  -- used_for_training IS NOT NULL
            adapter_version INTEGER NOT NULL,
            records INTEGER NOT NULL,
            rated INTEGER NOT NULL,                 -- rows with an acceptance_rate
            rate_sum REAL NOT NULL,                 -- their sum of acceptance_rate
            accepted INTEGER NOT NULL,              -- sum(accepted), NULL as 0
            drafted INTEGER NOT NULL,               -- sum(drafted), NULL as 0
            PRIMARY KEY (split, is_failure, used, adapter_version)
        ) WITHOUT ROWID
        """
    )
    conn.execute(
        "INSERT INTO record_counts SELECT split, is_failure, used_for_training IS NOT NULL, "
        "adapter_version, count(*), count(acceptance_rate), coalesce(sum(acceptance_rate), 0.0), "
        "coalesce(sum(accepted), 0), coalesce(sum(drafted), 0) FROM records GROUP BY 1, 2, 3, 4"
    )
    conn.execute(
        f"CREATE TRIGGER records_count_insert AFTER INSERT ON records BEGIN {_COUNT_ADD} END"
    )
    conn.execute(
        f"CREATE TRIGGER records_count_delete AFTER DELETE ON records BEGIN {_COUNT_REMOVE} END"
    )
    conn.execute(
        f"CREATE TRIGGER records_count_update AFTER UPDATE OF {_COUNTED_COLUMNS} ON records "
        f"BEGIN {_COUNT_REMOVE} {_COUNT_ADD} END"
    )


# Version 3: the counts keyed by target too, so that each served model's numbers (its pending
# failures, its holdout rows) are read without a scan (models.targets).
_COUNT_ADD_V3 = """
    INSERT INTO record_counts (
        target_id, split, is_failure, used, adapter_version, records, rated, rate_sum,
        accepted, drafted
    )
    VALUES (
        new.target_id, new.split, new.is_failure, new.used_for_training IS NOT NULL,
        new.adapter_version, 1, new.acceptance_rate IS NOT NULL,
        coalesce(new.acceptance_rate, 0.0), coalesce(new.accepted, 0), coalesce(new.drafted, 0)
    )
    ON CONFLICT (target_id, split, is_failure, used, adapter_version) DO UPDATE SET
        records = records + 1, rated = rated + excluded.rated,
        rate_sum = rate_sum + excluded.rate_sum, accepted = accepted + excluded.accepted,
        drafted = drafted + excluded.drafted;
"""
_COUNT_REMOVE_V3 = _COUNT_REMOVE.replace(
    "WHERE split = old.split", "WHERE target_id = old.target_id AND split = old.split"
)


def _migrate_v3(conn: sqlite3.Connection) -> None:
    """The counts table keyed by target as well; rebuilt from the records."""
    for trigger in ("insert", "delete", "update"):
        conn.execute(f"DROP TRIGGER records_count_{trigger}")
    conn.execute("DROP TABLE record_counts")
    conn.execute(
        """
        CREATE TABLE record_counts (
            target_id TEXT NOT NULL,
            split TEXT NOT NULL,
            is_failure INTEGER NOT NULL,
            used INTEGER NOT NULL,                  -- used_for_training IS NOT NULL
            adapter_version INTEGER NOT NULL,
            records INTEGER NOT NULL,
            rated INTEGER NOT NULL,                 -- rows with an acceptance_rate
            rate_sum REAL NOT NULL,                 -- their sum of acceptance_rate
            accepted INTEGER NOT NULL,              -- sum(accepted), NULL as 0
            drafted INTEGER NOT NULL,               -- sum(drafted), NULL as 0
            PRIMARY KEY (target_id, split, is_failure, used, adapter_version)
        ) WITHOUT ROWID
        """
    )
    conn.execute(
        "INSERT INTO record_counts SELECT target_id, split, is_failure, "
        "used_for_training IS NOT NULL, adapter_version, count(*), count(acceptance_rate), "
        "coalesce(sum(acceptance_rate), 0.0), coalesce(sum(accepted), 0), "
        "coalesce(sum(drafted), 0) FROM records GROUP BY 1, 2, 3, 4, 5"
    )
    conn.execute(
        f"CREATE TRIGGER records_count_insert AFTER INSERT ON records BEGIN {_COUNT_ADD_V3} END"
    )
    conn.execute(
        f"CREATE TRIGGER records_count_delete AFTER DELETE ON records BEGIN {_COUNT_REMOVE_V3} END"
    )
    conn.execute(
        f"CREATE TRIGGER records_count_update AFTER UPDATE OF target_id, {_COUNTED_COLUMNS} "
        f"ON records BEGIN {_COUNT_REMOVE_V3} {_COUNT_ADD_V3} END"
    )
    # a model's own rows in time order (its holdout, its recent outputs)
    conn.execute("CREATE INDEX records_target_split ON records (target_id, split, created, id)")


# Forward migrations: MIGRATIONS[i] takes a database from user_version i to i + 1.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_v1, _migrate_v2, _migrate_v3]
SCHEMA_VERSION = len(MIGRATIONS)
# What each version added that the database must hold (a file missing it is not ours, or broken).
_REQUIRED = {1: "records", 2: "record_counts", 3: "record_counts"}

PENDING_COUNTED = "split = 'train' AND is_failure = 1 AND used = 0"  # PENDING_WHERE, counted


def counted(conn: sqlite3.Connection, where: str = "", params: Sequence[Any] = ()) -> int:
    """How many records the counts table holds for the keys matching ``where``: no scan."""
    sql = "SELECT coalesce(sum(records), 0) FROM record_counts"
    return int(conn.execute(f"{sql} WHERE {where}" if where else sql, params).fetchone()[0])


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
        version = _check_schema(conn, path, verify)
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


def _check_schema(conn: sqlite3.Connection, path: Path, verify: bool) -> int:
    """The file's schema version, once it is known to be a buffer this code can use."""
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
    missing = [t for v, t in _REQUIRED.items() if v <= version and t not in objects]
    if missing:
        raise BufferError(f"{path}: buffer database (version {version}) has no {missing[0]} table")
    if verify and version >= 1:
        problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise BufferError(
                f"{path}: buffer database is corrupt ({'; '.join(problems)}); "
                "the file was left untouched"
            )
    return int(version)


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


def size_on_disk(path: Path) -> int:
    total = 0
    for p in (path, Path(f"{path}-wal")):
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return total


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """A database file (``*.sqlite``/``*.db``) or a data directory, existing or not."""
    p = Path(path).expanduser()
    if p.suffix in (".sqlite", ".sqlite3", ".db") and not p.is_dir():
        return p
    return p / BUFFER_FILENAME
