"""The buffer's counts table: kept by triggers equal to a GROUP BY over the records, filled when
an older database is migrated, and what stats, count and pending_failure_count read."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from daemon.config import BufferSettings
from daemon.core.records import Rejection
from daemon.errors import BufferError
from daemon.store import schema
from daemon.store.buffer import BufferRecord, BufferWriter, ReplayBuffer, buffer_path
from daemon.store.codec import encode_record
from tests.helpers import HANG_GUARD_S

# The side table's numbers as a scan computes them, in its key order.
SCAN = (
    "SELECT target_id, split, is_failure, used_for_training IS NOT NULL, adapter_version, "
    "count(*), count(acceptance_rate), coalesce(sum(acceptance_rate), 0.0), "
    "coalesce(sum(accepted), 0), coalesce(sum(drafted), 0) FROM records "
    "GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5"
)
KEPT = "SELECT * FROM record_counts WHERE records > 0 ORDER BY 1, 2, 3, 4, 5"
TARGETS = ("t", "u")  # two served models in one buffer


def random_record(rng: random.Random, i: int) -> BufferRecord:
    stats: dict = {}
    if rng.random() < 0.9:
        stats["drafted"] = rng.choice([0, 4, 8, 16, 32])  # accepted / drafted is dyadic too
        stats["accepted"] = rng.randrange(0, stats["drafted"] + 1)
    if rng.random() < 0.8:
        stats["acceptance_rate"] = rng.randrange(0, 9) / 8  # dyadic: float sums are exact
    n_rej = rng.randrange(0, 3)
    return BufferRecord(
        prompt_text=f"prompt {i} {rng.random()}",
        prompt_tokens=[1, 2],
        output_text="out",
        output_tokens=[3, 4, 5],
        stats=stats,
        rejections=[Rejection(p, 2 + p, 7, 0.5, 8, [8], [-0.1]) for p in range(n_rej)],
        target_id=rng.choice(TARGETS),
        draft_id="d",
        adapter_version=rng.randrange(0, 3),
        created=1000 + rng.randrange(0, 500),
        split=rng.choice([None, "train", "holdout"]),
    )


def assert_counts_match(b: ReplayBuffer) -> None:
    assert b._query(KEPT) == b._query(SCAN)
    for target in TARGETS:  # each model's own numbers, read from the same table
        mine = b.for_target(target)
        where = "target_id = ? AND "
        assert (
            mine.count()
            == b._query("SELECT count(*) FROM records WHERE target_id = ?", (target,))[0][0]
        )
        assert (
            mine.count("holdout")
            == b._query(f"SELECT count(*) FROM records WHERE {where} split = 'holdout'", (target,))[
                0
            ][0]
        )
        assert (
            mine.pending_failure_count()
            == b._query(
                f"SELECT count(*) FROM records WHERE {where} {schema.PENDING_WHERE}", (target,)
            )[0][0]
        )
        assert mine.stats().records == mine.count()
    assert b.count() == b._query("SELECT count(*) FROM records")[0][0]
    for split in ("train", "holdout"):
        assert (
            b.count(split)
            == b._query("SELECT count(*) FROM records WHERE split = ?", (split,))[0][0]
        )
    pending = b._query(f"SELECT count(*) FROM records WHERE {schema.PENDING_WHERE}")[0][0]
    assert b.pending_failure_count() == pending
    st = b.stats()
    assert st.records == b.count() and st.pending_failures == pending
    assert (
        st.used_for_training
        == b._query("SELECT count(*) FROM records WHERE used_for_training IS NOT NULL")[0][0]
    )


def test_counts_follow_inserts_evictions_marks_and_purges(tmp_path: Path) -> None:
    rng = random.Random(7)
    settings = BufferSettings(max_records=40, holdout_fraction=0.3)
    with ReplayBuffer(tmp_path / "buffer.sqlite", settings) as b:
        for step in range(30):
            b.add([random_record(rng, step * 100 + i) for i in range(rng.randrange(1, 12))])
            ids = sorted(b.ids())
            if step % 3 == 0:  # mark some rows, re-mark some already used with another run
                b.mark_used(rng.sample(ids, min(len(ids), 6)), f"run-{step}")
            if step % 7 == 6:
                b.purge(before=1000 + rng.randrange(0, 200))
            if step % 5 == 4:  # any counted column may change: the update trigger follows
                b._write(
                    "UPDATE records SET acceptance_rate = NULL, adapter_version = 5, "
                    "is_failure = 1 - is_failure, drafted = NULL WHERE id = ?",
                    (rng.choice(ids),),
                )
            assert_counts_match(b)
        assert b.count() == 40  # eviction ran
        b.purge()
        assert b.count() == 0 and b._query(KEPT) == []
        assert b.stats().acceptance_by_adapter == []


def test_counts_follow_the_writer(tmp_path: Path) -> None:
    rng = random.Random(3)
    db = tmp_path / "buffer.sqlite"
    settings = BufferSettings(max_records=25)
    with BufferWriter(db, settings, max_batch=4) as w:
        futures = [w.submit(random_record(rng, i)) for i in range(60)]
        for f in futures:
            f.result(timeout=HANG_GUARD_S)
    with ReplayBuffer(db, settings) as b:
        assert b.count() == 25
        assert_counts_match(b)


def _v1_database(path: Path, records: list[BufferRecord]) -> None:
    """A buffer as specd wrote it before the counts table: only the first migration."""
    conn = sqlite3.connect(path)
    schema.MIGRATIONS[0](conn)
    conn.execute("PRAGMA user_version = 1")
    settings = BufferSettings(holdout_fraction=0.3)
    for r in records:
        conn.execute(schema.INSERT, encode_record(r, settings)[0])
    conn.execute(
        "UPDATE records SET used_for_training = 'old' WHERE id % 3 = 0 AND split = 'train'"
    )
    conn.commit()
    conn.close()


def test_a_v1_database_gets_its_counts_filled(tmp_path: Path) -> None:
    rng = random.Random(11)
    db = buffer_path(tmp_path)
    _v1_database(db, [random_record(rng, i) for i in range(200)])
    with ReplayBuffer(db) as b:
        assert b._query("PRAGMA user_version")[0][0] == schema.SCHEMA_VERSION == 3
        assert len(b._query(KEPT)) > 10  # many keys, all filled from the old rows
        assert_counts_match(b)
        assert b.count() == 200
        b.add([random_record(rng, 1000 + i) for i in range(20)])  # the triggers exist too
        b.mark_used(sorted(b.ids())[:50], "new")
        assert_counts_match(b)


def test_a_newer_schema_is_still_refused(tmp_path: Path) -> None:
    db = buffer_path(tmp_path)
    with ReplayBuffer(db) as b:
        b.add([random_record(random.Random(1), 0)])
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    with pytest.raises(BufferError, match=f"version {schema.SCHEMA_VERSION + 1} is newer"):
        ReplayBuffer(db).open()
    assert db.read_bytes() == before


def test_a_current_database_without_its_counts_table_is_refused(tmp_path: Path) -> None:
    db = buffer_path(tmp_path)
    with ReplayBuffer(db) as b:
        b.add([random_record(random.Random(1), 0)])
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE record_counts")  # its triggers go with it
    conn.commit()
    conn.close()
    with pytest.raises(BufferError, match="no record_counts table"):
        ReplayBuffer(db).open()


def test_a_v2_database_gets_its_counts_keyed_by_target(tmp_path: Path) -> None:
    rng = random.Random(13)
    db = buffer_path(tmp_path)
    conn = sqlite3.connect(db)
    schema.MIGRATIONS[0](conn)
    schema.MIGRATIONS[1](conn)  # the counts table as version 2 kept it, with its triggers
    conn.execute("PRAGMA user_version = 2")
    for i in range(120):
        conn.execute(schema.INSERT, encode_record(random_record(rng, i), BufferSettings())[0])
    conn.commit()
    conn.close()
    with ReplayBuffer(db) as b:
        assert b._query("PRAGMA user_version")[0][0] == 3
        assert_counts_match(b)
        b.add([random_record(rng, 1000 + i) for i in range(20)])  # the new triggers
        assert_counts_match(b)


def test_a_buffer_for_a_target_reads_only_that_targets_records(tmp_path: Path) -> None:
    rng = random.Random(5)
    settings = BufferSettings(holdout_fraction=0.3, failure_threshold=1.0)
    with ReplayBuffer(tmp_path / "buffer.sqlite", settings) as b:
        b.add([random_record(rng, i) for i in range(80)])
        for target in TARGETS:
            mine = b.for_target(target)
            reads = [
                mine.pending_failures(),
                mine.holdout(),
                mine.sample_replay(50, seed=1),
                list(mine.iter_records()),
            ]
            assert all(reads) and all(r.target_id == target for rs in reads for r in rs)
            assert mine.ids() == {r.id for r in b.iter_records() if r.target_id == target}
            outputs = mine.recent_outputs(10_000)
            assert len(outputs) == sum(
                1 for r in b.iter_records() if r.target_id == target and r.split == "train"
            )
        assert len(b.ids()) == 80  # the unscoped buffer still reads everything
