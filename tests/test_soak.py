"""A 500-request soak against a real daemon process: streaming, cancelled, cached, sampled and
batched requests mixed. No 5xx, resident memory after the last request within 10% of after the
50th, and every completed request in the replay buffer."""

from __future__ import annotations

import collections
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from daemon.store.buffer import ReplayBuffer
from tests.helpers import HANG_GUARD_S, start_daemon, stop_daemon, wait_for_event, write_model_dir

REQUESTS = 500
WAVE = 50
CLIENTS = 6
WORDS = [f"w{i}" for i in range(38)]  # every id of the 40-token vocabulary has text


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def one_request(url: str, i: int) -> tuple[str, int, str | None]:
    """Request ``i`` of the mix: (kind, HTTP status, the complete answer's text or None)."""
    kind = ("stream", "cancel", "cached", "sampled", "stop")[i % 5]
    words = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 11))
    with httpx.Client(base_url=url, timeout=HANG_GUARD_S) as c:
        if kind in ("stream", "cancel", "stop"):
            body: dict = {"prompt": words, "max_tokens": 24, "stream": True}
            if kind == "stop":
                body["stop"] = ["w3"]
            with c.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    return kind, r.status_code, None
                text = ""
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        return kind, 500, None
                    for choice in event.get("choices") or []:
                        text += choice.get("text") or ""
                    if kind == "cancel":  # hang up after the first event
                        return kind, r.status_code, None
                return kind, r.status_code, text
        if kind == "cached":  # one long conversation prefix, a new last turn each time
            messages = [
                {"role": "user", "content": " ".join(WORDS * 3)},
                {"role": "assistant", "content": "w1 w2 w3"},
                {"role": "user", "content": words},
            ]
            r = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 16})
            text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
            return kind, r.status_code, text
        body = {"prompt": words, "max_tokens": 16, "temperature": 0.8, "seed": i}
        r = c.post("/v1/completions", json=body)
        return kind, r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else None


@pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads resident memory from /proc (Linux)"
)
def test_soak_500_mixed_requests(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "tiny", WORDS, vocab_size=40, seed=5)
    proc = start_daemon(
        tmp_path,
        {
            "models": {"target": str(model), "draft_layers": [0, 1]},
            "training": {"enabled": False},
            "server": {"queue_size": 64, "batch_size": 4, "prompt_cache_size": 8},
            # nobody reads the process's pipes here: a full stderr pipe would block its logging
            "logging": {"console": "off"},
        },
    )
    results: list[tuple[str, int, str | None]] = []
    lock = threading.Lock()
    try:
        wait_for_event(tmp_path / "data" / "logs" / "specd.log", "ready", proc)
        url = json.loads((tmp_path / "data" / "runtime.json").read_text())["url"]

        def run(i: int) -> None:
            out = one_request(url, i)
            with lock:
                results.append(out)

        rss = {}
        with ThreadPoolExecutor(CLIENTS) as pool:
            for wave in range(REQUESTS // WAVE):
                list(pool.map(run, range(wave * WAVE, (wave + 1) * WAVE)))
                rss[(wave + 1) * WAVE] = rss_kib(proc.pid)
        status = httpx.get(f"{url}/status", timeout=HANG_GUARD_S).json()
    finally:
        stop_daemon(proc)
    assert proc.returncode == 0

    statuses = collections.Counter(s for _, s, _ in results)
    print(f"resident KiB after each wave of {WAVE}: {rss}; statuses {dict(statuses)}")
    assert len(results) == REQUESTS
    assert not [s for s in statuses if s >= 500], statuses
    assert statuses[200] == REQUESTS, statuses  # nothing refused either (queue of 64)
    # memory settles: after the last request within 10% of after the 50th
    assert rss[REQUESTS] <= 1.10 * rss[WAVE], rss
    assert status["buffer"]["dropped_records"] == 0 and status["buffer"]["unsaved_records"] == 0
    assert status["prompt_cache"]["hits"] > 0  # the conversation prefix was reused

    # every completed request is in the replay buffer (the daemon flushed it at exit)
    buf = ReplayBuffer(tmp_path / "data", create=False).open()
    try:
        stored = collections.Counter(r.output_text for r in buf.iter_records())
    finally:
        buf.close()
    completed = collections.Counter(text for _, _, text in results if text is not None)
    assert sum(completed.values()) == REQUESTS - REQUESTS // 5  # all but the hung-up streams
    missing = completed - stored
    assert not missing, missing
