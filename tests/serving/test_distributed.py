"""`specd serve` as a group of ranks on loopback (MLX's ring backend), the target split
tensor-parallel or by layers: the same answers as one process, adapters swapped live on rank
0, and a rank that dies or stops answering ends the others with an error naming it.

Every process here is bounded: each wait gives up after a fixed time and the processes are
killed in ``finally``, whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlx_lm import load

from daemon.ops.status import format_status
from daemon.store.adapters import AdapterStore
from tests.helpers import (
    clean_env,
    free_ports,
    make_adapter,
    read_log,
    serve_command,
    write_hostfile,
    write_model_dir,
)

LAUNCH = Path(sys.executable).parent / "mlx.launch"
BOUND_S = 120.0  # nothing here may take longer than this; a guard against a hang
RANK_TIMEOUT_S = 3.0
LAYERS = [0, 3]

pytestmark = pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed")

GREEDY = {"prompt": "w1 w2 w3 w4", "max_tokens": 24, "temperature": 0}
SAMPLED = {"prompt": "w7 w8", "max_tokens": 24, "temperature": 0.9, "seed": 11}
# the next turn of GREEDY's conversation: it starts from GREEDY's kept KV caches
FOLLOW_UP = {"prompt": "w1 w2 w3 w4 w9 w10 w11", "max_tokens": 16, "temperature": 0}
# a prefill longer than one message holds inline (its tokens follow in a second collective)
LONG = {"prompt": " ".join(f"w{i % 57 + 2}" for i in range(150)), "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4 attention heads, 2 KV heads, MLP 64: splits two ways. A sharp head keeps argmax
    # margins clear of the rounding a split matmul changes.
    root = tmp_path_factory.mktemp("group-model")
    return write_model_dir(
        root / "tiny", [f"w{i}" for i in range(60)], vocab_size=64, seed=3, lm_head_scale=8.0
    )


def _config(
    tmp: Path,
    model: Path | None,
    port: int,
    training: bool = False,
    rank_timeout: float = RANK_TIMEOUT_S,
    **models: Any,
) -> Path:
    """A config for ``model`` (None: the embedded one) with more ``models.*`` keys."""
    cfg = tmp / "config.yaml"
    target = {"target": str(model), "draft_layers": LAYERS} if model is not None else {}
    config: dict[str, Any] = {
        "models": {**target, **models},
        "server": {"port": port, "rank_timeout_seconds": rank_timeout},
        # a loop that never trains by itself: it is here for its admin endpoints
        "training": {"enabled": training, "min_failure_cases": 100000},
    }
    cfg.write_text(json.dumps(config))
    return cfg


def _popen(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # mlx.launch's ranks die with its group
    )


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(BOUND_S)


def _wait_ready(url: str, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        for p, log in zip(procs, logs, strict=True):
            if p.poll() is not None:
                raise AssertionError(f"exited early ({p.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).json().get("status") == "ok":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError("not ready:\n" + "\n".join(log.read_text()[-2000:] for log in logs))


def _complete(url: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(url + "/v1/completions", json=body, timeout=BOUND_S)
    assert r.status_code == 200, r.text
    return r.json()


def _store_adapter(data: Path, model_dir: Path, tmp: Path) -> None:
    """An installed adapter v1 for the layer-skip draft, as a training run would leave it."""
    target = load(str(model_dir))[0]
    store = AdapterStore.for_data_dir(data)
    store.add(make_adapter(tmp / "adapter", target, LAYERS, seed=5), {"run_id": "t"}, True)


@pytest.mark.parametrize("split", ["tensor", "pipeline"])
def test_group_answers_like_one_process_and_swaps_adapters(
    tmp_path: Path, model_dir: Path, split: str
) -> None:
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    single_data, group_data = tmp_path / "single", tmp_path / "group"
    for data in (single_data, group_data):
        _store_adapter(data, model_dir, tmp_path / data.name)
    cfg = _config(tmp_path, model_dir, port, training=True, split=split)

    single_log = tmp_path / "single.log"
    proc = _popen(serve_command(cfg, single_data), single_log, clean_env())
    try:
        _wait_ready(url, [proc], [single_log])
        alone = [_complete(url, b) for b in (GREEDY, FOLLOW_UP, SAMPLED, LONG)]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(BOUND_S)
        finally:
            _kill(proc)

    group_log = tmp_path / "group.log"
    launch = [str(LAUNCH), "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1", "--"]
    proc = _popen(launch + serve_command(cfg, group_data), group_log, clean_env())
    try:
        _wait_ready(url, [proc], [group_log])
        st = httpx.get(url + "/status", timeout=BOUND_S).json()
        group = st["distributed"]
        assert (group["size"], group["rank"], group["backend"]) == (2, 0, "ring")
        said = {"tensor": "tensor-parallel over 2", "pipeline": "pipeline over 2 ranks (layers"}
        assert len(group["hosts"]) == 2 and group["split"].startswith(said[split])
        assert "  group:   2 ranks (ring): rank 0 " in format_status(url, st)
        assert st["adapter_version"] == 1  # the installed adapter, on rank 0's draft

        together = [_complete(url, b) for b in (GREEDY, FOLLOW_UP, SAMPLED, LONG)]
        for a, b in zip(alone, together, strict=True):
            assert a["choices"][0]["text"] == b["choices"][0]["text"]
        assert together[0]["usage"]["speculative"]["adapter_version"] == 1
        # the follow-up reused the prompt cache on every rank, and still answered the same
        cached = together[1]["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached > 0 and cached == alone[1]["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert together[0]["usage"]["speculative"]["drafted"] > 0

        # a live swap between requests: the group goes on answering the same, on v0
        r = httpx.post(url + "/admin/adapters/rollback", json={"version": 0}, timeout=BOUND_S)
        assert r.status_code == 200 and r.json()["adapter_version"] == 0, r.text
        again = _complete(url, GREEDY)
        assert again["choices"][0]["text"] == alone[0]["choices"][0]["text"]
        assert again["usage"]["speculative"]["adapter_version"] == 0
        messages = httpx.get(url + "/status", timeout=BOUND_S).json()["distributed"]["messages"]
        assert messages > group["messages"]  # the forwards reached the other rank

        # a training run on rank 0, reading only the draft's share of the split target
        r = httpx.post(url + "/admin/train", json={"max_steps": 2}, timeout=BOUND_S)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + BOUND_S
        while (last := httpx.get(url + "/status").json()["training"]["last_run"]) is None:
            assert time.monotonic() < deadline, "the training run never finished"
            time.sleep(0.3)
        assert last["decision"] in ("install", "reject"), last
        after = _complete(url, GREEDY)  # whichever draft serves now, the answer is the same
        assert after["choices"][0]["text"] == alone[0]["choices"][0]["text"]

        rank0 = int(json.loads((group_data / "runtime.json").read_text())["pid"])
        os.kill(rank0, signal.SIGTERM)  # rank 0 stops, and tells rank 1 to stop
        proc.wait(BOUND_S)
    finally:
        _kill(proc)
    records = read_log(group_data / "logs" / "specd.log")
    started = next(r for r in records if r["event"] == "train_process_start")
    assert "--draft-only" in started["argv"]
    assert any(r["event"] == "train_run" for r in records)
    assert "stopped" in [r["event"] for r in records]
    assert "rank_lost" not in [r["event"] for r in records]
    assert all(r.get("rank", 0) == 0 for r in records)  # rank 1 writes nothing there
    rank1 = [json.loads(line) for line in group_log.read_text().splitlines() if '"rank": 1' in line]
    assert [r["event"] for r in rank1][-1] == "stopped", rank1  # told to stop, not lost
    assert rank1[-1]["forwards"] > 0


def _requests(max_tokens: int) -> list[dict[str, Any]]:
    """GREEDY, FOLLOW_UP, SAMPLED and LONG, each answer at most ``max_tokens`` long."""
    return [
        {**b, "max_tokens": min(b["max_tokens"], max_tokens)}
        for b in (GREEDY, FOLLOW_UP, SAMPLED, LONG)
    ]


def _answers_alone(
    url: str, cfg: Path, data: Path, log: Path, max_tokens: int = 64
) -> list[dict[str, Any]]:
    """`_requests` answered by one process."""
    proc = _popen(serve_command(cfg, data), log, clean_env())
    try:
        _wait_ready(url, [proc], [log])
        return [_complete(url, b) for b in _requests(max_tokens)]
    finally:
        _kill(proc)


def _answers_launched(
    url: str, cfg: Path, data: Path, log: Path, ranks: int, max_tokens: int = 64
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The same requests answered by ``ranks`` ranks under mlx.launch, and /status."""
    launch = [str(LAUNCH), "--backend", "ring", "-n", str(ranks), "--hosts", "127.0.0.1", "--"]
    proc = _popen(launch + serve_command(cfg, data), log, clean_env())
    try:
        _wait_ready(url, [proc], [log])
        answers = [_complete(url, b) for b in _requests(max_tokens)]
        return answers, httpx.get(url + "/status", timeout=BOUND_S).json()
    finally:
        _kill(proc)


def _same_answers(alone: list[dict[str, Any]], together: list[dict[str, Any]]) -> None:
    for a, b in zip(alone, together, strict=True):
        assert a["choices"][0]["text"] == b["choices"][0]["text"]
    cached = together[1]["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and cached == alone[1]["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_three_ranks_split_by_layers_answer_like_one_process(
    tmp_path: Path, model_dir: Path
) -> None:
    # 4 attention heads: no tensor split three ways; by layers, 3 + 2 + 1 of its 6
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    cfg = _config(tmp_path, model_dir, port, split="pipeline", split_layers=[3, 2, 1])
    alone = _answers_alone(url, cfg, tmp_path / "single", tmp_path / "single.log")
    together, st = _answers_launched(url, cfg, tmp_path / "group", tmp_path / "group.log", 3)
    _same_answers(alone, together)
    assert st["distributed"]["split"].startswith("pipeline over 3 ranks (layers 3/2/1")
    assert together[0]["usage"]["speculative"]["drafted"] > 0


def test_the_embedded_model_serves_on_two_ranks_split_by_layers(
    tmp_path: Path, smollm_pair: Any
) -> None:
    # SmolLM2: 9 heads, 3 KV heads, no tensor split two ways; auto splits it by layers in
    # proportion to each rank's free memory
    from daemon.core.models import EMBEDDED_DIRNAME

    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    # two ranks of a 135M model on two shared cores: slow forwards, not a silent rank
    cfg = _config(tmp_path, None, port, rank_timeout=60.0)
    imported = Path(smollm_pair.target_path)
    for data in (tmp_path / "single", tmp_path / "group"):  # the import, done once
        (data / "models").mkdir(parents=True)
        (data / "models" / EMBEDDED_DIRNAME).symlink_to(imported)
    alone = _answers_alone(url, cfg, tmp_path / "single", tmp_path / "single.log", 12)
    together, st = _answers_launched(
        url, cfg, tmp_path / "group", tmp_path / "group.log", 2, max_tokens=12
    )
    _same_answers(alone, together)
    split = st["distributed"]["split"]
    assert split.startswith("pipeline over 2 ranks (layers ") and "auto" in split, split
    counts = [int(c) for c in split.split("layers ")[1].split(";")[0].rstrip(")").split("/")]
    assert len(counts) == 2 and sum(counts) == 30 and min(counts) >= 1


def _start_ranks(
    tmp: Path, cfg: Path, data: Path, rank1_env: dict[str, str] | None = None
) -> list[subprocess.Popen]:
    """Two ranks started by hand from one hostfile, as two service managers would: no
    launcher that kills the survivor for us. ``rank1_env``: more variables for rank 1."""
    hostfile = write_hostfile(tmp / "hosts.json", 2)
    extra = rank1_env or {}
    return [
        _popen(
            serve_command(cfg, data),
            tmp / f"rank{r}.log",
            clean_env(MLX_HOSTFILE=str(hostfile), MLX_RANK=str(r), **(extra if r else {})),
        )
        for r in range(2)
    ]


def test_a_prompt_cache_entry_one_rank_evicted_costs_prefill_not_a_wrong_answer(
    tmp_path: Path, model_dir: Path
) -> None:
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    cfg = _config(tmp_path, model_dir, port, split="pipeline")
    first = {"prompt": "w5 w6 w7 w8 w9", "max_tokens": 12, "temperature": 0}
    other = {"prompt": "w30 w31 w32", "max_tokens": 12, "temperature": 0}
    again = {"prompt": "w5 w6 w7 w8 w9 w40 w41", "max_tokens": 12, "temperature": 0}

    alone_log = tmp_path / "alone.log"
    proc = _popen(serve_command(cfg, tmp_path / "alone"), alone_log, clean_env())
    try:
        _wait_ready(url, [proc], [alone_log])
        alone = [_complete(url, b) for b in (first, other, again)]
    finally:
        _kill(proc)
    assert alone[2]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0

    # rank 1 keeps one entry, rank 0 ten: by the third request rank 1 has dropped the first
    procs = _start_ranks(
        tmp_path, cfg, tmp_path / "group", {"SPECD_SERVER__PROMPT_CACHE_SIZE": "1"}
    )
    logs = [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    try:
        _wait_ready(url, procs, logs)
        together = [_complete(url, b) for b in (first, other, again)]
    finally:
        for p in procs:
            _kill(p)
    for a, b in zip(alone, together, strict=True):
        assert a["choices"][0]["text"] == b["choices"][0]["text"]
    # rank 0 found the first request's entry, rank 1 did not: they started from nothing
    assert together[2]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def _exit_within(proc: subprocess.Popen, seconds: float) -> tuple[int, float]:
    t0 = time.monotonic()
    code = proc.wait(seconds)
    return code, time.monotonic() - t0


@pytest.mark.parametrize(
    "fault, split",
    [
        ("rank 1 dies", "tensor"),
        ("rank 1 dies", "pipeline"),
        ("rank 1 stops answering", "pipeline"),
        ("rank 0 dies", "pipeline"),
    ],
)
def test_a_lost_rank_ends_the_other_with_an_error_naming_it(
    tmp_path: Path, model_dir: Path, fault: str, split: str
) -> None:
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    cfg = _config(tmp_path, model_dir, port, split=split)
    data = tmp_path / "data"
    procs = _start_ranks(tmp_path, cfg, data)
    logs = [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    try:
        _wait_ready(url, procs, logs)
        _complete(url, GREEDY)
        victim, survivor = (procs[0], procs[1]) if fault == "rank 0 dies" else (procs[1], procs[0])
        if fault == "rank 1 stops answering":
            victim.send_signal(signal.SIGSTOP)
        else:
            victim.kill()
        # bounded: a dead peer fails the next collective at once, a silent one within
        # rank_timeout_seconds (the idle heartbeat comes every quarter of it)
        code, _ = _exit_within(survivor, RANK_TIMEOUT_S * 2 + 30)
        assert code == 1
        survivor_log = logs[procs.index(survivor)]
        errors = [
            json.loads(line)
            for line in survivor_log.read_text().splitlines()
            if line.startswith("{") and '"level": "error"' in line
        ]
        assert errors, survivor_log.read_text()[-2000:]
        message = errors[-1]["error"]
        lost = "rank 0" if fault == "rank 0 dies" else "rank 1"
        assert lost in message, message
        expected = "rank_timeout" if fault == "rank 1 stops answering" else "rank_lost"
        assert errors[-1]["event"] == expected, errors
        if survivor is procs[0]:
            assert not (data / "runtime.json").exists()  # rank 0 cleaned up as it left
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            _kill(p)
