"""The status page at ``/`` and ``/status/history`` behind it: figures equal to the buffer's,
and the page itself in headless Chromium (Debian's, driven by Playwright) on a daemon that
served traffic and ran a training run: it renders its charts with no console error, holds the
series it was given, and a rollback from the page changes the draft in service.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from tests.adaptation.test_adaptation import (  # noqa: F401 (a fixture)
    daemon_setup,
    prompts,
    start_in_process,
)
from tests.helpers import HANG_GUARD_S, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
KEY = "page-test-key"


def stop(srv, thread) -> None:
    srv.handle_exit(15, None)
    thread.join(HANG_GUARD_S)


def serve_until_trained(srv) -> None:
    """Traffic until the loop has installed a first adapter."""
    from openai import OpenAI

    client = OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    for text in prompts(120, seed=1):
        client.chat.completions.create(model="specd", messages=[{"role": "user", "content": text}])
        srv.service.flush(HANG_GUARD_S)
        if srv.adaptation.summary().counts.runs:
            break
    wait_until(lambda: srv.adaptation.summary().counts.runs > 0, "a finished training run")
    assert srv.service.adapter_version == 1, srv.adaptation.summary()


def test_history_equals_what_the_buffer_holds(daemon_setup, capsys) -> None:  # noqa: F811
    tmp_path, cfg = daemon_setup
    srv, thread = start_in_process(cfg, tmp_path / "data", **{"training.enabled": False})
    try:
        t0 = time.time()
        for text in prompts(12, seed=4):
            srv.service.generate([{"role": "user", "content": text}], max_tokens=12)
        srv.service.flush(HANG_GUARD_S)
        t1 = time.time() + 1
        step = (t1 - t0) / 5
        r = httpx.get(f"{srv.url}/status/history", params={"since": t0, "until": t1, "step": step})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["model"] == srv.service.primary.name and len(got["traffic"]["buckets"]) == 5
        # the same sums, straight from the records
        want: dict[int, dict] = defaultdict(lambda: defaultdict(float))
        for rec in srv.service.buffer.iter_records():
            b = want[int((rec.created - t0) // step)]
            b["requests"] += 1
            b["generation_tokens"] += rec.stats["generation_tokens"]
            b["generation_seconds"] += rec.stats["generation_time"]
            b["drafted"] += rec.stats["drafted"]
            b["accepted"] += rec.stats["accepted"]
            for source, n in rec.stats["drafted_by_source"].items():
                b[f"drafted:{source}"] += n
                b[f"accepted:{source}"] += rec.stats["accepted_by_source"].get(source, 0)
        assert sum(b["requests"] for b in want.values()) == 12
        for i, bucket in enumerate(got["traffic"]["buckets"]):
            w = want.get(i, {})
            assert bucket["start"] == pytest.approx(t0 + i * step)
            for key in ("requests", "generation_tokens", "drafted", "accepted"):
                assert bucket[key] == w.get(key, 0), (i, key)
            assert bucket["generation_seconds"] == pytest.approx(w.get("generation_seconds", 0))
            if w.get("generation_seconds"):
                tps = w["generation_tokens"] / w["generation_seconds"]
                assert bucket["tokens_per_s"] == pytest.approx(tps)
            for source, counts in bucket["by_source"].items():
                assert counts["drafted"] == w[f"drafted:{source}"]
                assert counts["accepted"] == w[f"accepted:{source}"]
        # the terminal's view of the same series
        from daemon.cli import main

        capsys.readouterr()
        args = ["status", "--history", "hour", "--config", str(cfg)]
        assert main([*args, "--data-dir", str(tmp_path / "data")]) == 0
        out = capsys.readouterr().out
        assert "tokens/s" in out and "requests/h" in out and "adapter in service: v0" in out
        bad = httpx.get(f"{srv.url}/status/history", params={"model": "nope"})
        assert bad.status_code == 404 and srv.service.primary.name in bad.text
        bad = httpx.get(f"{srv.url}/status/history", params={"since": t1, "until": t0})
        assert bad.status_code == 400
    finally:
        stop(srv, thread)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_page_shows_the_daemon_learning_and_rolls_back(daemon_setup, monkeypatch) -> None:  # noqa: F811
    from playwright.sync_api import sync_playwright

    tmp_path, cfg = daemon_setup
    srv, thread = start_in_process(cfg, tmp_path / "data", **{"server.api_key": KEY})
    try:
        serve_until_trained(srv)
        # the page's files need no key (they hold no data); its data does
        assert httpx.get(srv.url + "/").status_code == 200
        assert httpx.get(srv.url + "/static/page.js").status_code == 200
        assert httpx.get(srv.url + "/status/history").status_code == 401
        assert httpx.get(srv.url + "/static/server.py").status_code == 404  # only its files
        history = httpx.get(
            srv.url + "/status/history", headers={"Authorization": f"Bearer {KEY}"}
        ).json()
        errors: list[str] = []
        # OpenBLAS preloaded (make test) breaks Playwright's driver and Chromium's GPU process
        monkeypatch.delenv("LD_PRELOAD", raising=False)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
            )
            page = browser.new_page(viewport={"width": 1200, "height": 1800})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/")
            page.wait_for_selector("#keyform:not([hidden])")  # it asks for the key
            errors.clear()  # the 401 that made it ask is the browser's own console line
            page.fill("#key", KEY)
            page.click("#keyform button")
            page.wait_for_selector("#chart-speed canvas", timeout=30_000)
            page.wait_for_selector("#chart-run canvas", timeout=30_000)
            # the DOM holds the series the history endpoint gave
            speed = json.loads(page.get_attribute("#chart-speed", "data-values"))
            buckets = history["traffic"]["buckets"]
            served = sum(b["requests"] for b in buckets)
            assert served > 0 and len(speed[0]) == len(buckets)
            assert any(v is not None for v in speed[0])
            run = next(r for r in history["runs"] if r["version"] == 1)  # the installed one
            assert run["gate"]["decision"] == "install" and run["steps"]
            # a second run may have started since; the installed one's row shows its steps
            row = page.locator(f"#runs tr[data-run='{run['run_id']}']")
            assert row.count() == 1
            row.click()
            page.wait_for_selector(f"#runs tr.selected[data-run='{run['run_id']}']")
            points = int(page.get_attribute("#chart-run", "data-points"))
            assert points == len(run["steps"])
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
            # roll back from the page: the draft in service changes
            page.click("#adapters button[data-version='0']")
            wait_until(lambda: srv.service.adapter_version == 0, "the rollback from the page")
            page.wait_for_selector("#adapters button[data-version='1']")
            browser.close()
        assert not errors, errors
    finally:
        stop(srv, thread)


def test_sparkline_scales_between_min_and_max_and_leaves_gaps() -> None:
    from daemon.ops.status import sparkline

    assert sparkline([0.0, None, 1.0, 0.5]) == "▁ █▅"
    assert sparkline([None, None]) == "  " and sparkline([3.0, 3.0]) == "▁▁"
