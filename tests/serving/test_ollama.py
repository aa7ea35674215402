"""Ollama's API, through the official ``ollama`` Python client against a real server.

The same request through Ollama's routes and OpenAI's gives the same answer (one request
path); options map onto the same controls; streams are NDJSON; errors are Ollama's shape.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from daemon.core.engine import SamplingParams
from daemon.core.models import ModelPair
from daemon.server import Server
from daemon.serving.api.ollama import parse_keep_alive
from daemon.serving.api.schemas import IGNORED_HEADER
from tests.helpers import HANG_GUARD_S, start_server, stop_server, tiny_pair, wait_until

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer, tiny_target, tiny_draft):
    pair: ModelPair = tiny_pair(tiny_target, tiny_draft, tiny_tokenizer, "tiny-target")
    srv, thread = start_server(tmp_path_factory.mktemp("ollama") / "data", pair)
    yield srv
    stop_server(srv, thread)


@pytest.fixture
def client(served: Server) -> Iterator[ollama.Client]:
    yield ollama.Client(host=served.url, timeout=HANG_GUARD_S)


def openai_answer(srv: Server, messages: list, **kw) -> str:
    c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
    out = c.chat.completions.create(model="specd", messages=messages, temperature=0, **kw)
    return out.choices[0].message.content or ""


def test_chat_is_the_openai_answer(served: Server, client: ollama.Client) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    r = client.chat(model="tiny-target", messages=messages, options={"num_predict": 12})
    assert r.done and r.done_reason == "length" and r.eval_count == 12
    assert r.message.role == "assistant"
    assert r.message.content == openai_answer(served, messages, max_tokens=12)
    assert r.prompt_eval_count and r.prompt_eval_count > 0 and r.total_duration


def test_chat_streams_ndjson(served: Server, client: ollama.Client) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    parts = list(
        client.chat(
            model="tiny-target:latest",
            messages=messages,
            stream=True,
            options={"num_predict": 12, "temperature": 0},
        )
    )
    assert len(parts) > 2 and all(not p.done for p in parts[:-1]) and parts[-1].done
    text = "".join(p.message.content or "" for p in parts)
    assert text == openai_answer(served, messages, max_tokens=12)
    assert parts[-1].eval_count == 12
    with httpx.stream(
        "POST", f"{served.url}/api/chat", json={"model": "specd", "messages": messages}
    ) as r:  # Ollama streams unless told otherwise
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True


def test_generate_and_options_map_onto_the_engine(served: Server, client: ollama.Client) -> None:
    options = {
        "num_predict": 16,
        "temperature": 0,
        "repeat_penalty": 1.4,
        "repeat_last_n": 8,
        "presence_penalty": 0.5,
        "seed": 3,
        "mirostat": 0,  # an option specd does not use: ignored, named
    }
    r = client.generate(model="tiny-target", prompt=PROMPT, raw=True, options=options)
    tokens = served.pair.tokenizer.encode(PROMPT)
    params = SamplingParams(
        max_tokens=16,
        seed=3,
        repetition_penalty=1.4,
        repetition_context_size=8,
        presence_penalty=0.5,
        presence_context_size=8,
        frequency_context_size=8,
    )
    ref = served.worker.call_between_requests(lambda: served.engine.run(tokens, params))
    assert r.response == ref.result(HANG_GUARD_S).text
    templated = client.generate(model="tiny-target", prompt=PROMPT, options={"num_predict": 6})
    assert templated.response == openai_answer(
        served, [{"role": "user", "content": PROMPT}], max_tokens=6
    )
    h = httpx.post(
        f"{served.url}/api/generate",
        json={"model": "specd", "prompt": PROMPT, "stream": False, "options": options},
    )
    assert h.headers[IGNORED_HEADER] == "options.mirostat"


def test_format_json_is_followed(client: ollama.Client) -> None:
    r = client.chat(
        model="tiny-target",
        messages=[{"role": "user", "content": "a json object please"}],
        format={
            "type": "object",
            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["a"],
            "additionalProperties": False,
        },
        options={"num_predict": 40},
    )
    assert isinstance(json.loads(r.message.content or "")["a"], int)


def test_models_listing(served: Server, client: ollama.Client) -> None:
    (entry,) = client.list().models
    assert entry.model == "tiny-target" and entry.details and entry.details.family == "llama"
    assert entry.size and entry.size > 0
    show = client.show("tiny-target")
    assert show.capabilities and "completion" in show.capabilities
    assert show.modelinfo and show.modelinfo["llama.context_length"] == served.pair.max_context
    (loaded,) = client.ps().models
    assert loaded.model == "tiny-target"
    assert httpx.get(f"{served.url}/api/version").json()["version"]


def test_errors_are_ollama_shaped(served: Server, client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="llama3", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404 and "llama3" in e.value.error
    r = httpx.post(
        f"{served.url}/api/chat",
        json={"model": "specd", "messages": [{"role": "user", "content": "x", "images": ["a"]}]},
    )
    assert r.status_code == 400 and set(r.json()) == {"error"} and "images" in r.json()["error"]
    r = httpx.post(f"{served.url}/api/chat", json={"messages": "nope"})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    for bad in ({"think": True}, {"keep_alive": "soon"}, {"format": "yaml"}):
        r = httpx.post(
            f"{served.url}/api/chat",
            json={"model": "specd", "messages": [{"role": "user", "content": "x"}], **bad},
        )
        assert r.status_code == 400, bad


def test_keep_alive_zero_unloads_and_the_next_request_loads(
    served: Server, client: ollama.Client
) -> None:
    r = client.generate(model="tiny-target", prompt="", keep_alive=0)
    assert r.done and r.done_reason == "unload"
    assert served.service is not None
    primary = served.service.primary
    wait_until(lambda: not primary.resident, "model unloaded")
    assert client.ps().models == []
    out = client.generate(model="tiny-target", prompt=PROMPT, options={"num_predict": 3})
    assert out.eval_count == 3 and primary.resident
    client.generate(model="tiny-target", prompt=PROMPT, options={"num_predict": 1}, keep_alive=-1)
    assert primary.request_keep_alive == math.inf and primary.unload_at() is None
    assert client.ps().models[0].expires_at.year == 9999  # type: ignore[union-attr]
    client.generate(model="tiny-target", prompt=PROMPT, options={"num_predict": 1}, keep_alive="1h")
    expires = client.ps().models[0].expires_at
    assert expires is not None and 3500 < (expires - datetime.now(UTC)).total_seconds() <= 3600


def test_keep_alive_durations() -> None:
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive(10) == 10 and parse_keep_alive("0") == 0
    assert parse_keep_alive("-1") == math.inf and parse_keep_alive(None) is None
    assert parse_keep_alive("250ms") == 0.25


def test_tool_round_trip_shapes(tmp_path: Path) -> None:
    """Ollama's tool-call shape parses in the official client (the model side of a round
    trip; the request side is in tests/serving/test_tools.py)."""
    from daemon.core.engine import GenerationResult
    from daemon.serving.api.ollama import OllamaRenderer
    from daemon.serving.api.render import Reply
    from daemon.serving.api.tools import ParsedCall

    renderer = OllamaRenderer(Reply("id", 0, "m", "chat", False, lambda: 0), "m", True)
    call = ParsedCall(name="get_weather", arguments='{"city": "Oslo"}', id="c1")
    out = renderer.complete(GenerationResult(), "", [call], "tool_calls", [])
    parsed = ollama.ChatResponse.model_validate(json.loads(out.body))
    assert parsed.message.tool_calls[0].function.name == "get_weather"
    assert parsed.message.tool_calls[0].function.arguments == {"city": "Oslo"}
    (line,) = renderer.delta(None, [call], [])
    assert ollama.ChatResponse.model_validate_json(line).message.tool_calls
    # arguments a parser passed through as text that is not a JSON object: {} (not a 500)
    odd = ParsedCall(name="get_weather", arguments="Oslo please", id="c2")
    out = renderer.complete(GenerationResult(), "", [odd], "tool_calls", [])
    assert json.loads(out.body)["message"]["tool_calls"][0]["function"]["arguments"] == {}
