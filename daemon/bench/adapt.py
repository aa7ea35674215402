"""``specd bench adapt``: the whole adaptive loop, measured on eval prompts before and after."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemon.bench.common import mlx_lm_run
from daemon.bench.report import print_table, provenance, write_json
from daemon.config import ConfigSources, Settings
from daemon.core.engine import GenerationStats
from daemon.core.prompts import encode_prompt, read_prompts


@dataclass
class _EvalTotals:
    """Eval requests summed; the rates are `GenerationStats`'s, over the sums."""

    stats: GenerationStats = field(default_factory=GenerationStats)
    seconds: float = 0.0

    def add(self, stats: GenerationStats, seconds: float) -> None:
        self.stats.accumulate(stats)
        self.seconds += seconds

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "tokens_per_s": s.generation_tokens / self.seconds if self.seconds else 0.0,
            "acceptance_rate": s.acceptance_rate,
            "mean_accepted_length": s.mean_accepted_length,
            "tokens": s.generation_tokens,
            "seconds": self.seconds,
        }


def _eval_engine(
    service: Any,
    prompts: Sequence[Any],
    max_tokens: int,
    groups: Sequence[str] | None = None,
    temperature: float = 0.0,
) -> dict[str, Any]:
    """Eval traffic through the service (never recorded), greedy or at ``temperature``: speed
    and acceptance, and with ``groups`` (a label per prompt) the same per label under
    ``by_group``."""
    total = _EvalTotals()
    by_group: dict[str, _EvalTotals] = {}
    for i, p in enumerate(prompts):
        t0 = time.perf_counter()
        r = service.generate(p, record=False, temperature=temperature, max_tokens=max_tokens)
        seconds = time.perf_counter() - t0
        total.add(r.stats, seconds)
        if groups is not None:
            by_group.setdefault(groups[i], _EvalTotals()).add(r.stats, seconds)
    out = total.to_dict()
    if groups is not None:
        out["by_group"] = {g: t.to_dict() for g, t in by_group.items()}
    return out


def _target_only(pair: Any, eval_ids: Sequence[list[int]], max_tokens: int) -> dict[str, Any]:
    """The target alone (mlx-lm, greedy) on the eval prompts: its speed, and its answers (under
    ``answers``, not for the JSON) that held-out agreement is scored on."""
    mlx_lm_run(pair.target, pair.tokenizer, eval_ids[0], 8)  # warm-up
    t0 = time.perf_counter()
    answers = [mlx_lm_run(pair.target, pair.tokenizer, ids, max_tokens)[0] for ids in eval_ids]
    seconds = time.perf_counter() - t0
    tokens = sum(len(a) for a in answers)
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "answers": answers}


# Each engine row's speedup is over the target measured next to it: ``before`` over the one
# measured before the traffic, the rows after it over the one measured after.
TARGET_OF = {
    "before": "target_only",
    "after": "target_only_after",
    "after_without_adapter": "target_only_after",
}


def ratios(rows: dict[str, Any]) -> dict[str, float]:
    """Tokens/s ratios: each engine row over its target (`TARGET_OF`), and adaptation's own
    share: ``after`` over ``after_without_adapter`` (the same state, suffix index included,
    with the plain draft)."""

    def tps(row: str) -> float:
        return float(rows[row]["tokens_per_s"])

    out = {f"{row} / target": tps(row) / tps(target) for row, target in TARGET_OF.items()}
    out["after / after_without_adapter"] = _share(rows)
    return out


def _share(rows: dict[str, Any]) -> float:
    """The adapter's own share: ``after`` over ``after_without_adapter``."""
    return float(rows["after"]["tokens_per_s"]) / float(
        rows["after_without_adapter"]["tokens_per_s"]
    )


def _median_repetition(repetitions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The after-traffic rows of the repetition with the median share (the lower middle one
    for an even count): ``after``, ``after_without_adapter`` and ``target_only_after`` each
    measured within it, so every ratio stays over rows measured next to each other."""
    ordered = sorted(repetitions, key=_share)
    return dict(ordered[(len(ordered) - 1) // 2])


def _candidate_line(c: dict[str, Any]) -> str:
    """One stored candidate: its gate decision, expected speedup before -> after (gate: speed
    only) and held-out agreement before -> after, then the gate's reason."""
    gate = c.get("gate") or {}
    speed = gate.get("speed") or {}

    def pair(before: Any, after: Any, fmt: str) -> str:
        return "-" if before is None or after is None else f"{before:{fmt}} -> {after:{fmt}}"

    exp = pair(
        (speed.get("before") or {}).get("speedup"), (speed.get("after") or {}).get("speedup"), ".3f"
    )
    agree = pair(gate.get("heldout_before"), gate.get("heldout_after"), ".4f")
    return (
        f"v{c['version']} {c['status']}: expected speedup {exp}, held-out agreement {agree}: "
        f"{gate.get('reason')}"
    )


def _private_settings(settings: Any, data_dir: Path, train_requests: int) -> Any:
    """The configured settings in a private data directory, the loop made to train as soon
    as it may and the holdout share raised so that the traffic gives the gate its rows."""
    s = settings.model_copy(deep=True)
    s.paths.data_dir = data_dir
    s.training.cooldown_seconds = 0.0
    s.training.check_interval_seconds = 2.0
    s.training.policy = "immediate"
    s.models.keep_alive_seconds = None  # the target is run here, between requests
    # A daemon collects the gate's holdout rows over hours; this run has its train
    # prompts only: enough of them go to the holdout for training.min_holdout_rows
    # (the gate's floor), about 1.5 times as many as it needs.
    wanted = 1.5 * s.training.min_holdout_rows / max(train_requests, 1)
    s.buffer.holdout_fraction = min(0.5, max(s.buffer.holdout_fraction, wanted))
    return s


@dataclass
class _Eval:
    """What each measured row of the service runs: the eval prompts and the target's greedy
    answers to them, which held-out agreement is scored on."""

    prompts: Sequence[list[dict[str, Any]]]
    heldout_rows: list[tuple[list[int], list[int]]]
    groups: list[str] | None
    max_tokens: int
    temperature: float

    def measure(self, service: Any) -> dict[str, Any]:
        from daemon.core.evaluation import Agreement, teacher_forced_agreement

        m = _eval_engine(service, self.prompts, self.max_tokens, self.groups, self.temperature)
        # one pass per group; the overall figure is their sum
        draft = service.draft
        labels = self.groups or [""] * len(self.heldout_rows)
        agreement = {
            g: teacher_forced_agreement(
                draft, [r for r, rg in zip(self.heldout_rows, labels, strict=True) if rg == g]
            )
            for g in dict.fromkeys(labels)
        }
        m["heldout_agreement"] = sum(agreement.values(), Agreement()).rate
        for g, gm in m.get("by_group", {}).items():
            gm["heldout_agreement"] = agreement[g].rate
        m["adapter_version"] = service.adapter_version
        return m


def _serve_train_traffic(
    service: Any, loop: Any, prompts: Sequence[Any], ev: _Eval, progress: bool
) -> None:
    """The train traffic through the service, then the loop's last run finished, gated and
    swapped; the loop is stopped after it, so the adapter in service stays put."""
    from tqdm import tqdm

    for p in tqdm(prompts, desc="train traffic", disable=not progress):
        service.generate(p, temperature=ev.temperature, max_tokens=ev.max_tokens)
    service.flush(60)
    loop.check()  # the last failures may have just crossed the threshold
    loop.wait_idle()  # let a started run finish, gate and swap
    loop.stop()


def _after_rows(
    service: Any, pair: Any, eval_ids: list[list[int]], adapter: Any, ev: _Eval, repeat: int
) -> list[dict[str, Any]]:
    """``repeat`` times, interleaved: the service after the traffic, the same state without
    the adapter (then the adapter back, by the public swap; with none installed this measures
    one state twice: the share shows the noise) and the target alone."""
    repetitions = []
    for _ in range(repeat):
        after = ev.measure(service)
        service.swap_adapter(None).result()
        without = ev.measure(service)
        service.swap_adapter(adapter).result()
        target_after = _target_only(pair, eval_ids, ev.max_tokens)
        target_after.pop("answers")  # greedy: the same as before the traffic
        repetitions.append(
            {"target_only_after": target_after, "after": after, "after_without_adapter": without}
        )
    return repetitions


def bench_adapt(
    settings: Any,
    train_prompts: Sequence[list[dict[str, Any]]],
    eval_prompts: Sequence[list[dict[str, Any]]],
    max_tokens: int,
    progress: bool = True,
    eval_groups: Sequence[str] | None = None,
    temperature: float = 0.0,
    repeat: int = 1,
) -> dict[str, Any]:
    """The adaptive loop on the configured pair, measured on eval prompts before and after.

    Train and eval traffic are greedy, or sampled at ``temperature`` (unseeded, so that the
    suffix index and the cost-aware policy work as for any client's samples); the target-only
    reference and the held-out agreement stay greedy (what the draft is scored against).

    Runs in a private data directory (a fresh buffer and adapter store): eval traffic is never
    recorded; train traffic goes through the service exactly as the daemon serves it, and the
    `AdaptationLoop` trains, gates and swaps as it would, with the configured
    ``min_failure_cases`` (and a holdout share raised, if need be, so that the traffic gives
    the gate its ``min_holdout_rows``). ``heldout_agreement`` is teacher-forced agreement of
    the draft with the target's greedy answers to the eval prompts. With ``eval_groups`` (a
    label per eval prompt, e.g. its domain) ``before`` and ``after`` also break the measures
    down by label.

    After the traffic the target alone is measured again (``target_only_after``), and so is the
    service with the adapter taken out (``after_without_adapter``: the plain draft, with the
    suffix index, the target's prompt cache and the policy as the traffic left them), then the
    adapter is put back: ``after`` over it is what the adapter itself adds (`ratios`).
    With ``repeat`` those three are measured that many times, interleaved; the rows are the
    repetition with the median share and ``share_runs`` lists every repetition's share.
    """
    import tempfile

    from daemon.adaptation.loop import AdaptationLoop
    from daemon.core.models import load_pair
    from daemon.serving.service import Service

    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    wall0 = time.perf_counter()
    groups = list(eval_groups) if eval_groups is not None else None
    if groups is not None and len(groups) != len(eval_prompts):
        raise ValueError(f"{len(groups)} eval groups for {len(eval_prompts)} eval prompts")
    pair = load_pair(settings)
    eval_ids = [encode_prompt(pair.tokenizer, p) for p in eval_prompts]
    # Target-only reference: speed, and the greedy answers held-out agreement is scored on.
    target_before = _target_only(pair, eval_ids, max_tokens)
    heldout_rows = list(zip(eval_ids, target_before.pop("answers"), strict=True))
    ev = _Eval(eval_prompts, heldout_rows, groups, max_tokens, temperature)

    with tempfile.TemporaryDirectory(prefix="specd-bench-adapt-") as tmp:
        s = _private_settings(settings, Path(tmp), len(train_prompts))
        service = Service(s, pair)
        service.start()
        loop = AdaptationLoop(service)
        loop.start()
        try:
            before = ev.measure(service)
            _serve_train_traffic(service, loop, train_prompts, ev, progress)
            # every candidate the loop stored, installed or rejected, with its gate decision
            candidates = [asdict(v) for v in loop.list_adapters().versions]
            runs = _run_summaries(loop.data_dir / "training")
            version = service.adapter_version
            adapter = loop.store.get(version) if version else None
            repetitions = _after_rows(service, pair, eval_ids, adapter, ev, repeat)
            restored = service.adapter_version
        finally:
            loop.stop()
            service.stop(timeout=60)
    summary = loop.summary()
    rows = {"target_only": target_before, "before": before, **_median_repetition(repetitions)}
    shares = ratios(rows)
    for row in TARGET_OF:
        rows[row]["speedup_vs_target"] = shares[f"{row} / target"]
    rows["after"]["vs_without_adapter"] = shares["after / after_without_adapter"]
    return {
        **rows,
        "ratios": shares,
        "restored_adapter_version": restored,
        "adapters_installed": summary.counts.installed,
        "training_runs": summary.counts.runs,
        "last_run": summary.last_run.to_dict() if summary.last_run else None,
        "candidates": candidates,
        "runs": runs,
        "temperature": temperature,
        "train_requests": len(train_prompts),
        "eval_requests": len(eval_prompts),
        "holdout_fraction": s.buffer.holdout_fraction,
        "repeat": len(repetitions),
        "share_runs": [_share(r) for r in repetitions],
        "wall_s": time.perf_counter() - wall0,
    }


def _run_summaries(training_dir: Any) -> list[dict[str, Any]]:
    """Each training run's examples, synthetic rows, rehearsal, time and held-out agreement,
    from the result files the runs wrote (oldest first)."""
    from daemon.store.runs import RESULT_FILE, read_result

    out: list[dict[str, Any]] = []
    if not training_dir.is_dir():  # no run started
        return out
    for run_dir in sorted(p for p in training_dir.iterdir() if p.is_dir()):
        result = read_result(run_dir / RESULT_FILE)
        m = result.metrics
        if m is None:
            out.append({"run_id": run_dir.name, "status": result.status, "error": result.error})
            continue
        out.append(
            {
                "run_id": m.run_id,
                "status": result.status,
                "examples": m.examples.to_dict(),
                "synthetic": m.synthetic,
                "rehearsal": m.rehearsal,
                "steps": m.steps,
                "train_seconds": m.train_seconds,
                "wall_s": m.wall_s,
                "heldout_before": m.heldout_before.agreement,
                "heldout_after": m.heldout_after.agreement,
            }
        )
    return out


def run(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd bench adapt``: `bench_adapt` on the two prompt files, as a table."""
    origin = provenance()  # the code that ran: taken before the run, which can take an hour
    train = [p.messages for p in read_prompts(args.train_prompts, limit=args.train_limit)]
    eval_items = read_prompts(args.eval_prompts, limit=args.eval_limit)
    evals = [p.messages for p in eval_items]
    # broken down by the prompt file's "domain" field when every eval prompt has one
    domains = [p.meta.get("domain") for p in eval_items]
    groups = [str(d) for d in domains] if all(d is not None for d in domains) else None
    print(
        f"bench adapt: {len(train)} train prompts, {len(evals)} eval prompts, "
        f"max_tokens={args.max_tokens}, temperature={args.temperature}, min_failure_cases="
        f"{settings.training.min_failure_cases}"
    )
    result = bench_adapt(
        settings,
        train,
        evals,
        args.max_tokens,
        eval_groups=groups,
        temperature=args.temperature,
        repeat=args.repeat,
    )
    order = ("target_only", "before", "target_only_after", "after", "after_without_adapter")
    rows = {k: result[k] for k in order}
    for when in TARGET_OF:
        for g, m in result[when].get("by_group", {}).items():
            rows[f"{when}[{g}]"] = m
    print_table(
        rows,
        [
            "tokens_per_s",
            "speedup_vs_target",
            "vs_without_adapter",
            "acceptance_rate",
            "mean_accepted_length",
            "heldout_agreement",
            "adapter_version",
        ],
    )
    print(
        f"training runs: {result['training_runs']}, adapters installed: "
        f"{result['adapters_installed']}, wall: {result['wall_s']:.0f}s"
    )
    print(
        "tokens/s ratios: "
        + ", ".join(f"{name} {r:.3f}x" for name, r in result["ratios"].items())
        + " (the target as measured before / after the traffic; the last: the adapter's share)"
    )
    if result["repeat"] > 1:
        runs = result["share_runs"]
        print(
            f"adapter's share over {result['repeat']} repetitions: median "
            f"{result['ratios']['after / after_without_adapter']:.3f}x, "
            f"range {min(runs):.3f}-{max(runs):.3f}x"
        )
    for c in result["candidates"]:
        print(_candidate_line(c))
    write_json(args.json, {**result, "run": origin})
    return 0
