"""The adaptation loop's branches, each run: the gate's reject, the waits (holdout traffic,
``policy: idle``, ``cooldown_seconds``), ``max_run_seconds`` (SIGTERM, then SIGKILL, serving
unharmed) and the live refusal of a corrupt or mismatched adapter with the old one kept.

The loop drives a real `Service` on a tiny model. Where a test needs a training process that
behaves in a particular way, ``spawn_run`` is replaced by one that starts that process.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.adaptation import loop as loop_mod
from daemon.adaptation.gate import gate
from daemon.adaptation.loop import AdaptationLoop
from daemon.config import Settings, load_settings, read_settings_snapshot
from daemon.core.models import load_pair
from daemon.errors import AdapterError
from daemon.serving.service import Service
from daemon.store.adapters import ADAPTER_WEIGHTS
from daemon.store.buffer import BufferRecord
from daemon.store.runs import (
    RESULT_FILE,
    SETTINGS_FILE,
    ExampleCounts,
    HeldoutEval,
    RunMetrics,
    TrainingResult,
    write_result,
)
from tests.helpers import HANG_GUARD_S, make_adapter, make_tiny_llama, write_model_dir

WORDS = ["the", "a", "big", "small", "red", "dog", "cat", "runs", "sleeps", "on", "mat"]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Service, Path]]:
    model = write_model_dir(tmp_path / "tiny", WORDS, vocab_size=40, seed=7)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        json.dumps(
            {
                "models": {"target": str(model), "draft_layers": [0]},
                "sampling": {"max_tokens": 16},
                "buffer": {"holdout_fraction": 0.25, "failure_threshold": 0.9},
                "training": {
                    "min_failure_cases": 4,
                    "min_holdout_rows": 1,
                    "cooldown_seconds": 0,
                    "epochs": 1,
                    "batch_size": 4,
                    "warmup_steps": 0,
                    "nice": 0,
                    "lora": {"rank": 4, "dropout": 0.0},
                },
            }
        )
    )
    settings, _ = load_settings(cfg, {"paths.data_dir": str(tmp_path / "data")})
    service = Service(settings, load_pair(settings))
    service.start()
    try:
        yield service, cfg
    finally:
        service.stop(HANG_GUARD_S)


def fill(service: Service, failures: int, holdout: int) -> None:
    """Serve prompts until enough failure cases and holdout rows are recorded."""
    import random

    rng = random.Random(3)
    assert service.buffer is not None
    buf = service.buffer.for_target(service.target_id)  # the served model's own rows
    for _ in range(400):
        if buf.pending_failure_count() >= failures and buf.count("holdout") >= holdout:
            return
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        service.generate([{"role": "user", "content": text}], temperature=0.0)
        service.flush(HANG_GUARD_S)
    raise AssertionError("the tiny model did not produce enough failure cases")


def spawn(argv: list[str], started: list[subprocess.Popen[Any]], before=None, targets=None):
    """A ``spawn_run`` that starts ``python argv`` instead of a training process (and notes
    the target whose rows the run would read in ``targets``)."""

    def fake_spawn_run(settings, run_dir, current, epochs, max_steps, **kw):
        if before is not None:
            before(run_dir)
        if targets is not None:
            targets.append(kw.get("target"))
        kw = {k: v for k, v in kw.items() if k not in ("nice", "progress", "draft_only", "target")}
        proc = subprocess.Popen([sys.executable, *argv], **kw)
        started.append(proc)
        return proc

    return fake_spawn_run


def metrics(before: float, after: float, adapter_path: str) -> RunMetrics:
    def held(rate: float) -> HeldoutEval:
        return HeldoutEval(
            agreement=rate, matches=int(rate * 100), positions=100, rows=5, seconds=0
        )

    return RunMetrics(
        run_id="synthetic",
        heldout_before=held(before),
        heldout_after=held(after),
        examples=ExampleCounts(4, 0, 0, 64, 10, 5),
        epochs=1,
        steps=1,
        planned_steps=1,
        micro_batches=1,
        skipped_micro_batches=0,
        skipped_nonfinite=0,
        skipped_empty_batches=0,
        empty_windows=0,
        loss_first=3.0,
        loss_last=2.0,
        grad_norm_mean=1.0,
        tokens=64,
        target_tokens=64,
        tokens_per_s=100.0,
        train_seconds=1.0,
        trainable_parameters=10,
        peak_memory_bytes=0,
        marked_used=4,
        wall_s=1.0,
        adapter_path=adapter_path,
    )


# --------------------------------------------------------------------------------------------
# The gate on synthetic results


def test_gate_installs_rejects_and_errors() -> None:
    s = Settings()
    s.training.min_improvement = 0.125  # binary fractions: the boundary is exact
    ok = TrainingResult.success(metrics(0.25, 0.5, "/x"))
    assert gate(ok, s).decision == "install"
    assert gate(ok, s).improvement == 0.25
    small = TrainingResult.success(metrics(0.25, 0.3125, "/x"))
    decision = gate(small, s)
    assert decision.decision == "reject" and "need +0.1250" in decision.reason
    worse = TrainingResult.success(metrics(0.25, 0.125, "/x"))
    assert gate(worse, s).decision == "reject"
    exact = TrainingResult.success(metrics(0.25, 0.375, "/x"))  # the boundary installs
    assert gate(exact, s).decision == "install"
    empty = metrics(0.3, 0.9, "/x")
    empty.heldout_after.positions = 0
    no_holdout = gate(TrainingResult.success(empty), s)
    assert no_holdout.decision == "reject" and "no held-out positions" in no_holdout.reason
    failed = gate(TrainingResult.failure("boom"), s)
    assert failed.decision == "error" and failed.reason == "boom"


def test_speed_gate_decides_by_expected_tokens_per_second() -> None:
    import random

    from daemon.core.speed import StepCosts

    s = Settings()
    assert s.training.gate == "speed"
    costs = StepCosts(target=1.0, verify=[1.1 + 0.1 * k for k in range(1, 9)], draft=0.2)
    rng = random.Random(0)

    def rows(rate: float) -> list[str]:
        return ["".join("1" if rng.random() < rate else "0" for _ in range(60)) for _ in range(20)]

    def run(before: list[str], after: list[str]) -> TrainingResult:
        m = metrics(0.3, 0.4, "/x")
        m.heldout_before.by_row, m.heldout_after.by_row = before, after
        m.costs = costs.to_dict()  # what the run timed
        return TrainingResult.success(m)

    base = rows(0.3)
    up = gate(run(base, rows(0.7)), s)
    assert up.decision == "install" and up.speed is not None
    assert up.speed["after"]["speedup"] > up.speed["before"]["speedup"]
    assert up.speed["lower_bound"] > 0 and "lower bound" in up.reason
    assert "step costs: measured" in up.reason
    # agreement went up (0.3 -> 0.4 in the figures) but the rows say no faster: rejected
    flat = gate(run(base, base), s)
    assert flat.decision == "reject" and flat.speed is not None
    # clearly faster, but on fewer rows than the bootstrap needs: never installed
    few = gate(run(base[:5], rows(0.7)[:5]), s)
    assert few.speed is not None and few.speed["lower_bound"] > 0
    assert few.decision == "reject" and "5 rows < training.min_holdout_rows=20" in few.reason
    # the run's own timings win over the live engine's (each row count timed at another
    # moment), which price only a run that timed nothing (a target split across ranks)
    dear = StepCosts(1.0, [1.0 + 0.5 * k for k in range(1, 9)], 1.0, source="service")
    same = gate(run(base, rows(0.7)), s, dear)
    assert same.decision == "install" and "step costs: measured" in same.reason
    assert same.speed is not None and same.speed["costs"] == costs.to_dict()
    untimed = run(base, rows(0.45))
    assert untimed.metrics is not None
    untimed.metrics.costs = None
    slow = gate(untimed, s, dear)  # a draft that costs as much as the target never pays
    assert slow.decision == "reject" and "step costs: service" in slow.reason
    assert slow.speed is not None and slow.speed["costs"]["source"] == "service"
    s.training.gate = "agreement"
    assert gate(run(base, base), s).speed is None


def test_the_gate_rarely_installs_a_candidate_that_is_no_better() -> None:
    """Simulated candidates (`daemon.bench.gate`): on training.min_holdout_rows rows (20) the
    gate installs one exactly as good about 1 - confidence of the time and a slightly worse
    one (agreement -0.03) almost never; on 3 rows it would install the worse one often,
    which is why it needs that many."""
    from daemon.bench.gate import install_rate

    floor = Settings().training.min_holdout_rows
    assert floor == 20
    worse = install_rate(floor, -0.03, trials=150, confidence=0.9, seed=1)
    equal = install_rate(floor, 0.0, trials=150, confidence=0.9, seed=2)
    assert worse.rate <= 0.02 and equal.rate <= 0.15, (worse, equal)
    few = install_rate(3, -0.03, trials=150, confidence=0.9, seed=3)
    assert few.rate >= 0.04, few  # the bootstrap alone, on 3 rows


# --------------------------------------------------------------------------------------------
# Waiting: holdout traffic, idle policy, cooldown


def test_check_waits_for_holdout_idle_and_cooldown(served, monkeypatch) -> None:
    service, cfg = served
    started: list[subprocess.Popen[Any]] = []
    targets: list[str | None] = []
    monkeypatch.setattr(
        loop_mod, "spawn_run", spawn(["-c", "raise SystemExit(3)"], started, targets=targets)
    )
    loop = AdaptationLoop(service)  # not started: checks run when this test says
    t = service.settings.training
    # another served model's failures and holdout rows are not this draft's to train on
    t.min_failure_cases, t.min_holdout_rows = 1, 1
    assert service.buffer is not None
    service.buffer.add(
        [
            BufferRecord(f"other {i}", [1, 2], "x", [3], {}, [], "other-model", "d", split=split)
            for i, split in enumerate(["holdout", "train"])
        ]
    )
    service.buffer._write("UPDATE records SET is_failure = 1")
    assert loop.check() is None and not started and loop.waiting_for is None  # no failures
    fill(service, failures=4, holdout=1)

    t.min_holdout_rows = 10_000
    assert loop.check() is None and not started
    assert loop.waiting_for is not None and loop.waiting_for.startswith("holdout traffic")

    t.min_holdout_rows, t.policy, t.idle_seconds = 1, "idle", 3600.0
    assert loop.check() is None and not started
    assert loop.waiting_for == "the server to be idle for 3600s"

    t.idle_seconds = 0.0  # idle long enough: the run starts (and its process fails)
    assert loop.check() is not None and len(started) == 1
    assert targets == [service.target_id]  # the run reads the served model's rows only
    assert loop.wait_idle(HANG_GUARD_S)
    summary = loop.summary()
    assert summary.counts.failed == 1 and summary.last_run is not None
    assert summary.last_run.gate.decision == "error"
    assert "exited with code 3" in summary.last_run.gate.reason

    t.cooldown_seconds = 3600.0  # just finished: the next run waits
    assert loop.check() is None and len(started) == 1
    assert loop.waiting_for is not None and loop.waiting_for.startswith("cooldown")
    t.cooldown_seconds = 0.0
    assert loop.check() is not None and len(started) == 2
    assert loop.wait_idle(HANG_GUARD_S)
    assert service.adapter_version == 0  # nothing was installed by failed runs


# --------------------------------------------------------------------------------------------
# max_run_seconds


@pytest.mark.parametrize(
    ("code", "signal_seen"),
    [
        ("import time; time.sleep(600)", signal.SIGTERM),
        # ignores SIGTERM: the loop must escalate to SIGKILL
        ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)",
         signal.SIGKILL),
    ],
)  # fmt: skip
def test_max_run_seconds_stops_the_run_and_serving_goes_on(
    served, monkeypatch, code: str, signal_seen: int
) -> None:
    service, cfg = served
    fill(service, failures=1, holdout=0)
    started: list[subprocess.Popen[Any]] = []
    monkeypatch.setattr(loop_mod, "spawn_run", spawn(["-c", code], started))
    monkeypatch.setattr(loop_mod, "TERMINATE_GRACE_S", 1.0)
    service.settings.training.max_run_seconds = 1.0
    loop = AdaptationLoop(service)
    loop.train_now()
    assert loop.wait_idle(HANG_GUARD_S)
    (proc,) = started
    assert proc.returncode == -signal_seen
    last = loop.summary().last_run
    assert last is not None and last.gate.decision == "error"
    assert "training.max_run_seconds=1s" in last.gate.reason
    # serving is unharmed: requests are answered, the draft is unchanged
    r = service.generate([{"role": "user", "content": "the dog"}], temperature=0.0)
    assert r.tokens and service.adapter_version == 0


# --------------------------------------------------------------------------------------------
# The reject branch with a real training run


def test_a_run_below_min_improvement_is_rejected_and_kept(served) -> None:
    service, cfg = served
    fill(service, failures=4, holdout=1)
    service.settings.training.gate = "agreement"
    service.settings.training.min_improvement = 1.0  # no candidate can gain a whole 1.0
    loop = AdaptationLoop(service)
    run_id = loop.train_now()
    assert loop.wait_idle(HANG_GUARD_S)
    s = loop.summary()
    assert s.counts.runs == 1 and s.counts.rejected == 1 and s.counts.installed == 0, s
    assert s.last_run is not None and s.last_run.run_id == run_id
    assert s.last_run.gate.decision == "reject" and "need +1.0000" in s.last_run.gate.reason
    (kept,) = loop.store.versions()  # the candidate is stored, marked rejected
    assert kept.status == "rejected" and s.last_run.adapter_version == kept.version
    assert loop.store.current_version() == 0 and service.adapter_version == 0


def test_a_real_run_is_gated_by_expected_speed(served) -> None:
    service, cfg = served
    fill(service, failures=4, holdout=2)
    assert service.settings.training.gate == "speed"
    # The config file now names another model (a live edit of a key that waits for a
    # restart): the run must train the served one, from the settings the daemon runs with.
    edited = json.loads(cfg.read_text())
    edited["models"]["target"] = str(cfg.parent / "no-such-model")
    cfg.write_text(json.dumps(edited))
    loop = AdaptationLoop(service)
    run_id = loop.train_now()
    assert loop.wait_idle(HANG_GUARD_S)
    given = read_settings_snapshot(loop.data_dir / "training" / run_id / SETTINGS_FILE)
    assert given == service.settings
    s = loop.summary()
    assert s.last_run is not None
    gate = s.last_run.gate
    assert gate.decision in ("install", "reject") and gate.speed is not None, gate
    assert gate.speed["rows"] >= 2 and "expected speedup" in gate.reason
    # the decision travels with the candidate: manifest and the adapters listing
    (kept,) = loop.store.versions()
    assert kept.manifest["gate"]["speed"] == gate.speed
    assert "by_row" not in kept.manifest["metrics_after"]  # the rows stay in the result file
    listed = loop.list_adapters().versions[0]
    assert listed.expected_speedup == gate.speed["after"]["speedup"]


# --------------------------------------------------------------------------------------------
# Swaps under concurrent traffic


def test_each_request_reports_and_records_the_version_it_started_under(served, tmp_path) -> None:
    """Four clients while the draft swaps twice: every response's adapter version (what
    ``usage.speculative.adapter_version`` shows) equals its buffer record's."""
    from daemon.core.prompts import prompt_text
    from daemon.serving.requests import BlockingHandle, GenerationRequest

    service, cfg = served
    loop = AdaptationLoop(service)
    assert service.pair is not None
    versions = [
        loop.store.add(make_adapter(tmp_path / f"a{i}", service.pair.target, [0], i), {}, False)
        for i in (1, 2)
    ]
    served_by: dict[str, int] = {}
    first = threading.Event()

    def client(c: int) -> None:
        for i in range(4):
            messages = [{"role": "user", "content": f"{WORDS[c]} {WORDS[i + 4]} the dog {c}{i}"}]
            req = GenerationRequest(
                prompt_tokens=service.encode_messages(messages),
                params=service.sampling_params(temperature=0.0, max_tokens=12),
                prompt_text=prompt_text(messages),
            )
            handle = BlockingHandle(req)
            service.submit(handle)
            handle.result(HANG_GUARD_S)
            served_by[req.prompt_text] = req.adapter_version
            first.set()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for v in versions:  # swaps while the clients' requests run
        assert first.wait(HANG_GUARD_S)
        service.swap_adapter(v).result(HANG_GUARD_S)
        first.clear()
    for t in threads:
        t.join(HANG_GUARD_S)
    service.flush(HANG_GUARD_S)
    assert len(served_by) == 16 and set(served_by.values()) >= {0, versions[-1].version}
    assert service.buffer is not None
    recorded = {r.prompt_text: r.adapter_version for r in service.buffer.iter_records()}
    assert {p: recorded[p] for p in served_by} == served_by


def test_current_names_a_version_only_once_it_serves(served, tmp_path, monkeypatch) -> None:
    """An installed candidate's swap comes first and the ``current`` pointer after it; a swap
    that is refused leaves the pointer on the version still serving."""
    service, cfg = served
    service.settings.training.min_improvement = 0.1
    loop = AdaptationLoop(service)
    assert service.pair is not None
    seen: list[int] = []
    real = service.swap_adapter

    def swap(version):
        seen.append(loop.store.current_version())  # where the pointer is as the swap begins
        return real(version)

    monkeypatch.setattr(service, "swap_adapter", swap)
    good = make_adapter(tmp_path / "good", service.pair.target, [0], seed=1)
    loop._finish("r1", TrainingResult.success(metrics(0.25, 0.5, str(good))), "manual")
    assert seen == [0] and loop.store.current_version() == service.adapter_version == 1

    other = make_tiny_llama(40, hidden_size=64, num_hidden_layers=2, intermediate_size=128)
    foreign = make_adapter(tmp_path / "foreign", other, [0], seed=2)
    loop._finish("r2", TrainingResult.success(metrics(0.25, 0.5, str(foreign))), "manual")
    last = loop.summary().last_run
    assert last is not None and "swap refused" in last.gate.reason
    assert seen == [0, 1] and loop.store.current_version() == service.adapter_version == 1


# --------------------------------------------------------------------------------------------
# Live refusal of a corrupt or mismatched adapter


def test_corrupt_or_mismatched_adapters_are_refused_live(served, tmp_path, monkeypatch) -> None:
    service, cfg = served
    loop = AdaptationLoop(service)
    target = service.pair.target if service.pair else None
    assert target is not None
    good = loop.store.add(make_adapter(tmp_path / "good", target, [0], seed=1), {}, install=True)
    loop.load_current()
    assert service.adapter_version == good.version == 1

    # Installed, then its weights damaged on disk: the checksum refuses it before any swap.
    corrupt = loop.store.add(make_adapter(tmp_path / "c", target, [0], seed=2), {}, install=True)
    loop.store.set_current(good.version)
    weights = Path(corrupt.path) / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
    with pytest.raises(AdapterError):
        loop.rollback(corrupt.version)
    assert service.adapter_version == 1 and loop.store.current_version() == 1

    # An intact adapter made for another model's shapes: the swap refuses it, the old one stays.
    other = make_tiny_llama(40, hidden_size=64, num_hidden_layers=2, intermediate_size=128)
    foreign_dir = make_adapter(tmp_path / "foreign", other, [0], seed=3)
    foreign = loop.store.add(foreign_dir, {}, install=True)
    loop.store.set_current(good.version)
    with pytest.raises(AdapterError):
        loop.rollback(foreign.version)
    assert service.adapter_version == 1 and loop.store.current_version() == 1

    # A run whose gate installs the mismatched adapter: the swap is refused, the pointer goes
    # back to what serves, the outcome says why.
    def result_with_foreign_adapter(run_dir: Path) -> None:
        write_result(
            run_dir / RESULT_FILE, TrainingResult.success(metrics(0.1, 0.9, str(foreign_dir)))
        )

    started: list[subprocess.Popen[Any]] = []
    monkeypatch.setattr(
        loop_mod, "spawn_run", spawn(["-c", "pass"], started, before=result_with_foreign_adapter)
    )
    loop.train_now()
    assert loop.wait_idle(HANG_GUARD_S)
    last = loop.summary().last_run
    assert last is not None and last.gate.decision == "error"
    assert last.gate.reason.startswith("swap refused")
    assert service.adapter_version == 1 and loop.store.current_version() == 1
    r = service.generate([{"role": "user", "content": "the cat"}], temperature=0.0)
    assert r.tokens  # still serving, on the good adapter
