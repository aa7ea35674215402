"""The adaptive loop: train at ``min_failure_cases``, gate on held-out traffic, hot-swap.

An apscheduler ``BackgroundScheduler`` job checks the pending failure count every
``training.check_interval_seconds`` (and shortly after each recorded failure, debounced). When
it reaches ``training.min_failure_cases`` (and the policy, cooldown and holdout allow), a
training run starts in a subprocess (`daemon.adaptation.process`), at lower priority,
continuing from the adapter in service (given the daemon's effective settings). The subprocess
scores the adapter in service and the candidate on the holdout; `daemon.adaptation.gate`
decides, every candidate is stored (installed or rejected), and an installed one is swapped
into the live draft between requests, the ``current`` pointer moving once it serves.

The loop never imports serving: it drives whatever satisfies `ServingPort` (the daemon's
``Service`` does, structurally), handed to it by the composition root (`daemon.server`).
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from apscheduler.schedulers.background import BackgroundScheduler

from daemon.adaptation.gate import gate, store_candidate
from daemon.adaptation.process import TrainingArgs, start_training_process
from daemon.adaptation.status import (
    ActiveRun,
    InService,
    LoopSummary,
    RunCounts,
    TrainingStatus,
)
from daemon.config import Settings, settings_snapshot
from daemon.core.speed import StepCosts
from daemon.durable import atomic_write
from daemon.errors import AdapterError
from daemon.logging import get_logger
from daemon.store.adapters import (
    AdapterListing,
    AdapterStore,
    AdapterVersion,
    Rollback,
)
from daemon.store.buffer import BufferRecord, ReplayBuffer
from daemon.store.runs import (
    RESULT_FILE,
    SETTINGS_FILE,
    FinishedRun,
    GateDecision,
    TrainingResult,
    prune_runs,
    read_progress,
    read_result,
)

log = get_logger("adaptation")

DEBOUNCE_S = 2.0
TERMINATE_GRACE_S = 10.0


class ServingPort(Protocol):
    """What the loop needs of the service that serves the draft."""

    @property
    def settings(self) -> Settings: ...  # replaced on a live config reload

    @property
    def buffer(self) -> ReplayBuffer | None: ...  # a reader; None before the service starts

    @property
    def target_id(self) -> str: ...  # the model whose draft adapts: its records' target id

    @property
    def name(self) -> str: ...  # the served model's name

    @property
    def state_dir(self) -> Path: ...  # its adapters/ and training/ live here

    @property
    def adapter_version(self) -> int: ...  # the version in service, 0 = none

    @property
    def commit_hooks(self) -> list[Callable[[list[BufferRecord]], None]]: ...

    def swap_adapter(self, version: AdapterVersion | None) -> Future[Any]:
        """Put ``version`` (None: no adapter) into service between requests."""
        ...

    def idle_for(self) -> float:
        """Seconds since the last request finished; 0 while one is queued or running."""
        ...

    def step_costs(self) -> StepCosts | None:
        """The live engine's measured target and draft step costs (None: not measured yet)."""
        ...

    @property
    def target_split(self) -> bool:
        """Whether the target is split across ranks (training then reads only the draft's
        share of it; `TrainingArgs.draft_only`)."""
        ...


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def spawn_run(
    settings: Settings,
    run_dir: Path,
    current: AdapterVersion | None,
    epochs: int | None,
    max_steps: int | None,
    *,
    progress: bool = False,
    nice: int = 0,
    draft_only: bool = False,
    target: str | None = None,
    **popen_kwargs: Any,
) -> subprocess.Popen[Any]:
    """Start the training subprocess for one run in ``run_dir`` (its name is the run id),
    continuing from ``current``; ``popen_kwargs`` go to `subprocess.Popen`. ``draft_only``:
    the daemon serves a target split across ranks (`TrainingArgs.draft_only`).

    The child reads ``settings`` (``run_dir/settings.json``), not the config files: after a
    live edit of a key that waits for a restart (``models.*``, ``paths.*``) the files name
    another model or directory than the one served, and the run must train the served one."""
    snapshot = run_dir / SETTINGS_FILE
    atomic_write(snapshot, lambda p: p.write_text(settings_snapshot(settings), encoding="utf-8"))
    args = TrainingArgs(
        out_dir=run_dir / "adapter",
        result_file=run_dir / RESULT_FILE,
        settings_file=snapshot,
        init_adapter=current.path if current else None,
        run_id=run_dir.name,
        epochs=epochs,
        max_steps=max_steps,
        progress=progress,
        nice=nice,
        draft_only=draft_only,
        target=target,
    )
    return start_training_process(
        args, preload_openblas=settings.models.preload_openblas, **popen_kwargs
    )


class RunSlot:
    """One training run at a time among the adaptive loops of a daemon's models (they share
    the machine the daemon serves on)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.holder: str | None = None

    def take(self, who: str) -> bool:
        with self._lock:
            if self.holder is not None and self.holder != who:
                return False
            self.holder = who
            return True

    def give(self, who: str) -> None:
        with self._lock:
            if self.holder == who:
                self.holder = None


class AdaptationLoop:
    """Triggers, supervises and gates training runs of one served model's draft."""

    def __init__(self, service: ServingPort, slot: RunSlot | None = None) -> None:
        self.service = service
        self.slot = slot or RunSlot()
        self.log = log.bind(model=service.name)  # each line names the model it adapts
        self._versions_lock = threading.Lock()  # install and rollback: swap, then pointer
        self.data_dir = Path(service.state_dir)  # its adapters/ and training/
        self.store = AdapterStore.for_data_dir(
            self.data_dir, service.settings.training.keep_adapters
        )
        self.scheduler = BackgroundScheduler(
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": 60}
        )
        self.proc: subprocess.Popen[Any] | None = None
        self.active: ActiveRun | None = None
        self.last_run: FinishedRun | None = None
        self.waiting_for: str | None = None
        self.counts = RunCounts()
        self._last_finished: float | None = None
        self._check_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._stopping = False
        self._runs_done = threading.Condition()

    @property
    def settings(self) -> Settings:
        return self.service.settings  # replaced on a live config reload

    @property
    def buffer(self) -> ReplayBuffer:
        """The served model's own rows (a buffer may hold several models')."""
        buffer = self.service.buffer
        if buffer is None:
            raise RuntimeError("the service is not started: no replay buffer")
        return buffer.for_target(self.target)

    @property
    def target(self) -> str:
        return self.service.target_id

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Put the stored ``current`` adapter into service, then start the scheduler."""
        self.load_current()
        self.service.commit_hooks.append(self.on_commit)
        interval = self.settings.training.check_interval_seconds
        self.scheduler.add_job(self.check, "interval", seconds=interval, id="check")
        self.scheduler.start()
        self.log.info(
            "adaptation_started",
            min_failure_cases=self.settings.training.min_failure_cases,
            policy=self.settings.training.policy,
            adapter_version=self.service.adapter_version,
        )

    def load_current(self) -> None:
        try:
            version = self.store.current()
            if version is not None:
                self.store.verify(version)
                self.service.swap_adapter(version).result()
        except AdapterError as e:
            self.log.error(
                "adapter_load_failed", error=str(e), using="the draft without an adapter"
            )

    def stop(self) -> None:
        """Stop the scheduler and a running training process (SIGTERM, then SIGKILL)."""
        self._stopping = True
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        proc = self.proc
        if proc is not None and proc.poll() is None:
            self.log.info("train_process_stopping", pid=proc.pid)
            self._terminate(proc)
        if self._watcher is not None:
            self._watcher.join(TERMINATE_GRACE_S + 5)

    # --- triggering ------------------------------------------------------------------------

    def on_commit(self, records: list[BufferRecord]) -> None:
        """After each buffer commit: a new train failure schedules a check soon (debounced)."""
        if self._stopping or not self.scheduler.running:
            return
        mine = self.target
        if any(r.is_failure and r.split == "train" and r.target_id == mine for r in records):
            self.scheduler.add_job(
                self.check,
                "date",
                run_date=datetime.fromtimestamp(time.time() + DEBOUNCE_S),
                id="check-soon",
                replace_existing=True,
            )

    def check(self) -> str | None:
        """Start a run if one is due; returns its run id."""
        if not self._check_lock.acquire(blocking=False):
            return None
        try:
            return self._check()
        finally:
            self._check_lock.release()

    def _wait(self, why: str | None) -> None:
        if why != self.waiting_for and why is not None:
            self.log.info("training_waiting", waiting_for=why)
        self.waiting_for = why

    def _check(self) -> str | None:
        if self.active is not None or self._stopping:
            return None
        t = self.settings.training
        buf = self.buffer
        pending = buf.pending_failure_count()
        if pending < t.min_failure_cases:
            self._wait(None)
            return None
        if self._last_finished is not None:
            left = t.cooldown_seconds - (time.monotonic() - self._last_finished)
            if left > 0:
                self._wait(f"cooldown ({left:.0f}s left)")
                return None
        if buf.count("holdout") < t.min_holdout_rows:
            self._wait(f"holdout traffic ({buf.count('holdout')}/{t.min_holdout_rows} rows)")
            return None
        if t.policy == "idle" and self.service.idle_for() < t.idle_seconds:
            self._wait(f"the server to be idle for {t.idle_seconds:g}s")
            return None
        holder = self.slot.holder
        if holder is not None and holder != self.service.name:
            self._wait(f"the training run of {holder} to finish")
            return None
        self._wait(None)
        return self.start_run("min_failure_cases", pending)

    def train_now(self, epochs: int | None = None, max_steps: int | None = None) -> str:
        """Start a run now whatever the pending count (``specd train`` against the daemon)."""
        with self._check_lock:
            if self.active is not None:
                raise RuntimeError(f"training run {self.active.run_id} is already running")
            pending = self.buffer.pending_failure_count()
            return self.start_run("manual", pending, epochs=epochs, max_steps=max_steps)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no run is in progress: a started run has finished, been gated and (if
        installed) swapped in. False if ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._runs_done:
            while self.active is not None:
                left = 5.0 if deadline is None else min(5.0, deadline - time.monotonic())
                if left <= 0:
                    return False
                self._runs_done.wait(left)
        return True

    # --- one run ---------------------------------------------------------------------------

    def start_run(
        self, reason: str, pending: int, epochs: int | None = None, max_steps: int | None = None
    ) -> str:
        me = self.service.name
        if not self.slot.take(me):
            raise RuntimeError(f"a training run of {self.slot.holder} is running (one at a time)")
        try:
            return self._start_run(reason, pending, epochs, max_steps)
        except BaseException:
            self.slot.give(me)
            raise

    def _start_run(
        self, reason: str, pending: int, epochs: int | None, max_steps: int | None
    ) -> str:
        run_id = new_run_id()
        run_dir = self.data_dir / "training" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        current = self.store.current()
        with (run_dir / "stderr.log").open("wb") as stderr:
            proc = spawn_run(
                self.settings,
                run_dir,
                current,
                epochs,
                max_steps,
                nice=self.settings.training.nice,
                draft_only=self.service.target_split,
                target=self.target,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
            )
        active = ActiveRun(
            run_id=run_id,
            trigger=reason,
            pid=proc.pid,
            started=time.time(),
            pending_failures=pending,
            parent_version=current.version if current else 0,
            dir=str(run_dir),
        )
        with self._run_lock:
            self.proc = proc
            self.active = active
        self.log.info(
            "train_run_started",
            run_id=run_id,
            reason=reason,
            pid=proc.pid,
            pending_failures=pending,
            parent_version=active.parent_version,
        )
        self._watcher = threading.Thread(
            target=self._watch,
            args=(proc, run_id, run_dir, reason),
            name="specd-train-watch",
            daemon=True,
        )
        self._watcher.start()
        return run_id

    def _terminate(self, proc: subprocess.Popen[Any]) -> None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except ProcessLookupError:
            pass

    def _watch(self, proc: subprocess.Popen[Any], run_id: str, run_dir: Path, reason: str) -> None:
        limit = self.settings.training.max_run_seconds
        timed_out = False
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.log.warning("train_run_timeout", run_id=run_id, max_run_seconds=limit)
            self._terminate(proc)
        result = read_result(run_dir / RESULT_FILE, proc.returncode)
        if timed_out:
            result = replace(
                result, status="error", error=f"stopped after training.max_run_seconds={limit:g}s"
            )
        elif self._stopping and not result.ok:
            result = replace(result, error="stopped with the daemon")
        try:
            self._finish(run_id, result, reason)
        except Exception:  # the loop must survive a bad run
            self.log.exception("train_run_finish_failed", run_id=run_id)
        finally:
            # Counted last: whoever sees the run counted also sees its last_run and swap.
            self.counts.runs += 1
            with self._run_lock:
                self.proc = None
                self.active = None
            self.slot.give(self.service.name)
            self._last_finished = time.monotonic()
            with self._runs_done:
                self._runs_done.notify_all()

    def _finish(self, run_id: str, result: TrainingResult, reason: str) -> None:
        decision = gate(result, self.settings, self.service.step_costs())
        self.log.info("gate_decision", run_id=run_id, **decision.to_dict())
        finished = FinishedRun(run_id=run_id, trigger=reason, finished=time.time(), gate=decision)
        if decision.decision == "error":
            self.counts.failed += 1
            self.log.error("train_run_failed", run_id=run_id, error=decision.reason)
            self.last_run = finished
            self._prune_runs(run_id)
            return
        version = store_candidate(self.store, result, decision, self.settings, reason, False)
        finished.adapter_version = version.version if version else None
        if decision.decision == "install" and version is not None:
            try:
                with self._versions_lock:  # one install or rollback at a time
                    self.service.swap_adapter(version).result(timeout=600)
                    self.store.set_current(version.version)  # only once it serves
                self.counts.installed += 1
                self.log.info(
                    "adapter_installed",
                    run_id=run_id,
                    adapter_version=version.version,
                    heldout_before=decision.heldout_before,
                    heldout_after=decision.heldout_after,
                    improvement=decision.improvement,
                )
            except Exception as e:  # refused: the pointer still names what is serving
                finished.gate = replace(decision, decision="error", reason=f"swap refused: {e}")
                self.counts.failed += 1
                self.log.error(
                    "adapter_swap_refused", adapter_version=version.version, error=str(e)
                )
        else:
            self.counts.rejected += 1
            self.log.info(
                "adapter_rejected",
                run_id=run_id,
                adapter_version=version.version if version else None,
                reason=decision.reason,
            )
        self.last_run = finished
        self._prune_runs(run_id)

    def _prune_runs(self, finished: str) -> None:
        """Run directories follow the adapter store's retention (its kept versions' runs, and
        as many of the newest runs besides), so the data dir does not grow for ever."""
        kept = {str(v.manifest.get("run_id")) for v in self.store.versions()}
        active = self.active.run_id if self.active is not None else None
        try:
            prune_runs(self.data_dir / "training", kept, self.store.keep, active)
        except OSError:  # a run left behind is harmless; the next finish tries again
            self.log.exception("training_runs_prune_failed", run_id=finished)

    # --- versions and reports --------------------------------------------------------------

    def rollback(self, version: int | None = None) -> Rollback:
        """Put ``version`` (default: the installed one before the current) back in service."""
        with self._versions_lock:  # not interleaved with an install: pointer and draft agree
            target = self.store.rollback_target(version)
            previous = self.service.adapter_version
            adapter = self.store.get(target) if target else None
            if adapter is not None:
                self.store.verify(adapter)
            self.service.swap_adapter(adapter).result(timeout=600)
            self.store.set_current(target)
        self.log.info("adapter_rollback", from_version=previous, to_version=target)
        return Rollback(previous_version=previous, adapter_version=target)

    def summary(self) -> LoopSummary:
        """Runs finished so far, by outcome, and the last one."""
        return LoopSummary(counts=replace(self.counts), last_run=self.last_run)

    def status(self) -> TrainingStatus:
        t = self.settings.training
        active = self.active
        out = TrainingStatus(
            state="training" if active else "idle",
            pending_failures=self.buffer.pending_failure_count(),
            min_failure_cases=t.min_failure_cases,
            policy=t.policy,
            waiting_for=self.waiting_for,
            counts=replace(self.counts),
            last_run=self.last_run,
            in_service=self._in_service(),
        )
        if active:
            progress = read_progress(Path(active.dir) / RESULT_FILE)
            out.run = active
            out.elapsed_s = round(time.time() - active.started, 1)
            out.progress = progress.to_dict() if progress else None
        return out

    def _in_service(self) -> InService:
        """The adapter serving now and its figures (version 0: the draft without one)."""
        current = self.store.current_version()
        try:
            if current:
                v = self.store.get(current)
                return InService(current, v.heldout_agreement, v.expected_speedup)
        except AdapterError:  # removed under us: /status still answers
            pass
        return InService(current)

    def list_adapters(self) -> AdapterListing:
        return AdapterListing(
            current=self.store.current_version(),
            versions=[v.summary() for v in self.store.versions()],
        )


def train_and_gate(
    settings: Settings,
    epochs: int | None = None,
    max_steps: int | None = None,
    progress: bool = True,
) -> tuple[TrainingResult, GateDecision, AdapterVersion | None]:
    """One run without a daemon (``specd train``): the same subprocess, gate and store.

    An installed version becomes ``current``; the daemon loads it at its next start.
    """
    data_dir = Path(settings.paths.data_dir)
    store = AdapterStore.for_data_dir(data_dir, settings.training.keep_adapters)
    run_dir = data_dir / "training" / new_run_id()
    run_dir.mkdir(parents=True, exist_ok=True)
    proc = spawn_run(settings, run_dir, store.current(), epochs, max_steps, progress=progress)
    try:
        proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise
    result = read_result(run_dir / RESULT_FILE, proc.returncode)
    decision = gate(result, settings)
    version = store_candidate(store, result, decision, settings, "manual")
    return result, decision, version
