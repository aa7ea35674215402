"""What the README promises about the replay buffer, tried on the daemon itself.

A client that received a complete response knows its request is in the buffer: the daemon is
SIGKILLed in the middle of traffic from several clients, and every request answered before the
kill is a row afterwards (the API waits for the record's commit before a response's last
bytes). Requests cut off by the kill may or may not be there; nothing else is lost.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx

from daemon.store.buffer import ReplayBuffer
from tests.helpers import HANG_GUARD_S, start_daemon, wait_for_event, write_model_dir

CLIENTS = 3
ANSWERED_BEFORE_KILL = 24


def test_sigkill_mid_traffic_loses_no_answered_request(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "tiny", ["a", "b", "c", "d"], vocab_size=40, seed=5)
    proc = start_daemon(
        tmp_path,
        {
            "models": {"target": str(model), "draft_layers": [0, 1]},
            "sampling": {"max_tokens": 6},
            "training": {"enabled": False},
        },
    )
    data = tmp_path / "data"
    answered: list[str] = []  # prompts whose full response arrived
    lock = threading.Lock()
    enough = threading.Event()
    stop = threading.Event()
    refused: list[str] = []  # non-200 answers: a thread's assert would go unseen

    def client(n: int) -> None:
        with httpx.Client(timeout=HANG_GUARD_S) as http:
            i = 0
            while not stop.is_set():
                prompt = f"a b c request {n}-{i}"
                i += 1
                try:
                    r = http.post(
                        f"{url}/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": prompt}]},
                    )
                except httpx.HTTPError:  # the kill cut this one off
                    return
                if r.status_code != 200:
                    with lock:
                        refused.append(f"{r.status_code}: {r.text}")
                    return
                with lock:
                    answered.append(prompt)
                    if len(answered) >= ANSWERED_BEFORE_KILL:
                        enough.set()

    try:
        wait_for_event(data / "logs" / "specd.log", "ready", proc)
        url = json.loads((data / "runtime.json").read_text())["url"]
        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
        for t in threads:
            t.start()
        while not enough.wait(0.5):  # the clients keep requests in flight meanwhile
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
        with lock:
            before_kill = list(answered)
        proc.wait()
        stop.set()
        for t in threads:
            t.join(HANG_GUARD_S)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not refused, refused
    with ReplayBuffer(data, create=False) as buf:  # opens normally after the kill
        stored = [r.prompt_text for r in buf.iter_records()]
    assert len(before_kill) >= ANSWERED_BEFORE_KILL
    assert set(before_kill) <= set(stored), sorted(set(before_kill) - set(stored))
    assert len(stored) == len(set(stored))  # no request recorded twice
