"""Tool calls through a tiny model that carries Qwen2.5's tool-capable chat template."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from daemon.core.models import ModelPair
from daemon.server import Server
from daemon.serving.api.tools import ToolStream, split_tool_calls
from tests.helpers import (
    HANG_GUARD_S,
    pair_from_dir,
    perturbed_copy,
    start_server,
    stop_server,
    tiny_pair,
)

# Qwen2.5-Instruct's chat template (tool parts as published; the default system text shortened)
QWEN_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    '{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.'
    '\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}'
    '{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}'
    '{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and '
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": '
    '<function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}'
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    '{%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}'
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == \"assistant\" %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' }}{{- tool_call.name }}'
    "{{- '\", \"arguments\": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    '{%- elif message.role == "tool" %}'
    '{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}'
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    '{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}'
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def tool_pair(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> ModelPair:
    """The tiny BPE tokenizer with Qwen2.5's template, loaded back through mlx-lm (which
    infers its tool parser from the template), and a tiny llama."""
    path = tmp_path_factory.mktemp("tool-model")
    tiny_tokenizer._tokenizer.save_pretrained(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = QWEN_TEMPLATE
    config_file.write_text(json.dumps(config))
    (path / "chat_template.jinja").unlink(missing_ok=True)  # newer transformers keep it there
    pair = pair_from_dir(path, "tiny-tools", max_position_embeddings=4096)
    tok = pair.tokenizer
    assert tok.has_tool_calling and tok.tool_call_start == "<tool_call>"
    return pair


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tool_pair: ModelPair) -> Iterator[Server]:
    srv, thread = start_server(tmp_path_factory.mktemp("tools") / "data", tool_pair)
    yield srv
    stop_server(srv, thread)


def test_split_and_stream_the_json_tool_format(tool_pair: ModelPair) -> None:
    tok = tool_pair.tokenizer
    text = (
        'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        "</tool_call>"
    )
    content, calls = split_tool_calls(tok, text, [WEATHER])
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}
    stream = ToolStream(tok, [WEATHER])
    seen, found = "", []
    for i in range(0, len(text), 3):  # markers split across deltas
        c, k = stream.feed(text[i : i + 3])
        seen += c
        found += k
    rest, last = stream.finish()
    assert seen + rest == "Let me check." and len(found + last) == 1
    # an unfinished or unparsable call stays text
    assert split_tool_calls(tok, "a <tool_call>{oops", [WEATHER]) == ("a <tool_call>{oops", [])


def test_openai_client_round_trip(served: Server) -> None:
    """A forced call (tool_choice 'required': a grammar of the call), the tool's answer sent
    back as a 'tool' message with its tool_call_id, then the model's reply."""
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Oslo?"}]
    r = client.chat.completions.create(
        model="specd", messages=messages, tools=[WEATHER], tool_choice="required", max_tokens=120
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 3}'},
    ]
    r2 = client.chat.completions.create(
        model="specd", messages=messages, tools=[WEATHER], max_tokens=8
    )
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # streamed: the call arrives as a tool_calls delta
    stream = client.chat.completions.create(
        model="specd",
        messages=messages[:1],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=120,
        stream=True,
    )
    deltas, finish = [], None
    for chunk in stream:
        if chunk.choices:
            deltas += chunk.choices[0].delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and deltas[0].function.name == "get_weather"
    assert deltas[0].id and deltas[0].index == 0


def test_tool_errors_name_the_field(served: Server) -> None:
    url = f"{served.url}/v1/chat/completions"
    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r = httpx.post(url, json={**base, "tool_choice": "required"}, timeout=HANG_GUARD_S)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    r = httpx.post(
        url,
        json={
            **base,
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "x"}},
        },
    )
    assert r.status_code == 400 and "unknown function" in r.json()["error"]["message"]
    bad_args = {
        "role": "assistant",
        "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}
        ],
    }
    r = httpx.post(url, json={**base, "messages": [base["messages"][0], bad_args]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages.1.tool_calls.0.function.arguments"


def test_a_model_without_tool_support_says_so(tmp_path: Path, tiny_tokenizer, tiny_target) -> None:
    draft = perturbed_copy(tiny_target, seed=2, noise=0.2)
    pair = tiny_pair(tiny_target, draft, tiny_tokenizer, "no-tools")
    srv, thread = start_server(tmp_path / "data", pair)
    try:
        r = httpx.post(
            f"{srv.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]},
        )
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "tools" and "does not support tools" in err["message"]
    finally:
        stop_server(srv, thread)


def test_ollama_client_round_trip(served: Server) -> None:
    """Ollama's client sends the tools, the assistant's call (arguments as an object) and
    the tool's answer (named by ``tool_name``) back: rendered by the same template."""
    import ollama

    client = ollama.Client(host=served.url, timeout=HANG_GUARD_S)
    messages: list[Any] = [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
        },
        {"role": "tool", "content": '{"temp_c": 3}', "tool_name": "get_weather"},
    ]
    r = client.chat(model="specd", messages=messages, tools=[WEATHER], options={"num_predict": 8})
    assert r.done and r.eval_count and r.eval_count > 0
    # what the template saw: the call and the tool's answer (the tool as the ollama client
    # sends it: its own model of a tool drops additionalProperties and orders the keys)
    sent = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "required": ["city"],
                "properties": {"city": {"enum": ["Paris", "Oslo"]}},
            },
        },
    }
    same = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0)
    call = {
        "id": "call_1_0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    answer = same.chat.completions.create(
        model="specd",
        messages=[
            messages[0],
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "get_weather", "content": '{"temp_c": 3}'},
        ],
        tools=[sent],
        max_tokens=8,
        temperature=0,
    )
    assert r.message.content == answer.choices[0].message.content


def test_anthropic_client_round_trip(served: Server) -> None:
    """A forced tool_use block (tool_choice 'tool'), its tool_result sent back, the reply;
    streamed, the call arrives as a tool_use block with an input_json_delta."""
    import anthropic

    client = anthropic.Anthropic(
        base_url=served.url, api_key="x", max_retries=0, timeout=HANG_GUARD_S
    )
    tool = {
        "name": "get_weather",
        "description": "The weather in a city.",
        "input_schema": WEATHER["function"]["parameters"],
    }
    question = {"role": "user", "content": "What is the weather in Oslo?"}
    msg = client.messages.create(
        model="specd",
        max_tokens=120,
        messages=[question],
        tools=[tool],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert msg.stop_reason == "tool_use"
    use = next(b for b in msg.content if b.type == "tool_use")
    assert use.name == "get_weather" and use.input["city"] in ("Paris", "Oslo")
    reply = client.messages.create(
        model="specd",
        max_tokens=8,
        tools=[tool],
        messages=[
            question,
            {"role": "assistant", "content": [use.model_dump()]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": use.id, "content": '{"temp_c": 3}'}
                ],
            },
        ],
    )
    assert reply.stop_reason in ("end_turn", "max_tokens", "tool_use")
    with client.messages.stream(
        model="specd",
        max_tokens=120,
        messages=[question],
        tools=[tool],
        tool_choice={"type": "any"},
    ) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds and final.stop_reason == "tool_use"
    assert [b.type for b in final.content][-1] == "tool_use"
    assert final.content[-1].input["city"] in ("Paris", "Oslo")
