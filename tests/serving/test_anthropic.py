"""Anthropic's Messages API, through the official ``anthropic`` Python client against a real
server: the same answer as the OpenAI route (one request path), the full event sequence when
streamed, stop sequences, token counting, Anthropic-shaped errors and ``x-api-key``. The tool
round trip is in tests/serving/test_tools.py (it needs a tool-capable template)."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest
from pydantic import SecretStr

from daemon.core.models import ModelPair
from daemon.server import Server
from tests.helpers import HANG_GUARD_S, start_server, stop_server, tiny_pair

PROMPT = "The quick brown fox"
SYSTEM = "You are terse."


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer, tiny_target, tiny_draft):
    pair: ModelPair = tiny_pair(tiny_target, tiny_draft, tiny_tokenizer, "tiny-target")
    srv, thread = start_server(tmp_path_factory.mktemp("anthropic") / "data", pair)
    yield srv
    stop_server(srv, thread)


def client(srv: Server, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key=key, max_retries=0, timeout=HANG_GUARD_S)


def openai_answer(srv: Server, n: int) -> str:
    c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
    out = c.chat.completions.create(
        model="specd",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
        max_tokens=n,
        temperature=0,
    )
    return out.choices[0].message.content or ""


def test_a_message_is_the_openai_answer(served: Server) -> None:
    msg = client(served).messages.create(
        model="tiny-target",
        system=SYSTEM,
        messages=[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
        max_tokens=12,
    )
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 12
    assert msg.content[0].type == "text"
    assert msg.content[0].text == openai_answer(served, 12)
    counted = client(served).messages.count_tokens(
        model="tiny-target", system=SYSTEM, messages=[{"role": "user", "content": PROMPT}]
    )
    assert counted.input_tokens == msg.usage.input_tokens > 0


def test_the_stream_has_every_event(served: Server) -> None:
    with client(served).messages.stream(
        model="specd",
        system=SYSTEM,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=12,
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds
    assert kinds[-2] == "message_delta" and "text" in kinds  # the SDK's text events
    assert final.content[0].text == openai_answer(served, 12)
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 12


def test_stop_sequences_say_which(served: Server) -> None:
    full = openai_answer(served, 24)
    stop = full[8:11]
    assert stop.strip() and full.find(stop) == 8
    msg = client(served).messages.create(
        model="specd",
        system=SYSTEM,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=24,
        stop_sequences=["never-there", stop],
    )
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    assert msg.content[0].text == full[:8]


def test_structured_output_and_sampling_fields(served: Server) -> None:
    """``output_config.format`` (a JSON schema) is constrained decoding; ``temperature``,
    ``top_p`` and ``top_k``, which older clients send, are honoured."""
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a"],
        "additionalProperties": False,
    }
    msg = client(served).messages.create(
        model="specd",
        messages=[{"role": "user", "content": "json"}],
        max_tokens=40,
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    assert msg.content[0].type == "text" and 0 <= json.loads(msg.content[0].text)["a"] <= 9
    body = {
        "model": "specd",
        "max_tokens": 6,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 1.0,
        "top_k": 1,  # top-k 1 is greedy whatever the temperature
    }
    r = httpx.post(f"{served.url}/v1/messages", json=body)
    assert r.json()["content"][0]["text"] == openai_plain(served, 6)


def openai_plain(srv: Server, n: int) -> str:
    c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
    out = c.chat.completions.create(
        model="specd", messages=[{"role": "user", "content": PROMPT}], max_tokens=n
    )
    return out.choices[0].message.content or ""


def test_errors_are_anthropic_shaped(served: Server) -> None:
    with pytest.raises(anthropic.NotFoundError) as e:
        client(served).messages.create(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "x"}], max_tokens=4
        )
    assert e.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    url = f"{served.url}/v1/messages"
    r = httpx.post(url, json={"model": "specd", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["type"] == "error"  # max_tokens is required
    assert r.json()["error"]["type"] == "invalid_request_error"
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}
    body = {"model": "specd", "max_tokens": 4, "messages": [{"role": "user", "content": [image]}]}
    r = httpx.post(url, json=body)
    assert r.status_code == 400 and "image" in r.json()["error"]["message"]
    think = {
        **body,
        "messages": [{"role": "user", "content": "x"}],
        "thinking": {"type": "enabled"},
    }
    assert httpx.post(url, json=think).status_code == 400


def test_x_api_key_is_the_key(served: Server) -> None:
    served.settings.server.api_key = SecretStr("sekrit")
    try:
        msg = client(served, "sekrit").messages.create(
            model="specd", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        assert msg.usage.output_tokens <= 2
        with pytest.raises(anthropic.AuthenticationError):
            client(served, "wrong").messages.create(
                model="specd", messages=[{"role": "user", "content": "x"}], max_tokens=2
            )
    finally:
        served.settings.server.api_key = None
