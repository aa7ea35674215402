"""Which served models stay in memory: each frees itself after its own keep-alive (its
``models.targets`` entry, or the last request's), the least recently used leave for
``models.memory_budget_gb``; an entry's own speculative and training keys; a stream for a
model's first request keeps its connection alive while the model loads.

In-process `Service` and `Server` with two tiny model directories (tests/serving/test_models.py
has the real-daemon goals).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from daemon.config import ModelEntry, Settings, load_settings
from daemon.core.prompts import encode_prompt
from daemon.serving.requests import BlockingHandle, GenerationRequest
from daemon.serving.service import Service
from tests.helpers import HANG_GUARD_S, run_server, wait_until
from tests.serving.test_models import MAX_TOKENS, PROMPTS, model_dirs


def settings_for(
    tmp_path: Path, chat: Path, coder: Path, entry: dict[str, Any] | None = None, **models: Any
) -> Settings:
    return configured(tmp_path, chat, coder, entry, **models)[0]


def configured(
    tmp_path: Path, chat: Path, coder: Path, entry: dict[str, Any] | None = None, **models: Any
) -> tuple[Settings, Any]:
    """Settings serving ``chat`` as models.target and ``coder`` (more keys of its entry in
    ``entry``), with where each value came from."""
    coder_entry = {"target": str(coder), **(entry or {})}
    overrides = {
        "paths.data_dir": str(tmp_path / "data"),
        "server.port": 0,
        "training.enabled": False,
        "models.target": str(chat),
        "models.draft_layers": [0, 1],
        "models.targets": {"coder": coder_entry},
        **{f"models.{k}": v for k, v in models.items()},
    }
    cfg = tmp_path / "config.yaml"
    cfg.write_text("{}\n")
    return load_settings(cfg, overrides)


def ask(service: Service, name: str, prompt: str, keep_alive: float | None = None) -> str:
    """A greedy answer from served model ``name`` through the worker."""
    runtime = service.prepare(name).result(HANG_GUARD_S)
    assert runtime.pair is not None
    messages = [{"role": "user", "content": prompt}]
    req = GenerationRequest(
        prompt_tokens=encode_prompt(runtime.pair.tokenizer, messages),
        params=service.sampling_params(max_tokens=MAX_TOKENS, temperature=0.0),
        record=False,
        keep_alive=keep_alive,
        model=name,
    )
    handle = BlockingHandle(req)
    service.submit(handle)
    return handle.result().text


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return model_dirs(tmp_path)


def test_each_model_is_freed_after_its_own_keep_alive(
    tmp_path: Path, dirs: tuple[Path, Path]
) -> None:
    chat, coder = dirs
    settings = settings_for(tmp_path, chat, coder, entry={"keep_alive_seconds": 0.5})
    service = Service(settings)
    service.start()
    chat_rt, coder_rt = service.runtimes[str(chat)], service.runtimes["coder"]
    try:
        with capture_logs() as logs:
            first = ask(service, "coder", PROMPTS[0])
            ask(service, str(chat), PROMPTS[0])
            # coder's own keep-alive frees it; chat has none (models.keep_alive_seconds: null)
            wait_until(lambda: not coder_rt.resident, "coder freed after its keep-alive")
            time.sleep(0.6)
            assert chat_rt.resident
            assert ask(service, "coder", PROMPTS[0]) == first  # loaded again, same answer
            assert coder_rt.resident
            # a request's own keep_alive sets its model's timer: chat goes, coder stays
            ask(service, str(chat), PROMPTS[1], keep_alive=0.2)
            wait_until(lambda: not chat_rt.resident, "chat freed after its request's keep_alive")
        unloaded = [(e["model"], e["reason"]) for e in logs if e["event"] == "model_unloaded"]
        assert unloaded[:2] == [("coder", "keep_alive"), (str(chat), "keep_alive")]
    finally:
        assert service.stop(HANG_GUARD_S)


def test_the_memory_budget_frees_the_least_recently_used(
    tmp_path: Path, dirs: tuple[Path, Path]
) -> None:
    chat, coder = dirs
    settings = settings_for(tmp_path, chat, coder, max_loaded=2)
    service = Service(settings)
    service.start()
    chat_rt, coder_rt = service.runtimes[str(chat)], service.runtimes["coder"]
    try:
        answers = {name: ask(service, name, PROMPTS[0]) for name in (str(chat), "coder")}
        assert chat_rt.resident and coder_rt.resident  # no budget: max_loaded 2 keeps both
        # a budget for one and a half of them: the other leaves before one loads again
        one = max(chat_rt.weight_bytes, coder_rt.weight_bytes)
        assert one > 0
        models = settings.models.model_copy(update={"memory_budget_gb": 1.5 * one / 1e9})
        service.settings = settings.model_copy(update={"models": models})
        with capture_logs() as logs:
            for name, other in [(str(chat), coder_rt), ("coder", chat_rt)] * 2:
                assert ask(service, name, PROMPTS[0]) == answers[name]
                assert service.runtimes[name].resident and not other.resident
        reasons = {e["reason"] for e in logs if e["event"] == "model_unloaded"}
        assert reasons == {"models.memory_budget_gb"}
        # a budget that no model fits: it still serves, alone, and says so
        models = settings.models.model_copy(update={"memory_budget_gb": 0.5 * one / 1e9})
        service.settings = settings.model_copy(update={"models": models})
        with capture_logs() as logs:
            assert ask(service, str(chat), PROMPTS[0]) == answers[str(chat)]
        assert not coder_rt.resident
        assert any(e["event"] == "model_over_memory_budget" for e in logs)
    finally:
        assert service.stop(HANG_GUARD_S)


def test_an_entry_s_own_speculative_and_training_keys(
    tmp_path: Path, dirs: tuple[Path, Path]
) -> None:
    chat, coder = dirs
    own = {"speculative": {"max_draft_tokens": 2}, "training": {"lora": {"rank": 4}}}
    settings = settings_for(tmp_path, chat, coder, entry=own)
    service = Service(settings)
    service.start()
    try:
        ask(service, "coder", PROMPTS[0])
        coder_engine, chat_engine = service.runtimes["coder"].engine, service.engine
        assert coder_engine is not None and chat_engine is not None
        assert coder_engine.config.max_draft_tokens == 2
        assert chat_engine.config.max_draft_tokens == settings.speculative.max_draft_tokens != 2
        assert service.port("coder").settings.training.lora.rank == 4
        assert settings.training.lora.rank != 4
    finally:
        assert service.stop(HANG_GUARD_S)
    # a bad key or value in an entry is named when the configuration is read
    for bad, named in [
        ({"speculative": {"max_draft_token": 2}}, "max_draft_token"),
        ({"training": {"lora": {"rank": 0}}}, "lora.rank"),
    ]:
        with pytest.raises(Exception) as err:
            settings_for(tmp_path, chat, coder, entry=bad)
        assert "models.targets.coder" in str(err.value) and named in str(err.value)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_a_stream_keeps_alive_while_its_model_loads(
    tmp_path: Path, dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, api: str
) -> None:
    import signal

    import daemon.serving.api.streaming as streaming
    import daemon.serving.runtime as runtime

    chat, coder = dirs
    slow_load = runtime.load_pair

    def load_pair(settings: Settings) -> Any:
        time.sleep(1.0)  # a large model's load, in short
        return slow_load(settings)

    monkeypatch.setattr(runtime, "load_pair", load_pair)
    monkeypatch.setattr(streaming, "KEEPALIVE_S", 0.1)
    broken = tmp_path / "broken"  # a model directory that does not load
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    settings, sources = configured(tmp_path, chat, coder)
    targets = {**settings.models.targets, "broken": ModelEntry(target=str(broken))}
    models = settings.models.model_copy(update={"targets": targets})
    srv, thread = run_server(settings.model_copy(update={"models": models}), sources)
    url = str(srv.url)
    if api == "openai":
        path, keepalive = "/v1/chat/completions", ": keep-alive"
        body: dict[str, Any] = {"messages": [{"role": "user", "content": PROMPTS[0]}]}
    else:
        path, keepalive = "/v1/messages", "event: ping"
        body = {"messages": [{"role": "user", "content": PROMPTS[0]}]}
    body.update({"max_tokens": MAX_TOKENS, "temperature": 0, "stream": True})
    try:
        lines = stream_lines(url + path, {**body, "model": "coder"})
        first_data = next(i for i, ln in enumerate(lines) if ln.startswith("data:"))
        assert any(ln.startswith(keepalive) for ln in lines[:first_data]), lines[:5]
        text = streamed_text(lines, api)
        again = stream_lines(url + path, {**body, "model": "coder"})  # loaded: no wait
        assert text and streamed_text(again, api) == text
        # a model that will not load: the stream ends with an error event naming it
        lines = stream_lines(url + path, {**body, "model": "broken"})
        errors = [json.loads(ln[5:]) for ln in lines if ln.startswith("data:") and "error" in ln]
        assert errors and "could not be loaded" in json.dumps(errors[0])
    finally:
        srv.handle_exit(signal.SIGTERM, None)
        thread.join(HANG_GUARD_S)


def stream_lines(url: str, body: dict[str, Any]) -> list[str]:
    with httpx.stream("POST", url, json=body, timeout=HANG_GUARD_S) as r:
        assert r.status_code == 200
        return [ln for ln in r.iter_lines() if ln]


def streamed_text(lines: list[str], api: str) -> str:
    out = []
    for ln in lines:
        if not ln.startswith("data:") or ln == "data: [DONE]":
            continue
        ev = json.loads(ln[5:])
        if api == "openai":
            out.append(ev["choices"][0]["delta"].get("content") or "" if ev.get("choices") else "")
        elif ev.get("type") == "content_block_delta":
            out.append(ev["delta"].get("text", ""))
    return "".join(out)
