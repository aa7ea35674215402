"""Adapter store, hot swap and the adaptive loop end to end (tiny models, real subprocess)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from daemon.core.models import make_layer_skip_draft
from daemon.ops.status import format_status
from daemon.store.adapters import AdapterError, AdapterStore, apply_adapter, load_adapter_dir
from tests.helpers import HANG_GUARD_S, make_adapter, tiny_model, wait_until, write_model_dir


def test_store_versions_install_reject_rollback_and_prune(tmp_path: Path) -> None:
    target = tiny_model()
    store = AdapterStore(tmp_path / "adapters", keep=3)
    assert store.current_version() == 0 and store.versions() == []
    a1 = make_adapter(tmp_path / "a1", target, [0, 1], seed=1)
    v1 = store.add(a1, {"run_id": "r1"}, install=True)
    assert (v1.version, store.current_version(), v1.manifest["parent"]) == (1, 1, 0)
    assert v1.manifest["status"] == "installed"
    v2 = store.add(make_adapter(tmp_path / "a2", target, [0, 1], seed=2), {}, install=False)
    assert v2.status == "rejected" and store.current_version() == 1
    v3 = store.add(make_adapter(tmp_path / "a3", target, [0, 1], seed=3), {}, install=True)
    assert store.current_version() == 3 and v3.manifest["parent"] == 1
    store.verify(v3)
    assert store.rollback_target(None) == 1  # the installed version before the current
    with pytest.raises(AdapterError, match="rejected"):
        store.rollback_target(2)
    store.add(make_adapter(tmp_path / "a4", target, [0, 1], seed=4), {}, install=False)
    store.add(make_adapter(tmp_path / "a5", target, [0, 1], seed=5), {}, install=False)
    assert [v.version for v in store.versions()] == [3, 4, 5]  # keep=3, current kept
    assert not list((tmp_path / "adapters").glob(".incoming-*"))


def test_corrupt_adapter_is_refused(tmp_path: Path) -> None:
    target = tiny_model()
    store = AdapterStore(tmp_path / "adapters")
    v = store.add(make_adapter(tmp_path / "a", target, [0, 1], seed=1), {}, install=True)
    weights = v.path / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"garbage!")
    with pytest.raises(AdapterError, match="checksum mismatch"):
        store.verify(v)
    with pytest.raises(AdapterError, match="checksum"):
        store.set_current(v.version)


def test_apply_adapter_checks_shapes_and_never_touches_target(tmp_path: Path) -> None:
    target = tiny_model()
    tokens = mx.array([[1, 2, 3, 4]])
    ref = target(tokens)
    good = make_adapter(tmp_path / "good", target, [0, 1], seed=1)
    store = AdapterStore(tmp_path / "adapters")
    v = store.add(good, {}, install=True)
    plain = make_layer_skip_draft(target, [0, 1])
    adapted = apply_adapter(lambda: make_layer_skip_draft(target, [0, 1]), v)
    assert not mx.allclose(adapted(tokens), plain(tokens))
    assert mx.array_equal(target(tokens), ref)
    # An adapter trained for a different draft (3 layers, other rank) does not fit.
    other = store.add(
        make_adapter(tmp_path / "bad", target, [0, 1, 2], seed=2, rank=8), {}, install=False
    )
    with pytest.raises(AdapterError, match="does not fit"):
        apply_adapter(lambda: make_layer_skip_draft(target, [0, 1]), other)


# --------------------------------------------------------------------------------------------
# End to end: HTTP traffic -> failures -> training subprocess -> gate -> hot swap


WORDS = "the cat sat on a mat dog ran to park big small red blue and then".split()


@pytest.fixture
def daemon_setup(tmp_path: Path):
    model = write_model_dir(tmp_path / "tiny", WORDS, vocab_size=64, seed=7)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        json.dumps(
            {
                "models": {"target": str(model), "draft_layers": [0]},
                "server": {"port": 0},
                "sampling": {"max_tokens": 24},
                "buffer": {"holdout_fraction": 0.25, "failure_threshold": 0.9},
                "training": {
                    "min_failure_cases": 12,
                    "min_holdout_rows": 2,
                    "cooldown_seconds": 0,
                    "check_interval_seconds": 1,
                    "learning_rate": 0.003,
                    "warmup_steps": 0,
                    "epochs": 8,
                    "gradient_accumulation_steps": 1,
                    "batch_size": 4,
                    "replay_ratio": 0.0,
                    "min_improvement": 0.01,
                    # the tiny pair's steps are overhead-bound (a draft token costs about what a
                    # target step does), so no draft pays by expected speed: these tests check
                    # the loop under the agreement rule; test_loop runs the speed gate
                    "gate": "agreement",
                    "nice": 0,
                    "lora": {"rank": 8, "dropout": 0.0},
                },
            }
        )
    )
    return tmp_path, cfg


def greedy_tokens(srv, messages: list[dict[str, str]], max_tokens: int) -> list[int]:
    """The target's own greedy answer, by mlx-lm (not specd's engine), EOS included."""
    from mlx_lm.generate import generate_step

    from daemon.core.prompts import encode_prompt

    tok = srv.pair.tokenizer
    prompt = mx.array(encode_prompt(tok, messages))
    out: list[int] = []
    for token, _ in generate_step(prompt, srv.pair.target, max_tokens=max_tokens):
        out.append(int(token))
        if int(token) in tok.eos_token_ids:
            break
    return out


def prompts(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)]


def test_daemon_trains_gates_and_hot_swaps(daemon_setup) -> None:
    from openai import OpenAI

    from daemon.config import load_settings
    from daemon.core.evaluation import teacher_forced_agreement
    from daemon.server import Server

    tmp_path, cfg = daemon_setup
    settings, sources = load_settings(cfg, {"paths.data_dir": str(tmp_path / "data")})
    srv = Server(settings, sources)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_until(lambda: srv.ready.is_set() or not thread.is_alive(), "server start-up")
    assert srv.ready.is_set(), "server did not start"
    try:
        # No silent retries: a 5xx during the swap must show up as an error here.
        client = OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        loop = srv.adaptation
        buf = srv.service.buffer
        sent = 0
        for text in prompts(60, seed=1):  # until enough failures are pending
            client.chat.completions.create(
                model="specd", messages=[{"role": "user", "content": text}]
            )
            sent += 1
            srv.service.flush(HANG_GUARD_S)
            if buf.pending_failure_count() >= 12 and buf.count("holdout") >= 2:
                break
        holdout = [(r.prompt_tokens, r.output_tokens) for r in buf.holdout()]
        before = teacher_forced_agreement(srv.service.engine.draft, holdout).rate

        # A client streams while the run trains and the new adapter is swapped in. Greedy
        # decoding is lossless, so every stream must be the target's own answer, whichever
        # draft served it; each must report one adapter version, the one its record has.
        question = [{"role": "user", "content": "the big red dog"}]
        expected_tokens = greedy_tokens(srv, question, 24)
        eos = set(srv.pair.tokenizer.eos_token_ids)
        expected = srv.pair.tokenizer.decode([x for x in expected_tokens if x not in eos])
        streamed: list[tuple[str, int]] = []  # (text, usage adapter_version)
        errors: list[BaseException] = []
        trained = threading.Event()

        def stream_client() -> None:
            try:
                after_swap = 0
                while after_swap < 2:  # keep going until two requests ran after the run
                    after_swap += trained.is_set()
                    s = client.chat.completions.create(
                        model="specd",
                        stream=True,
                        max_tokens=24,
                        messages=question,  # type: ignore[arg-type]
                        stream_options={"include_usage": True},
                    )
                    chunks = list(s)
                    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                    usage = [c.usage for c in chunks if c.usage is not None]
                    assert len(usage) == 1, chunks
                    speculative = usage[0].model_dump()["speculative"]  # specd's extension
                    streamed.append((text, speculative["adapter_version"]))
            except BaseException as e:  # collected: the thread's failures fail the test
                errors.append(e)

        t = threading.Thread(target=stream_client)
        t.start()
        seen_progress: list[dict] = []  # what /status showed of the running run

        def run_counted() -> bool:
            st = httpx.get(srv.url + "/status").json()
            run = st["training"].get("run")
            if run and run["progress"]:
                seen_progress.append(st)
            return loop.summary().counts.runs > 0 or bool(errors)

        wait_until(run_counted, f"a finished training run: {loop.status()}", interval=0.1)
        trained.set()
        t.join(HANG_GUARD_S)
        assert not t.is_alive() and not errors, errors
        assert seen_progress, "the run's progress never showed in /status"
        run = seen_progress[-1]["training"]["run"]
        assert {"phase", "updated"} <= run["progress"].keys()
        text = format_status(srv.url, seen_progress[-1])
        assert f"run:     {run['run_id']} (min_failure_cases), {run['progress']['phase']}" in text
        last = loop.status().to_dict()["last_run"]
        assert last is not None and last["trigger"] == "min_failure_cases", last
        assert last["decision"] == "install", last
        assert srv.service.adapter_version == last["adapter_version"] == 1
        assert loop.store.current_version() == 1
        after = teacher_forced_agreement(srv.service.engine.draft, holdout).rate
        assert after > before
        assert streamed and all(text == expected for text, _ in streamed), (expected, streamed)
        versions = [v for _, v in streamed]
        assert versions[0] == 0 and versions[-1] == 1, versions  # swapped under load
        srv.service.flush(HANG_GUARD_S)
        records = [r for r in buf.iter_records() if r.prompt_text == "the big red dog"]
        assert all(r.output_tokens == expected_tokens for r in records)  # token for token
        # the version at the start of each request (usage) is the one at its end (record)
        assert [r.adapter_version for r in records] == versions
        st = httpx.get(srv.url + "/status").json()
        assert st["adapter_version"] == 1 and st["training"]["installed"] == 1
        # the version in service with the gate's figures (this test gates on agreement)
        in_service = st["training"]["in_service"]
        manifest = loop.store.get(1).manifest
        assert in_service["version"] == 1
        assert in_service["heldout_agreement"] == manifest["metrics_after"]["agreement"]
        assert "expected_speedup" in in_service
        assert "  adapter: v1, held-out agreement " in format_status(srv.url, st)
        assert st["buffer"]["used_for_training"] >= 12  # the run marked the failures it used

        # Roll back live, then forward again.
        r = httpx.post(srv.url + "/admin/adapters/rollback", json={})
        assert r.status_code == 200 and r.json() == {"previous_version": 1, "adapter_version": 0}
        assert srv.service.adapter_version == 0
        r = httpx.post(srv.url + "/admin/adapters/rollback", json={"version": 1})
        assert r.json()["adapter_version"] == 1
        r = httpx.post(srv.url + "/admin/adapters/rollback", json={"version": 7})
        assert r.status_code == 404 and "no adapter version 7" in r.json()["error"]["message"]
        listing = httpx.get(srv.url + "/admin/adapters").json()
        assert listing["current"] == 1 and listing["versions"][0]["status"] == "installed"
    finally:
        srv.handle_exit(15, None)
        thread.join(HANG_GUARD_S)
    assert srv.exit_code == 0
    # On restart the daemon loads the `current` adapter again.
    srv2 = Server(settings, sources)
    thread = threading.Thread(target=srv2.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: srv2.ready.is_set() or not thread.is_alive(), "server restart")
        assert srv2.ready.is_set()
        assert srv2.service.adapter_version == 1
    finally:
        srv2.handle_exit(15, None)
        thread.join(HANG_GUARD_S)


def test_cli_train_and_adapters_without_daemon(daemon_setup, capsys) -> None:
    from daemon.cli import main

    tmp_path, cfg = daemon_setup
    common = ["--config", str(cfg), "--data-dir", str(tmp_path / "data")]
    assert main(["adapters", "list", *common]) == 0
    assert "no adapters yet" in capsys.readouterr().out
    for text in prompts(30, seed=2):
        assert main(["collect", *common, "-p", text, "--in-process", "-q"]) == 0
    capsys.readouterr()
    assert main(["train", *common, "-q"]) == 0
    out = capsys.readouterr().out
    assert "training in a subprocess (no daemon running" in out
    assert "held-out agreement: before" in out
    assert "adapter: installed as v1" in out, out
    assert main(["adapters", "list", *common]) == 0
    out = capsys.readouterr().out
    assert "* v1" in out and "installed" in out

    # bench speed measures the draft with the current adapter, or an adapter directory
    prompt_file = tmp_path / "p.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in prompts(2, 5)))
    speed = [*common, "--prompts", str(prompt_file), "--max-tokens", "8"]
    assert main(["bench", "speed", *speed, "--adapter", "current"]) == 0
    assert "adapter=v1" in capsys.readouterr().out
    v1 = tmp_path / "data" / "adapters" / "v0001"
    assert main(["bench", "speed", *speed, "--adapter", str(v1)]) == 0
    assert f"adapter={v1}" in capsys.readouterr().out
    assert main(["bench", "speed", *speed, "--adapter", str(tmp_path / "nope")]) == 1
    assert f"adapter {tmp_path / 'nope'} does not fit the draft" in capsys.readouterr().err

    assert main(["adapters", "rollback", *common]) == 0
    assert "adapter v1 -> v0" in capsys.readouterr().out
    assert main(["adapters", "rollback", "5", *common]) == 1
    assert "no adapter version 5" in capsys.readouterr().err
    assert main(["bench", "speed", *speed, "--adapter", "current"]) == 1
    assert "no current adapter in" in capsys.readouterr().err


def test_bench_adapt_reports_before_and_after(daemon_setup, capsys) -> None:
    from daemon.cli import main

    tmp_path, cfg = daemon_setup
    train, evals, out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl", tmp_path / "out.json"
    train.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in prompts(40, seed=3)))
    groups = ["a", "a", "b", "a", "b", "b"]
    evals.write_text(
        "".join(
            json.dumps({"prompt": t, "domain": g}) + "\n"
            for t, g in zip(prompts(6, seed=4), groups, strict=True)
        )
    )
    args = ["--config", str(cfg), "--data-dir", str(tmp_path / "data"), "--max-tokens", "16"]
    args += ["--train-prompts", str(train), "--eval-prompts", str(evals), "--json", str(out)]
    assert main(["bench", "adapt", *args, "--repeat", "2"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = ("target_only", "target_only_after", "before", "after", "after_without_adapter")
    assert set(result) >= {
        *rows,
        "ratios",
        "adapters_installed",
        "training_runs",
        "train_requests",
        "eval_requests",
        "wall_s",
        "run",
    }
    assert result["train_requests"] == 40 and result["eval_requests"] == 6
    assert result["holdout_fraction"] == 0.25  # enough for min_holdout_rows=2 already
    # the file names its commit, machine and command
    assert {"commit", "machine", "command"} <= set(result["run"])
    assert result["run"]["machine"]["cpus"] and isinstance(result["run"]["command"], str)
    # every stored candidate with its gate decision (a failed run stores none) and figures
    assert 1 <= len(result["candidates"]) <= result["training_runs"]
    assert all(c["gate"]["decision"] in ("install", "reject") for c in result["candidates"])
    for c in result["candidates"]:
        agree = f"{c['gate']['heldout_before']:.4f} -> {c['gate']['heldout_after']:.4f}"
        assert f"v{c['version']} {c['status']}: expected speedup -, held-out agreement {agree}" in (
            printed
        )
    assert result["training_runs"] >= 1 and result["adapters_installed"] >= 1
    # each run's own figures, read from the result file it wrote
    assert len(result["runs"]) == result["training_runs"]
    assert all(r["status"] == "ok" and r["examples"]["failures"] > 0 for r in result["runs"])
    for row in ("before", "after", "after_without_adapter"):
        assert {
            "tokens_per_s",
            "acceptance_rate",
            "mean_accepted_length",
            "speedup_vs_target",
            "heldout_agreement",
        } <= set(result[row])
        by_group = result[row]["by_group"]
        assert set(by_group) == {"a", "b"}
        assert sum(g["tokens"] for g in by_group.values()) == result[row]["tokens"]
        assert all(0.0 <= g["heldout_agreement"] <= 1.0 for g in by_group.values())
        rates = [g["heldout_agreement"] for g in by_group.values()]  # overall: their weighted mean
        assert min(rates) <= result[row]["heldout_agreement"] <= max(rates)
    # greedy: the target alone gives the same tokens before and after the traffic
    assert result["target_only_after"]["tokens"] == result["target_only"]["tokens"]
    tps = {row: result[row]["tokens_per_s"] for row in rows}
    # each engine row over the target measured next to it; the share over the plain draft
    assert result["before"]["speedup_vs_target"] == pytest.approx(
        tps["before"] / tps["target_only"]
    )
    for row in ("after", "after_without_adapter"):
        assert result[row]["speedup_vs_target"] == pytest.approx(
            tps[row] / tps["target_only_after"]
        )
    share = tps["after"] / tps["after_without_adapter"]
    assert result["ratios"]["after / after_without_adapter"] == pytest.approx(share)
    assert result["after"]["vs_without_adapter"] == pytest.approx(share)
    # two repetitions after the traffic: the rows are the one with the lower share
    assert result["repeat"] == 2 and len(result["share_runs"]) == 2
    assert share == pytest.approx(min(result["share_runs"]))
    assert "adapter's share over 2 repetitions" in printed
    assert result["ratios"]["after / target"] == pytest.approx(
        tps["after"] / tps["target_only_after"]
    )
    assert result["ratios"]["before / target"] == pytest.approx(tps["before"] / tps["target_only"])
    for name, r in result["ratios"].items():
        assert f"{name} {r:.3f}x" in printed
    assert "after_without_adapter[a]" in printed and "target_only_after" in printed
    assert result["after"]["adapter_version"] >= 1
    assert result["after"]["heldout_agreement"] > result["before"]["heldout_agreement"]
    # without the adapter: the plain draft, scored as before the traffic; then put back
    assert result["after_without_adapter"]["adapter_version"] == 0
    assert result["after_without_adapter"]["heldout_agreement"] == pytest.approx(
        result["before"]["heldout_agreement"]
    )
    assert result["restored_adapter_version"] == result["after"]["adapter_version"]
    assert not (tmp_path / "data" / "buffer.sqlite").exists()  # a private data dir was used


def test_bench_adapt_ratios_are_over_the_rows_measured_next_to_them() -> None:
    from daemon.bench.adapt import ratios

    # distinct speeds, so that a ratio taken over any other row gives another number
    rows = {
        "target_only": {"tokens_per_s": 10.0},
        "target_only_after": {"tokens_per_s": 8.0},
        "before": {"tokens_per_s": 12.0},
        "after": {"tokens_per_s": 20.0},
        "after_without_adapter": {"tokens_per_s": 16.0},
    }
    assert ratios(rows) == {
        "before / target": 1.2,
        "after / target": 2.5,
        "after_without_adapter / target": 2.0,
        "after / after_without_adapter": 1.25,
    }
    del rows["after_without_adapter"]
    with pytest.raises(KeyError):
        ratios(rows)


def test_bench_adapt_repeated_reports_the_median_repetition_whole() -> None:
    from daemon.bench.adapt import _median_repetition

    def rep(after: float, without: float, target: float) -> dict:
        return {
            "after": {"tokens_per_s": after},
            "after_without_adapter": {"tokens_per_s": without},
            "target_only_after": {"tokens_per_s": target},
        }

    # shares 1.5, 1.0, 1.2: the median is the third, with its own target measurement
    reps = [rep(15.0, 10.0, 7.0), rep(10.0, 10.0, 8.0), rep(12.0, 10.0, 9.0)]
    assert _median_repetition(reps) == reps[2]
    assert _median_repetition(reps[:2]) == reps[1]  # an even count: the lower middle
    with pytest.raises(ValueError, match="repeat must be at least 1"):
        from daemon.bench.adapt import bench_adapt

        bench_adapt(None, [], [], 8, repeat=0)


def test_bench_repeat_counts_are_refused_at_the_command_line(capsys) -> None:
    from daemon.cli import build_parser

    parser = build_parser()
    adapt = ["bench", "adapt", "--train-prompts", "a", "--eval-prompts", "b"]
    assert parser.parse_args([*adapt, "--repeat", "3"]).repeat == 3
    for command in (adapt, ["bench", "speed"]):
        for bad in ("0", "-1", "two", "2,3"):
            with pytest.raises(SystemExit):
                parser.parse_args([*command, "--repeat", bad])
            assert "expected a number of repetitions, at least 1" in capsys.readouterr().err


def test_bench_adapt_lists_each_candidates_expected_speedup_and_agreement() -> None:
    from daemon.bench.adapt import _candidate_line

    speed = {"before": {"k": 0, "speedup": 1.0}, "after": {"k": 1, "speedup": 1.178}}
    gate = {"decision": "install", "reason": "r", "heldout_before": 0.0281, "heldout_after": 0.4}
    line = _candidate_line({"version": 2, "status": "installed", "gate": {**gate, "speed": speed}})
    assert line == (
        "v2 installed: expected speedup 1.000 -> 1.178, held-out agreement 0.0281 -> 0.4000: r"
    )
    # gate: agreement computes no expected speedup; a failed run no scores
    line = _candidate_line({"version": 1, "status": "rejected", "gate": gate})
    assert "expected speedup -, held-out agreement 0.0281 -> 0.4000" in line
    assert "agreement -: None" in _candidate_line({"version": 3, "status": "rejected"})


def test_bench_provenance_names_commit_machine_and_command(monkeypatch) -> None:
    from daemon.bench.report import provenance

    monkeypatch.setenv("SPECD_TRAINING__REHEARSAL_TOKENS", "4096")
    monkeypatch.setenv("OTHER_VARIABLE", "x")
    run = provenance()
    # settings given as environment overrides are named; nothing else of the environment
    assert run["environment"]["SPECD_TRAINING__REHEARSAL_TOKENS"] == "4096"
    assert all(k.startswith("SPECD_") for k in run["environment"])
    assert run["commit"] is None or len(run["commit"]) == 40
    assert run["machine"]["platform"] and run["machine"]["cpus"]
    assert run["machine"]["backend"]["device"] == "cpu" and run["machine"]["backend"]["blas"]
    assert isinstance(run["command"], str) and run["command"]


def test_bench_adapt_eval_traffic_samples_at_the_temperature() -> None:
    from daemon.bench.adapt import _eval_engine
    from daemon.core.engine import GenerationResult, GenerationStats

    seen: list[dict] = []

    class Service:
        def generate(self, messages, record=True, **params):
            seen.append({"record": record, **params})
            stats = GenerationStats(generation_tokens=4, drafted=4, accepted=2, num_drafts=2)
            return GenerationResult(text="x", tokens=[1, 2, 3, 4], stats=stats)

    out = _eval_engine(Service(), [[{"role": "user", "content": "a"}]] * 3, 8, temperature=0.7)
    assert [s["temperature"] for s in seen] == [0.7] * 3 and not any(s["record"] for s in seen)
    assert out["tokens"] == 12 and out["acceptance_rate"] == 0.5


# --------------------------------------------------------------------------------------------
# The served draft has its adapter fused


def _adapter_layers(model) -> list[str]:
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    kinds = (LoRALinear, LoRAEmbedding, LoRASwitchLinear, DoRALinear, DoRAEmbedding)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def _snapshot(model) -> dict[str, tuple[int, np.ndarray]]:
    """Each parameter's array object id and a copy of its values."""
    return {k: (id(v), np.array(v)) for k, v in tree_flatten(model.parameters())}


def _assert_unchanged(model, snapshot: dict[str, tuple[int, np.ndarray]]) -> None:
    now = dict(tree_flatten(model.parameters()))
    assert now.keys() == snapshot.keys()
    for k, (ident, values) in snapshot.items():
        assert id(now[k]) == ident, k
        assert np.array_equal(np.array(now[k]), values), k


def test_apply_adapter_serves_the_adapter_fused(tmp_path: Path) -> None:
    """The served draft has no LoRA layers left, computes what the unfused adapter does, and
    its fused weights are new arrays: the target it shares its bare weights with is unchanged."""
    target = tiny_model()
    tokens = mx.array([[1, 2, 3, 4, 5, 6]])
    ref = target(tokens)
    mx.eval(ref)
    before = _snapshot(target)
    store = AdapterStore(tmp_path / "adapters")
    v = store.add(make_adapter(tmp_path / "a", target, [0, 2], seed=1), {}, install=True)
    weights = (v.path / "adapters.safetensors").read_bytes()

    def factory():
        return make_layer_skip_draft(target, [0, 2])

    fused = apply_adapter(factory, v)
    unfused = load_adapter_dir(factory, v.path, fuse=False)
    assert _adapter_layers(fused) == []
    assert len(_adapter_layers(unfused)) == 2 * 7  # every linear of both blocks
    out = fused(tokens)
    assert mx.allclose(out, unfused(tokens), atol=1e-4)
    assert not mx.allclose(out, factory()(tokens), atol=1e-2)  # the adapter does something
    # new arrays for the adapted weights; the target's arrays, values and outputs as they were
    assert (
        fused.model.layers[1].mlp.down_proj.weight
        is not target.model.layers[2].mlp.down_proj.weight
    )
    assert fused.model.embed_tokens.weight is target.model.embed_tokens.weight  # not adapted
    _assert_unchanged(target, before)
    assert mx.array_equal(target(tokens), ref)
    assert (v.path / "adapters.safetensors").read_bytes() == weights  # the stored files stay


def test_fused_adapter_keeps_quantized_layers_quantized(tmp_path: Path) -> None:
    """On a quantized target the fused layers (embedding included) are quantized like the base
    ones, and match the unfused adapter to within re-quantization error."""
    import mlx.nn as nn

    from daemon.adaptation.lora import apply_lora
    from daemon.config import LoraSettings
    from daemon.store.adapters import save_adapter

    target = tiny_model()
    nn.quantize(target, group_size=32, bits=8)
    mx.eval(target.parameters())
    tokens = mx.array([[1, 2, 3, 4, 5, 6]])
    ref = target(tokens)
    mx.eval(ref)
    before = _snapshot(target)

    def factory():
        return make_layer_skip_draft(target, [1, 3])

    draft = factory()
    mx.random.seed(3)
    keys = ["self_attn.q_proj", "mlp.down_proj", "model.embed_tokens"]
    config = apply_lora(draft, LoraSettings(rank=4, dropout=0.0, keys=keys))
    draft.update(
        tree_unflatten(
            [
                (k, mx.random.normal(p.shape) * 0.1)
                for k, p in tree_flatten(draft.trainable_parameters())
            ]
        )
    )
    save_adapter(draft, tmp_path / "q", config)

    fused = load_adapter_dir(factory, tmp_path / "q")
    unfused = load_adapter_dir(factory, tmp_path / "q", fuse=False)
    assert _adapter_layers(fused) == []
    assert sorted(_adapter_layers(unfused)) == [
        "model.embed_tokens",
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert isinstance(fused.model.embed_tokens, nn.QuantizedEmbedding)
    for layer in fused.model.layers:
        assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear)
        assert isinstance(layer.mlp.down_proj, nn.QuantizedLinear)
        assert layer.self_attn.q_proj.bits == 8 and layer.self_attn.q_proj.group_size == 32
    out, want = fused(tokens), unfused(tokens)
    assert mx.allclose(out, want, atol=0.05), mx.abs(out - want).max()
    assert not mx.allclose(out, factory()(tokens), atol=0.05)
    _assert_unchanged(target, before)
    assert mx.array_equal(target(tokens), ref)


# --------------------------------------------------------------------------------------------
# Several models: each draft trains on its own model's traffic and swaps on its own


def start_in_process(cfg: Path, data: Path, **overrides):
    """A `Server` on ``cfg`` in a thread of this process, until ready."""
    from daemon.config import load_settings
    from daemon.server import Server

    settings, sources = load_settings(cfg, {"paths.data_dir": str(data), **overrides})
    srv = Server(settings, sources)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_until(lambda: srv.ready.is_set() or not thread.is_alive(), "server start-up")
    assert srv.ready.is_set(), "server did not start"
    return srv, thread


def test_two_models_each_adapt_on_their_own_traffic(daemon_setup) -> None:
    from openai import OpenAI

    tmp_path, cfg = daemon_setup
    coder = write_model_dir(tmp_path / "coder", WORDS, vocab_size=64, seed=8)
    config = json.loads(cfg.read_text())
    config["models"]["targets"] = {"coder": {"target": str(coder)}}
    # one run per model: one that pends its failures faster would otherwise run again while
    # the other catches up, and a second run may be rejected (or installed as v2)
    config["training"]["cooldown_seconds"] = 600
    cfg.write_text(json.dumps(config))
    srv, thread = start_in_process(cfg, tmp_path / "data")
    chat = srv.service.primary.name
    loops = {chat: srv.adaptation, "coder": srv.adaptations["coder"]}
    try:
        client = OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        buf = srv.service.buffer
        mine = {name: buf.for_target(srv.service.runtimes[name].target_id) for name in loops}
        for text in prompts(160, seed=1):  # interleaved, until both have runs' worth
            for name in loops:
                client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": text}]
                )
            srv.service.flush(HANG_GUARD_S)
            if all(loop.summary().counts.runs for loop in loops.values()):
                break
        wait_until(
            lambda: all(loop.summary().counts.runs for loop in loops.values()),
            "a finished run for each model",
        )
        for name, loop in loops.items():
            last = loop.summary().last_run
            assert last is not None and last.gate.decision == "install", (name, last)
            assert srv.service.runtimes[name].adapter_version == 1
        # each model's adapters and runs live apart; each run read its own model's rows only
        assert loops[chat].store.root == tmp_path / "data" / "adapters"
        assert loops["coder"].store.root.parent.parent == tmp_path / "data" / "targets"
        for name, loop in loops.items():
            runs = {p.name for p in (loop.data_dir / "training").iterdir()}
            used = {r.used_for_training for r in mine[name].iter_records()} - {None}
            assert used and used <= runs, (name, used, runs)
        # a request reports the version of its own model's adapter
        out = client.chat.completions.create(
            model="coder", messages=[{"role": "user", "content": "the cat"}]
        )
        assert out.usage is not None
        assert out.usage.model_extra["speculative"]["adapter_version"] == 1
        # rolled back for one model, the other keeps its draft
        r = httpx.post(srv.url + "/admin/adapters/rollback", json={"model": "coder"})
        assert r.status_code == 200 and r.json()["adapter_version"] == 0
        assert srv.service.runtimes["coder"].adapter_version == 0
        assert srv.service.runtimes[chat].adapter_version == 1
        listing = httpx.get(srv.url + "/admin/adapters", params={"model": "coder"}).json()
        assert listing["current"] == 0 and listing["versions"][0]["version"] == 1
        r = httpx.post(srv.url + "/admin/adapters/rollback", json={"model": "nope"})
        assert r.status_code == 404 and "coder" in r.json()["error"]["message"]
        st = httpx.get(srv.url + "/status").json()
        assert st["training_models"]["coder"]["installed"] == 1
    finally:
        srv.handle_exit(15, None)
        thread.join(HANG_GUARD_S)
    assert srv.exit_code == 0
