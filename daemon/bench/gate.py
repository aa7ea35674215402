"""``specd bench gate``: how often the speed gate installs a candidate that is no better.

The gate (`daemon.adaptation.gate.gate`) installs when a paired bootstrap over held-out rows
puts the expected speedup gain's lower bound above zero (`daemon.core.speed.compare`). On a
handful of rows a bootstrap has a handful of distinct resamples, and its bound means little.
This simulates candidates of known quality and counts installs:

- each row has its own difficulty (the draft's agreement there, ~N(0.45, 0.2) clipped to
  [0.05, 0.95]) and 20-120 positions; the draft in service matches each position with that
  probability, the candidate with that probability plus ``delta`` (0: exactly as good;
  negative: worse), independently;
- step costs as a quantized target's: verifying ``k + 1`` rows costs ``1 + 0.15 k`` target
  steps, a draft token 0.1.

A candidate no better than the one in service should be installed at most ``1 - confidence``
of the time (delta 0) and almost never when worse: the table shows where the row count makes
that hold (`training.min_holdout_rows`, which the gate also requires).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import asdict, dataclass
from typing import Any

from daemon.adaptation.gate import installs
from daemon.bench.report import print_table, provenance, write_json
from daemon.config import ConfigSources, Settings
from daemon.core.speed import StepCosts, compare

COSTS = StepCosts(target=1.0, verify=[1.0 + 0.15 * k for k in range(1, 9)], draft=0.1)


@dataclass
class GateRate:
    """Installs of ``trials`` simulated candidates at one row count and quality."""

    rows: int
    delta: float
    confidence: float
    trials: int
    installs: int

    @property
    def rate(self) -> float:
        return self.installs / self.trials if self.trials else 0.0


def simulated_rows(
    rng: random.Random, rows: int, delta: float
) -> tuple[list[list[bool]], list[list[bool]]]:
    """Per-position matches of the draft in service and of a candidate ``delta`` better."""
    before, after = [], []
    for _ in range(rows):
        p = min(0.95, max(0.05, rng.gauss(0.45, 0.2)))
        n = rng.randint(20, 120)
        before.append([rng.random() < p for _ in range(n)])
        after.append([rng.random() < min(1.0, max(0.0, p + delta)) for _ in range(n)])
    return before, after


def install_rate(
    rows: int, delta: float, trials: int, confidence: float, seed: int = 0, floor: int = 1
) -> GateRate:
    """How many of ``trials`` simulated candidates the gate installs; ``floor``: the fewest
    rows it installs on (`training.min_holdout_rows`): the gate's own rule (`installs`)."""
    rng = random.Random(seed)
    installed = 0
    for _ in range(trials):
        before, after = simulated_rows(rng, rows, delta)
        c = compare(before, after, COSTS, confidence, seed=rng.randrange(1 << 30))
        installed += installs(c, floor)
    return GateRate(rows, delta, confidence, trials, installed)


def bench_gate(
    row_counts: list[int], deltas: list[float], trials: int, confidence: float
) -> dict[str, Any]:
    """One row per (row count, candidate quality); the bootstrap alone, without a floor."""
    out: dict[str, Any] = {}
    for rows in row_counts:
        for delta in deltas:
            r = install_rate(rows, delta, trials, confidence, seed=rows * 1000 + int(delta * 100))
            out[f"rows={rows} delta={delta:+.2f}"] = {**asdict(r), "install_rate": r.rate}
    return out


def run(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    confidence = args.confidence or settings.training.gate_confidence
    print(
        f"bench gate: {args.trials} simulated candidates per row, confidence {confidence}, "
        f"training.min_holdout_rows={settings.training.min_holdout_rows}"
    )
    rows = bench_gate(args.rows, args.deltas, args.trials, confidence)
    print_table(rows, ["rows", "delta", "trials", "installs", "install_rate"])
    write_json(args.json, {**rows, "provenance": provenance()})
    return 0
