"""The gate: whether a finished run's candidate goes into service, and how it is stored.

``training.gate: speed`` (the default) compares the pair's expected tokens per second on the
holdout rows before and after (`daemon.core.speed.compare`, a paired bootstrap over rows) and
installs only on at least ``training.min_holdout_rows`` rows; ``agreement`` compares held-out
agreement against ``training.min_improvement``. `store_candidate` keeps every candidate in the
adapter store, installed or rejected, with its manifest.
"""

from __future__ import annotations

from pathlib import Path

from daemon.config import Settings
from daemon.core.speed import Comparison, StepCosts, compare
from daemon.store.adapters import AdapterStore, AdapterVersion, config_hash
from daemon.store.runs import GateDecision, RunMetrics, TrainingResult

# what an adapter's manifest keeps of its run's metrics, under "training"
MANIFEST_TRAINING_KEYS = (
    "steps",
    "epochs",
    "loss_first",
    "loss_last",
    "tokens",
    "tokens_per_s",
    "wall_s",
    "skipped_micro_batches",
)


def _gate_costs(m: RunMetrics, live: StepCosts | None) -> tuple[StepCosts | None, StepCosts | None]:
    """(costs of the pair in service, the candidate's when its draft is of another kind).

    The run's own timings come first: it timed every row count in turn, back to back, so
    their ratios hold even on a machine whose load moved meanwhile. The live engine's figures
    are each an average of rounds taken at other moments (a row count seen rarely was last
    timed maybe while a training run shared the machine): two runs of the same configuration
    priced with them chose k=5 at 1.24 target steps a round and then found no k that paid
    (docs/adaptation.md). They are used when the run timed nothing (a target split across
    ranks). A candidate of another kind (a first feature draft) has its own draft cost."""
    run = StepCosts.from_dict(m.costs) if m.costs else None
    if run is None:
        return live, None
    if m.costs_before is None:
        return run, None
    return StepCosts.from_dict(m.costs_before), run


def installs(c: Comparison, min_rows: int) -> bool:
    """The speed gate's rule: the gain's lower bound above zero, on at least ``min_rows``
    rows (a bootstrap over a handful of rows has a handful of distinct resamples: its bound
    says little there; the loop waits for enough)."""
    return c.better and c.rows >= min_rows


def gate(
    result: TrainingResult, settings: Settings, costs: StepCosts | None = None
) -> GateDecision:
    """The decision on a finished run: install, reject, or error (nothing to store).

    ``training.gate: speed`` compares the pair's expected tokens per second on the holdout rows
    before and after (`daemon.core.speed.compare`, a paired bootstrap over the rows), with
    ``costs`` (the live engine's measurements) or else the ones the run timed; ``agreement``
    (or a run without per-row matches) compares held-out agreement against min_improvement.
    """
    if not result.ok:
        return GateDecision("error", result.error or "training failed")
    m = result.metrics
    if m is None or not m.heldout_after.positions:
        return GateDecision("reject", "no held-out positions to evaluate on")
    before, after = m.heldout_before.agreement, m.heldout_after.agreement
    improvement = after - before
    agreement = f"held-out agreement {before:.4f} -> {after:.4f} ({improvement:+.4f})"
    cfg = settings.training
    costs, after_costs = _gate_costs(m, costs)
    rows_b, rows_a = m.heldout_before.match_rows(), m.heldout_after.match_rows()
    if cfg.gate == "speed" and costs is not None and rows_a and len(rows_a) == len(rows_b):
        c = compare(rows_b, rows_a, costs, cfg.gate_confidence, after_costs=after_costs)
        b, a = c.before, c.after
        enough = c.rows >= cfg.min_holdout_rows
        evidence = "" if enough else f" < training.min_holdout_rows={cfg.min_holdout_rows}"
        return GateDecision(
            "install" if installs(c, cfg.min_holdout_rows) else "reject",
            f"expected speedup {b.speedup:.3f}x (k={b.k}) -> {a.speedup:.3f}x (k={a.k}): "
            f"{c.delta:+.3f}, lower bound {c.lower:+.3f} at {c.confidence:.0%} over "
            f"{c.rows} rows{evidence} (step costs: {costs.source}); {agreement}",
            heldout_before=before,
            heldout_after=after,
            improvement=improvement,
            speed={
                **c.to_dict(),
                "costs": costs.to_dict(),
                **({"candidate_costs": after_costs.to_dict()} if after_costs else {}),
            },
        )
    need = cfg.min_improvement
    return GateDecision(
        "install" if improvement >= need else "reject",
        f"{agreement}, need {need:+.4f}",
        heldout_before=before,
        heldout_after=after,
        improvement=improvement,
    )


def store_candidate(
    store: AdapterStore,
    result: TrainingResult,
    decision: GateDecision,
    settings: Settings,
    reason: str,
    point: bool = True,
) -> AdapterVersion | None:
    """Keep the candidate in the store (installed or rejected) with its manifest; ``point``:
    move ``current`` to an installed one now (`AdapterStore.add`)."""
    m = result.metrics
    if decision.decision == "error" or not result.adapter_path or m is None:
        return None
    metrics = m.to_dict()
    manifest = {
        "run_id": m.run_id,
        "trigger": reason,
        "gate": decision.to_dict(),
        "metrics_before": m.heldout_before.summary(),
        "metrics_after": m.heldout_after.summary(),
        "data": metrics["examples"],
        "training": {k: metrics[k] for k in MANIFEST_TRAINING_KEYS},
        "config_hash": config_hash(settings.training.model_dump()),
        "draft_head_tokens": m.head_tokens,  # the ids: specd.head_tokens in adapter_config.json
    }
    install = decision.decision == "install"
    return store.add(Path(result.adapter_path), manifest, install=install, point=point)
