"""The replay buffer: storage, classification, splits, eviction, concurrency, bad files, SIGKILL."""

from __future__ import annotations

import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from array import array
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from daemon.config import BufferSettings
from daemon.core.records import Rejection
from daemon.errors import BufferError
from daemon.store import schema, writer
from daemon.store.buffer import BufferRecord, BufferWriter, ReplayBuffer, assign_split, buffer_path
from daemon.store.schema import SCHEMA_VERSION
from tests.helpers import HANG_GUARD_S, wait_until

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("buffer_writer_child.py")


def rej(pos: int, k: int = 5, draft: int | None = None, target: int | None = None) -> Rejection:
    return Rejection(
        position=pos,
        context_length=10 + pos,
        draft_token=draft if draft is not None else 100 + pos,
        draft_prob=0.123456789,
        target_token=target if target is not None else 200 + pos,
        top_ids=[200 + pos + j for j in range(k)],
        top_logprobs=[-0.1 * j - 0.0123456789 for j in range(k)],
    )


def rec(
    prompt: str = "hello",
    rate: float | None = 0.5,
    n_rej: int = 1,
    created: float | None = None,
    split: str | None = None,
    **kw,
) -> BufferRecord:
    stats = {"drafted": 10, "accepted": 5}
    if rate is not None:
        stats["acceptance_rate"] = rate
    r = BufferRecord(
        prompt_text=prompt,
        prompt_tokens=[1, 2, 3],
        output_text="abcdef",
        output_tokens=[10, 11, 12, 13, 14, 15],
        stats=stats,
        rejections=[rej(p) for p in range(n_rej)],
        target_id="target-model",
        draft_id="draft-model",
        split=split,
        **kw,
    )
    if created is not None:
        r.created = created
    return r


def f32(values: list[float]) -> list[float]:
    return array("f", values).tolist()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return buffer_path(tmp_path / "data")


@pytest.fixture
def buf(db: Path):
    with ReplayBuffer(db, BufferSettings()) as b:
        yield b


# --- storage ----------------------------------------------------------------------------------


def test_round_trip_through_writer(db: Path) -> None:
    r = rec(n_rej=3, adapter_version=2)
    r.rejections[1] = SimpleNamespace(**vars(rej(7, k=20)))  # engine's own class: duck typing
    r.stats["extra"] = {"nested": [1, 2]}
    empty = rec(prompt="no rejections", n_rej=0, rate=1.0)
    empty.rejections[:] = []
    with BufferWriter(db, BufferSettings()) as w:
        ids = [w.submit(x).result(timeout=HANG_GUARD_S) for x in (r, empty)]
    assert r.id == ids[0] and empty.id == ids[1] and ids[1] > ids[0]

    with ReplayBuffer(db, BufferSettings()) as b:
        got = b.get(ids[0])
        assert got is not None
        for name in ("prompt_text", "prompt_tokens", "output_text", "output_tokens", "stats"):
            assert getattr(got, name) == getattr(r, name)
        assert (got.target_id, got.draft_id, got.adapter_version) == (
            "target-model",
            "draft-model",
            2,
        )
        assert got.created == r.created
        assert got.split == r.split and got.is_failure is True and got.used_for_training is None
        assert len(got.rejections) == 3
        for want, have in zip(r.rejections, got.rejections, strict=True):
            assert isinstance(have, Rejection)
            assert have.position == want.position
            assert have.context_length == want.context_length
            assert have.draft_token == want.draft_token
            assert have.target_token == want.target_token
            assert have.draft_prob == f32([want.draft_prob])[0]
            assert have.top_ids == want.top_ids
            assert have.top_logprobs == f32(want.top_logprobs)
        assert len(got.rejections[1].top_ids) == 20

        got_empty = b.get(ids[1])
        assert (
            got_empty is not None and got_empty.rejections == [] and got_empty.is_failure is False
        )
        # token lists are int32 blobs, not JSON
        blob = b._query("SELECT output_tokens FROM records WHERE id = ?", (ids[0],))[0][0]
        assert isinstance(blob, bytes) and len(blob) == 4 * len(r.output_tokens)


@pytest.mark.parametrize(
    ("stats", "n_rej", "failure"),
    [
        ({"drafted": 10, "accepted": 6, "acceptance_rate": 0.69}, 1, True),
        ({"drafted": 10, "accepted": 7, "acceptance_rate": 0.7}, 1, False),  # boundary: not below
        ({"drafted": 10, "accepted": 8, "acceptance_rate": 0.71}, 2, False),
        ({"drafted": 10, "accepted": 0, "acceptance_rate": 0.0}, 0, False),  # nothing rejected
        ({"drafted": 0, "accepted": 0, "acceptance_rate": 0.0}, 0, False),
        ({"drafted": 10, "accepted": 3}, 1, True),  # rate derived from counts
    ],
)
def test_failure_classification(buf: ReplayBuffer, stats: dict, n_rej: int, failure: bool) -> None:
    r = rec(n_rej=n_rej, split="train")
    r.stats = stats
    (row_id,) = buf.add([r])
    assert r.is_failure is failure
    assert buf.get(row_id).is_failure is failure  # type: ignore[union-attr]
    assert buf.pending_failure_count() == int(failure)


@pytest.mark.parametrize(
    ("stats", "n_rej", "failure"),
    [
        # the draft model's own rounds decide, not tokens copied by lookup or the suffix index
        ({"drafted_by_source": {"model": 10, "lookup": 20},
          "accepted_by_source": {"model": 2, "lookup": 20}}, 1, True),
        ({"drafted_by_source": {"model": 10, "suffix": 20},
          "accepted_by_source": {"model": 9, "suffix": 0}}, 1, False),
        # the model did not draft: only the policy's measured estimate is evidence
        ({"drafted_by_source": {"lookup": 8}, "accepted_by_source": {"lookup": 1}}, 0, False),
        ({"drafted_by_source": {"lookup": 8}, "accepted_by_source": {"lookup": 8},
          "draft_acceptance_estimate": 0.2}, 0, True),
        ({"drafted_by_source": {}, "accepted_by_source": {},
          "draft_acceptance_estimate": 0.9}, 0, False),
        ({"drafted_by_source": {}, "accepted_by_source": {},
          "draft_acceptance_estimate": None}, 0, False),
    ],
)  # fmt: skip
def test_failure_cases_are_judged_on_the_draft_model(
    buf: ReplayBuffer, stats: dict, n_rej: int, failure: bool
) -> None:
    r = rec(n_rej=n_rej, split="train")
    r.stats = {"drafted": 30, "accepted": 21, **stats}
    buf.add([r])
    assert r.is_failure is failure


def test_holdout_assignment_is_stable(tmp_path: Path) -> None:
    settings = BufferSettings(holdout_fraction=0.3)
    prompts = [f"prompt number {i}" for i in range(200)]
    splits = []
    for name in ("a", "b"):
        with ReplayBuffer(tmp_path / name / "buffer.sqlite", settings) as b:
            records = [rec(p) for p in prompts]
            b.add(records)
            splits.append([r.split for r in b.iter_records()])
    assert splits[0] == splits[1]
    assert {"train", "holdout"} == set(splits[0])

    # another interpreter, another hash seed: same answer (sha256, not hash())
    code = (
        "import json, sys; from daemon.store.buffer import assign_split; "
        "print(json.dumps([assign_split(f'prompt number {i}', 0.3) for i in range(200)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        check=True,
    )
    assert json.loads(out.stdout) == splits[0]

    fraction = sum(assign_split(f"p{i}", 0.1) == "holdout" for i in range(1000)) / 1000
    assert 0.07 <= fraction <= 0.13
    assert all(assign_split(f"p{i}", 0.0) == "train" for i in range(200))


# --- eviction ---------------------------------------------------------------------------------


def test_eviction_drops_oldest_train_first(db: Path) -> None:
    with ReplayBuffer(db, BufferSettings(max_records=5)) as b:
        holdout = [rec(f"h{i}", created=100 + i, split="holdout") for i in range(3)]
        train = [rec(f"t{i}", created=200 + i, split="train") for i in range(4)]
        b.add(holdout[:1] + train[2:] + holdout[1:] + train[:2])  # insertion order != age
        left = list(b.iter_records())
        assert [r.prompt_text for r in left] == ["h0", "h1", "h2", "t2", "t3"]
        b.add([rec("t4", created=300, split="train")])
        assert [r.prompt_text for r in b.iter_records()] == ["h0", "h1", "h2", "t3", "t4"]
        assert b.count() == 5


def test_eviction_all_holdout_drops_oldest_holdout(db: Path) -> None:
    with BufferWriter(db, BufferSettings(max_records=3)) as w:
        futs = [w.submit(rec(f"h{i}", created=100 + i, split="holdout")) for i in range(5)]
        assert w.flush(HANG_GUARD_S)
    assert all(f.result() for f in futs)
    with ReplayBuffer(db, BufferSettings(max_records=3)) as b:
        assert [r.prompt_text for r in b.iter_records()] == ["h2", "h3", "h4"]
        # ids are never reused after eviction
        b.add([rec("new", split="holdout")])
        assert max(b.ids()) == max(f.result() for f in futs) + 1


# --- curation ---------------------------------------------------------------------------------


def test_pending_failures_mark_used_and_replay(buf: ReplayBuffer) -> None:
    buf.add([rec("train fail 1", split="train", created=1)])
    buf.add([rec("holdout fail", split="holdout", created=2)])
    buf.add([rec("train fail 2", split="train", created=3)])
    buf.add([rec("train ok", rate=0.9, split="train", created=4)])
    buf.add([rec("holdout ok", rate=0.9, split="holdout", created=5)])

    pending = buf.pending_failures()
    assert [r.prompt_text for r in pending] == ["train fail 1", "train fail 2"]
    assert buf.pending_failure_count() == 2
    assert [r.prompt_text for r in buf.pending_failures(limit=1)] == ["train fail 1"]

    holdout_ids = [r.id for r in buf.holdout()]
    assert [r.prompt_text for r in buf.holdout()] == ["holdout fail", "holdout ok"]
    # holdout rows are never marked (nor returned) for training
    assert buf.mark_used([pending[0].id, *holdout_ids], "run-1") == 1  # type: ignore[list-item]
    assert [r.prompt_text for r in buf.pending_failures()] == ["train fail 2"]
    assert buf.get(pending[0].id).used_for_training == "run-1"  # type: ignore[arg-type,union-attr]
    assert all(buf.get(i).used_for_training is None for i in holdout_ids)  # type: ignore[arg-type,union-attr]

    replay = buf.sample_replay(10, exclude_ids=[pending[1].id], seed=0)  # type: ignore[list-item]
    assert sorted(r.prompt_text for r in replay) == ["train fail 1", "train ok"]
    assert [r.id for r in buf.sample_replay(1, seed=3)] == [
        r.id for r in buf.sample_replay(1, seed=3)
    ]
    assert buf.sample_replay(0) == []
    assert [r.prompt_text for r in buf.sample_replay(10, seed=1, before=3)] == ["train fail 1"]

    st = buf.stats()
    assert st.records == 5 and st.train == 3 and st.holdout == 2
    assert st.failures == 3 and st.train_failures == 2 and st.holdout_failures == 1
    assert st.pending_failures == 1 and st.used_for_training == 1
    assert st.size_bytes > 0 and st.schema_version == SCHEMA_VERSION


def test_stats_trend(buf: ReplayBuffer) -> None:
    records = []
    for i in range(20):
        r = rec(f"p{i}", rate=i / 20, created=1000 + i, adapter_version=i // 10)
        r.stats = {"drafted": 20, "accepted": i, "acceptance_rate": i / 20}
        records.append(r)
    buf.add(records[::-1])
    st = buf.stats(trend_window=10, trend_buckets=2)
    trend = st.acceptance_trend
    assert [b.records for b in trend] == [5, 5]
    assert trend[0].start == 1010 and trend[1].end == 1019
    assert trend[0].mean_acceptance == pytest.approx(sum(range(10, 15)) / 5 / 20)
    assert trend[1].token_acceptance == pytest.approx(sum(range(15, 20)) / 100)
    by = {a.adapter_version: a for a in st.acceptance_by_adapter}
    nothing_drafted = rec("short", rate=0.0, n_rej=0, created=2000)
    nothing_drafted.stats = {"drafted": 0, "accepted": 0, "acceptance_rate": 0.0}
    buf.add([nothing_drafted])  # no evidence: must not drag the means down
    assert buf.stats(trend_window=1).acceptance_trend[0].mean_acceptance is None
    assert set(by) == {0, 1} and by[0].records == 10
    assert by[1].mean_acceptance == pytest.approx(sum(range(10, 20)) / 10 / 20)
    with ReplayBuffer(buf.path.parent / "empty.sqlite") as empty:
        assert empty.stats().acceptance_trend == []


def test_purge_and_iter(buf: ReplayBuffer) -> None:
    buf.add([rec(f"p{i}", created=100 + i) for i in range(10)])
    assert [r.prompt_text for r in buf.iter_records(before=103, batch_size=2)] == [
        "p0",
        "p1",
        "p2",
    ]
    assert len(list(buf.iter_records(batch_size=3))) == 10
    n_train = buf.count("train")
    assert len(list(buf.iter_records(split="train"))) == n_train
    assert buf.purge(before=105) == 5
    assert [r.prompt_text for r in buf.iter_records()] == [f"p{i}" for i in range(5, 10)]
    assert buf.purge() == 5
    assert buf.count() == 0


def test_export_jsonl(buf: ReplayBuffer, tmp_path: Path) -> None:
    r = rec("the prompt", n_rej=0, split="train")
    r.output_tokens = [10, 11, 12, 13]
    r.output_text = "ABCD"
    r.rejections = [rej(1, draft=91, target=11), rej(3, draft=93, target=13)]
    buf.add([r, rec("other", n_rej=0)])

    def decode(ids: list[int]) -> str:
        return "".join(chr(ord("A") + i - 10) if i < 90 else f"<{i}>" for i in ids)

    out = tmp_path / "export.jsonl"
    assert buf.export_jsonl(out, decode) == 2
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    first = lines[0]
    assert set(first) >= {"prompt", "draft_output", "target_output", "disagreements"}
    assert first["prompt"] == "the prompt"
    assert first["target_output"] == "ABCD"
    assert first["draft_output"] == "A<91>C<93>"
    assert first["disagreements"] == [
        {
            "position": 1,
            "draft_token": 91,
            "target_token": 11,
            "draft_prob": f32([0.123456789])[0],
            "draft_text": "<91>",
            "target_text": "B",
        },
        {
            "position": 3,
            "draft_token": 93,
            "target_token": 13,
            "draft_prob": f32([0.123456789])[0],
            "draft_text": "<93>",
            "target_text": "D",
        },
    ]
    assert lines[1]["disagreements"] == [] and lines[1]["draft_output"] == decode(
        [10, 11, 12, 13, 14, 15]
    )
    assert buf.export_jsonl(out) == 2  # without a decoder: tokens only
    assert json.loads(out.read_text().splitlines()[0])["draft_output"] is None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- writer -----------------------------------------------------------------------------------


def test_writer_callbacks_errors_and_close(db: Path) -> None:
    seen: list[list[int]] = []

    def on_commit(records: list[BufferRecord]) -> None:
        seen.append([r.id for r in records])  # type: ignore[misc]
        raise RuntimeError("callback bugs must not stop the writer")

    w = BufferWriter(db, BufferSettings(), on_commit=on_commit)
    with pytest.raises(RuntimeError, match="not started"):
        w.submit(rec())
    w.start()
    bad = rec()
    bad.rejections[0].top_logprobs = [0.0]  # length mismatch with top_ids
    f_bad = w.submit(bad)
    f_good = w.submit(rec("good"))
    with pytest.raises(ValueError, match="log-probs"):
        f_bad.result(timeout=HANG_GUARD_S)
    assert f_good.result(timeout=HANG_GUARD_S) > 0
    assert w.flush(HANG_GUARD_S)
    assert w.submit(rec("after callback error")).result(timeout=HANG_GUARD_S) > f_good.result()
    assert w.close(HANG_GUARD_S) and w.close(HANG_GUARD_S)
    with pytest.raises(RuntimeError, match="closed"):
        w.submit(rec())
    assert [i for batch in seen for i in batch] == [f_good.result(), f_good.result() + 1]
    assert bad.id is None and w.committed == 2


def test_a_full_disk_loses_nothing_while_memory_lasts(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits fail as on a full disk (SQLite's SQLITE_FULL): the records wait in memory, at
    most retry_limit of them (older ones counted as dropped), and are written once space
    returns; nothing stored before is touched."""
    real_insert = writer.insert_rows
    full = threading.Event()
    full.set()

    def insert(*args: Any, **kw: Any) -> Any:
        if full.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        return real_insert(*args, **kw)

    committed: list[str] = []
    w = BufferWriter(
        db,
        BufferSettings(),
        on_commit=lambda rs: committed.extend(r.prompt_text for r in rs),
        retry_limit=5,
        retry_s=0.05,
    ).start()
    assert w.submit(rec("before")).result(timeout=HANG_GUARD_S) > 0
    monkeypatch.setattr(writer, "insert_rows", insert)
    futures = [w.submit(rec(f"during {i}")) for i in range(7)]
    for f in futures:
        with pytest.raises(BufferError, match="disk is full"):
            f.result(timeout=HANG_GUARD_S)  # the submitter hears at once
    wait_until(lambda: w.retry_backlog == 5 and w.dropped == 2, "5 kept, 2 dropped")
    full.clear()  # space returns
    wait_until(lambda: w.retry_backlog == 0, "the kept records written")
    assert w.close(HANG_GUARD_S)
    assert committed == ["before"] + [f"during {i}" for i in range(2, 7)]
    with ReplayBuffer(db, BufferSettings()) as b:
        assert b.count() == 6
    assert w.dropped == 2 and w.commit_failures >= 1


def test_a_real_full_disk_loses_nothing_and_recording_resumes(db: Path) -> None:
    """Not a mock: SQLite's own SQLITE_FULL, from ``max_page_count`` capped at the file's
    size on the writer's connection (the WAL's pages count against it). Commits fail, the
    records wait in memory, nothing committed before is lost, and once the cap is lifted
    (space returns) the waiting records are written and recording goes on."""
    w = BufferWriter(db, BufferSettings(), retry_limit=50, retry_s=0.05).start()
    before = [w.submit(rec(f"before {i}")).result(timeout=HANG_GUARD_S) for i in range(3)]
    conn = w._conn
    assert conn is not None
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    assert conn.execute(f"PRAGMA max_page_count = {pages}").fetchone()[0] == pages
    big = "x" * 20_000  # a few pages each: the file would have to grow
    futures = [w.submit(rec(f"during {i} {big}")) for i in range(4)]
    for f in futures:
        with pytest.raises(BufferError, match="full"):
            f.result(timeout=HANG_GUARD_S)
    wait_until(lambda: w.retry_backlog == 4, "the 4 records waiting in memory")
    with ReplayBuffer(db, BufferSettings()) as b:  # what was committed is intact meanwhile
        assert sorted(r.id for r in b.iter_records()) == sorted(before)
    conn.execute("PRAGMA max_page_count = 1073741823")  # space returns
    wait_until(lambda: w.retry_backlog == 0, "the waiting records written")
    assert w.submit(rec("after")).result(timeout=HANG_GUARD_S) > 0
    assert w.close(HANG_GUARD_S)
    with ReplayBuffer(db, BufferSettings()) as b:
        texts = [r.prompt_text.split(" x")[0] for r in b.iter_records()]
    assert texts == [f"before {i}" for i in range(3)] + [f"during {i}" for i in range(4)] + [
        "after"
    ]
    assert w.dropped == 0 and w.commit_failures >= 1


def test_records_still_failing_at_close_are_counted(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def insert(*args: Any, **kw: Any) -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    w = BufferWriter(db, BufferSettings(), retry_s=60).start()
    monkeypatch.setattr(writer, "insert_rows", insert)
    with pytest.raises(BufferError):
        w.submit(rec("lost")).result(timeout=HANG_GUARD_S)
    assert w.close(HANG_GUARD_S)
    assert w.dropped == 1 and w.retry_backlog == 0


def test_concurrent_writers_and_reader(db: Path) -> None:
    settings = BufferSettings(max_records=10_000)
    committed: list[int] = []
    lock = threading.Lock()

    def on_commit(records: list[BufferRecord]) -> None:
        with lock:
            committed.extend(r.id for r in records)  # type: ignore[misc]

    errors: list[BaseException] = []
    stop = threading.Event()
    reads = 0

    def reader() -> None:
        nonlocal reads
        try:
            with ReplayBuffer(db, settings) as b:
                while not stop.is_set():
                    st = b.stats()
                    assert st.records == st.train + st.holdout
                    assert all(r.split == "train" for r in b.pending_failures())
                    b.count()
                    reads += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with BufferWriter(db, settings, on_commit=on_commit, max_batch=16) as w:
        futures: list = []

        def submitter(t: int) -> None:
            try:
                for i in range(60):
                    futures.append(w.submit(rec(f"thread {t} prompt {i}", rate=(i % 10) / 10)))
                    if i % 7 == 0:
                        time.sleep(0.001)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        rt = threading.Thread(target=reader)
        rt.start()
        threads = [threading.Thread(target=submitter, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert w.flush(HANG_GUARD_S)
        stop.set()
        rt.join(HANG_GUARD_S)
    assert not errors, errors
    assert reads > 0
    ids = [f.result(timeout=0) for f in futures]
    assert len(set(ids)) == 240
    assert sorted(committed) == sorted(ids)
    with ReplayBuffer(db, settings) as b:
        assert b.ids() == set(ids)
        assert b.pending_failure_count() == sum(
            1 for r in b.iter_records() if r.is_failure and r.split == "train"
        )


# --- files ------------------------------------------------------------------------------------


def test_file_modes_and_schema(db: Path) -> None:
    old = os.umask(0o022)
    try:
        reader = ReplayBuffer(db, BufferSettings()).open()
        with BufferWriter(db, BufferSettings()) as w:
            w.submit(rec()).result(timeout=HANG_GUARD_S)
            for suffix in ("", "-wal", "-shm"):
                p = Path(f"{db}{suffix}")
                assert p.exists(), p
                assert p.stat().st_mode & 0o777 == 0o600, p
        reader.close()
    finally:
        os.umask(old)
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    with ReplayBuffer(db.parent) as b:  # the data directory works as a path
        assert b.count() == 1


def test_forward_migration(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with ReplayBuffer(db) as b:
        b.add([rec()])

    def v_next(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE records ADD COLUMN note TEXT DEFAULT 'migrated'")

    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, v_next])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with ReplayBuffer(db) as b:
        assert b.count() == 1
        assert b._query("SELECT note FROM records")[0][0] == "migrated"
        assert b._query("PRAGMA user_version")[0][0] == SCHEMA_VERSION + 1


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def _make_bad(kind: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "garbage":
        path.write_bytes(os.urandom(8192))
    elif kind == "text":
        path.write_text("this is not a database\n" * 50)
    elif kind == "short":
        path.write_bytes(b"SQLite format 3\x00abc")
    elif kind == "corrupt":
        path.write_bytes(b"SQLite format 3\x00" + os.urandom(3 * 4096))
    elif kind == "foreign":
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE contacts (name TEXT)")
        conn.commit()
        conn.close()
    elif kind == "newer":
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE records (id INTEGER PRIMARY KEY)")
        conn.execute("PRAGMA user_version = 99")
        conn.commit()
        conn.close()


@pytest.mark.parametrize("kind", ["garbage", "text", "short", "corrupt", "foreign", "newer"])
def test_bad_database_file_is_refused_and_left_alone(db: Path, kind: str) -> None:
    _make_bad(kind, db)
    before = _snapshot(db.parent)
    for opener in (
        lambda: ReplayBuffer(db, BufferSettings()).open(),
        lambda: BufferWriter(db, BufferSettings()).start(),
        lambda: ReplayBuffer(db.parent, BufferSettings()).open(),
    ):
        with pytest.raises(BufferError) as info:
            opener()
        assert str(db) in str(info.value)
        if kind == "newer":
            assert "99" in str(info.value)
        assert _snapshot(db.parent) == before  # same bytes, no new -wal/-shm/journal files


def test_missing_file_without_create(db: Path) -> None:
    with pytest.raises(BufferError, match="does not exist"):
        ReplayBuffer(db, create=False).open()
    assert not db.exists()


# --- durability -------------------------------------------------------------------------------


def test_writer_commits_with_synchronous_full(db: Path) -> None:
    """What the README promises for power loss rests on this pragma; SIGKILL alone would not
    catch ``synchronous=OFF`` (the page cache survives a killed process)."""
    with BufferWriter(db, BufferSettings()) as w:
        assert w.pragma("synchronous") == 2  # FULL: the WAL is fsynced at every commit
        assert w.pragma("journal_mode") == "wal"
    with BufferWriter(db, BufferSettings(), synchronous="NORMAL") as w:
        assert w.pragma("synchronous") == 1  # the opt-out is really applied, too


def test_sigkill_loses_nothing_committed(db: Path) -> None:
    db.parent.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(db)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    reported: list[int] = []
    pending = b""
    try:
        with ReplayBuffer(db, BufferSettings()) as reader:  # another process, reading meanwhile
            while len(reported) < 300:
                ready, _, _ = select.select([proc.stdout], [], [], 1.0)
                if not ready:
                    assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
                assert chunk, proc.stderr.read().decode()  # type: ignore[union-attr]
                pending += chunk
                *lines, pending = pending.split(b"\n")
                reported += [int(x) for x in lines]
                if len(reported) >= 100 and len(reported) - len(lines) < 100:
                    # committed means visible to a reader in another process at once
                    assert set(reported) <= reader.ids()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(HANG_GUARD_S)
    assert proc.returncode == -signal.SIGKILL
    rest = proc.stdout.read()  # type: ignore[union-attr]
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]
    *lines, _ = (pending + rest).split(b"\n")
    reported += [int(x) for x in lines]  # everything the child reported before it died

    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        present = {i for (i,) in conn.execute("SELECT id FROM records")}
    finally:
        conn.close()
    assert len(reported) >= 300
    assert set(reported) <= present
    with ReplayBuffer(db, BufferSettings()) as b:  # and the buffer opens normally afterwards
        assert b.count() == len(present)
        assert all(r.is_failure for r in b.pending_failures(limit=5))


def test_damaged_pages_are_refused_at_writer_start(db: Path) -> None:
    with ReplayBuffer(db) as b:
        b.add([rec(f"prompt {i}", n_rej=40) for i in range(60)])
    assert not Path(f"{db}-wal").exists()  # checkpointed on close
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    data[2 * page : len(data) - page] = os.urandom(len(data) - 3 * page)
    db.write_bytes(bytes(data))
    with pytest.raises(BufferError, match="corrupt|malformed") as info:
        BufferWriter(db, BufferSettings()).start()
    assert str(db) in str(info.value)
    assert db.read_bytes() == bytes(data)
    # a reader opened without verification still reports damage as BufferError, not sqlite3's
    with pytest.raises(BufferError, match=str(db)):
        with ReplayBuffer(db) as b:
            list(b.iter_records())
            b.stats()
    assert db.read_bytes() == bytes(data)
