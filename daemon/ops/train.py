"""``specd train`` and ``specd adapters``: a training run through the gate, and the adapter
versions, against the running daemon when there is one, else on the data directory.

With a daemon up for the data directory, ``specd train`` asks it for a run (``POST
/admin/train``) and follows ``/status`` until that run is the last one finished; without one it
runs the same subprocess, gate and store itself (`daemon.adaptation.loop.train_and_gate`) and
the daemon loads an installed version at its next start. ``specd adapters rollback`` is live in
the daemon, or moves the ``current`` pointer for its next start.
"""

from __future__ import annotations

import argparse
import sys
import time

from daemon.config import ConfigSources, Settings
from daemon.ops.client import DaemonClient
from daemon.ops.status import format_progress, format_time
from daemon.store.adapters import AdapterStore
from daemon.store.runs import FinishedRun, GateDecision, RunProgress


def print_gate(decision: GateDecision, version: int | None) -> None:
    """The gate's decision on a run, and the scores it went by."""
    before, after = decision.heldout_before, decision.heldout_after
    if before is not None and after is not None:
        print(
            f"held-out agreement: before {before:.4f} -> after {after:.4f} ({after - before:+.4f})"
        )
    speed = _speedups(decision)
    if speed is not None:
        print(f"expected speedup over the target: before {speed}")
    what = {"install": "installed", "reject": "kept as rejected", "error": "failed"}
    print(
        f"adapter: {what.get(decision.decision, decision.decision)}"
        + (f" as v{version}" if version else "")
        + f" ({decision.reason})"
    )


def _speedups(decision: GateDecision) -> str | None:
    """ "1.02x -> 1.31x (+0.29, lower bound +0.12 at 90%)" from a speed gate's comparison."""
    s = decision.speed
    if not s:
        return None
    return (
        f"{s['before']['speedup']:.2f}x -> {s['after']['speedup']:.2f}x "
        f"({s['delta']:+.2f}, lower bound {s['lower_bound']:+.2f} at {s['confidence']:.0%})"
    )


def _train_in_daemon(args: argparse.Namespace, client: DaemonClient) -> int:
    body = {k: v for k, v in (("epochs", args.epochs), ("max_steps", args.max_steps)) if v}
    run_id = client.request("POST", "/admin/train", body)["run_id"]
    print(
        f"training run {run_id} started by the running daemon at {client.base_url} "
        "(every step: specd logs --training --follow)"
    )
    shown = None
    while True:
        time.sleep(2)
        training = client.request("GET", "/status", timeout=30).get("training") or {}
        run = training.get("run") or {}
        if not args.quiet and run.get("run_id") == run_id:
            p = run.get("progress") or {}
            progress = RunProgress.from_dict(p)
            # a line per phase, and per tenth of the training steps
            tenth = 10 * (progress.step or 0) // max(1, progress.total_steps or 1)
            if (progress.phase, tenth) != shown:
                shown = (progress.phase, tenth)
                print(f"  {format_progress(p)}", flush=True)
        last = training.get("last_run")
        if last and last.get("run_id") == run_id:
            finished = FinishedRun.from_dict(last)
            print_gate(finished.gate, finished.adapter_version)
            return 0 if finished.gate.decision != "error" else 1


def run_train(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd train``: one run now, through the same gate as automatic ones."""
    client = DaemonClient.find(settings)
    if client is not None:
        return _train_in_daemon(args, client)
    from daemon.adaptation.loop import train_and_gate

    print("training in a subprocess (no daemon running for this data dir)")
    result, decision, version = train_and_gate(
        settings, args.epochs, args.max_steps, progress=not args.quiet
    )
    m = result.metrics
    if m is not None:
        print(
            f"trained on {m.examples.failures} failure cases + {m.examples.replay} replay "
            f"rows: {m.steps} steps, loss {m.loss_first:.3f} -> "
            f"{m.loss_last:.3f}, {m.tokens_per_s:.0f} tokens/s"
        )
    elif result.error:
        print(f"training failed: {result.error}", file=sys.stderr)
    print_gate(decision, version.version if version else None)
    return 0 if decision.decision != "error" else 1


def run_adapters(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd adapters list|rollback``."""
    client = DaemonClient.find(settings)
    if args.action == "rollback":
        if client is not None:
            body = {} if args.version is None else {"version": args.version}
            out = client.request("POST", "/admin/adapters/rollback", body)
            where = f"live in the daemon at {client.base_url}"
        else:
            store = AdapterStore.for_data_dir(settings.paths.data_dir)
            previous = store.current_version()
            target = store.rollback_target(args.version)
            store.set_current(target)
            out = {"previous_version": previous, "adapter_version": target}
            where = "(no daemon running: used at its next start)"
        print(f"adapter v{out['previous_version']} -> v{out['adapter_version']} {where}")
        return 0
    store = AdapterStore.for_data_dir(settings.paths.data_dir)
    current = store.current_version()
    versions = store.versions()
    if not versions:
        print(f"no adapters yet in {store.root}")
        return 0
    for v in versions:
        gate_info = v.manifest.get("gate")
        gate = GateDecision.from_dict(gate_info) if gate_info else None
        before = gate.heldout_before if gate else None
        after = gate.heldout_after if gate else None
        scores = f"{before:.4f} -> {after:.4f}" if before is not None and after is not None else "-"
        mark = "*" if v.version == current else " "
        speed = _speedups(gate) if gate else None
        print(
            f"{mark} v{v.version:<4} {v.status:<9} {format_time(v.manifest.get('created'))}  "
            f"parent v{v.manifest.get('parent', 0)}  held-out {scores}"
            + (f"  expected speedup {speed}" if speed else "")
        )
    if current == 0:
        print("* none: the draft serves without an adapter")
    return 0
