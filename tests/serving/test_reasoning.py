"""Reasoning models: a tiny model whose tokenizer has ``<think>`` / ``</think>`` and a
Qwen3-style template (thinking on: the generation prompt opens a thinking block; off:
``enable_thinking: false`` closes it at once). Its thinking is ``reasoning_content``, its
answer ``content``; the replay buffer keeps the whole output."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from transformers import PreTrainedTokenizerFast

from daemon.core.models import ModelPair
from daemon.server import Server
from daemon.serving.api.reasoning import ReasoningStream
from tests.helpers import HANG_GUARD_S, pair_from_dir, start_server, stop_server

QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- else %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}"
)


@pytest.fixture(scope="module")
def thinking_pair(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> ModelPair:
    path = tmp_path_factory.mktemp("think-model")
    tiny_tokenizer._tokenizer.save_pretrained(path)
    hf = PreTrainedTokenizerFast.from_pretrained(path)  # a copy: the session's stays as it is
    hf.add_tokens(["<think>", "</think>"])
    hf.save_pretrained(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = QWEN3_TEMPLATE
    config_file.write_text(json.dumps(config))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    pair = pair_from_dir(path, "tiny-think")
    assert pair.tokenizer.has_thinking and pair.tokenizer.think_start == "<think>"
    return pair


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, thinking_pair: ModelPair) -> Iterator[Server]:
    srv, thread = start_server(tmp_path_factory.mktemp("think") / "data", thinking_pair)
    yield srv
    stop_server(srv, thread)


def client(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)


MESSAGES = [{"role": "user", "content": "The quick brown fox"}]


def test_the_splitter_across_deltas() -> None:
    text = "<think>\nplan it</think>\n\nThe answer."
    s = ReasoningStream("<think>", "</think>", thinking=False)
    reasoning = content = ""
    for i in range(0, len(text), 2):  # markers split across deltas
        r, c = s.feed(text[i : i + 2])
        reasoning, content = reasoning + r, content + c
    r, c = s.finish()
    assert (reasoning + r, content + c) == ("\nplan it", "\n\nThe answer.")
    assert ReasoningStream("<think>", "</think>", thinking=True).split("a</think>b") == ("a", "b")


def test_thinking_is_reasoning_content(served: Server) -> None:
    thinking_id = served.pair.tokenizer.convert_tokens_to_ids("</think>")
    out = client(served).chat.completions.create(
        model="specd",
        messages=MESSAGES,
        max_tokens=16,
        # the first token ends the thinking block (a bias), and is not repeated (a penalty)
        logit_bias={str(thinking_id): 60},
        extra_body={"repetition_penalty": 100.0, "reasoning_effort": "high"},
    )
    message = out.choices[0].message
    assert message.model_extra["reasoning_content"] is None  # an empty thinking block
    assert message.content and "</think>" not in message.content
    plain = client(served).chat.completions.create(model="specd", messages=MESSAGES, max_tokens=16)
    whole = plain.choices[0].message
    assert whole.content is None or whole.content == ""  # all of it inside the open block
    reasoning = whole.model_extra["reasoning_content"]
    assert reasoning and len(reasoning) > 5
    # streamed: the same split, as reasoning_content deltas
    stream = client(served).chat.completions.create(
        model="specd", messages=MESSAGES, max_tokens=16, stream=True
    )
    streamed = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
        for c in stream
        if c.choices
    )
    assert streamed == reasoning


def test_chat_template_kwargs_reach_the_template(served: Server) -> None:
    off = client(served).chat.completions.create(
        model="specd",
        messages=MESSAGES,
        max_tokens=8,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    on = client(served).chat.completions.create(model="specd", messages=MESSAGES, max_tokens=8)
    assert off.usage and on.usage and off.usage.prompt_tokens > on.usage.prompt_tokens
    assert off.choices[0].message.model_extra["reasoning_content"] is None
    assert off.choices[0].message.content
    r = httpx.post(
        f"{served.url}/v1/chat/completions",
        json={"messages": MESSAGES, "chat_template_kwargs": {"tools": []}},
        timeout=HANG_GUARD_S,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs.tools"


def test_ollama_think(served: Server) -> None:
    import ollama

    c = ollama.Client(host=served.url, timeout=HANG_GUARD_S)
    r = c.chat(model="specd", messages=MESSAGES, think=True, options={"num_predict": 8})
    assert r.message.thinking and not r.message.content
    r = c.chat(model="specd", messages=MESSAGES, think=False, options={"num_predict": 8})
    assert r.message.content and not r.message.thinking
