"""Anthropic's Messages API: ``/v1/messages`` and ``/v1/messages/count_tokens``, for agents
and SDKs that speak it (Claude-Code-style tools; LM Studio, llama-server, vLLM and Ollama
serve it too).

A request is translated into the OpenAI chat request (`daemon.serving.api.generation`, the one
request path): ``system``, messages of ``text`` / ``tool_use`` / ``tool_result`` blocks,
``max_tokens``, ``stop_sequences``, ``temperature``, ``top_p``, ``top_k``, ``tools``
(``input_schema``) and ``tool_choice`` (``auto``, ``any``, ``tool``, ``none``). The answer
is a ``message`` with ``text`` and ``tool_use`` blocks and ``stop_reason`` (``end_turn``,
``max_tokens``, ``stop_sequence``, ``tool_use``), or the event stream ``message_start``,
``content_block_start`` / ``_delta`` / ``_stop``, ``message_delta``, ``message_stop``
(``ping`` while it waits). ``output_config.format`` (a JSON schema) is constrained decoding
as ``response_format`` is. Images, documents and extended thinking are refused by name;
``thinking`` blocks sent back in the history are dropped (this model did not write them).
Errors are Anthropic's ``{"type": "error", "error": {"type", "message"}}``; the key may come
as ``x-api-key`` (the gate).
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from daemon.core.engine import GenerationResult, TokenLogprob
from daemon.serving.api.errors import APIError
from daemon.serving.api.generation import (
    chat_prompt,
    chat_tools,
    contract,
    first_load,
    model_state,
    serve_chat,
    unknown_request_fields,
    unsupported,
    with_ignored,
)
from daemon.serving.api.render import Renderer, Reply
from daemon.serving.api.routes import AUTH, State
from daemon.serving.api.schemas import ERROR_RESPONSES, ChatCompletionRequest, FinishReason
from daemon.serving.api.state import MESSAGES_PATH
from daemon.serving.api.streaming import stream_after_load
from daemon.serving.api.tools import ParsedCall

__all__ = ["AnthropicRenderer", "anthropic_router"]

anthropic_router = APIRouter(tags=["anthropic"], dependencies=AUTH)

EXTRA_ALLOWED = ConfigDict(extra="allow", strict=True)
# blocks this server cannot read: refused by name (a refusal, not a silent drop)
REFUSED_BLOCKS = {"image": "image content", "document": "document content"}
DROPPED_BLOCKS = ("thinking", "redacted_thinking")


class AnthropicError(BaseModel):
    type: Literal["error"] = "error"
    error: dict[str, str]


RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {
                # before OpenAPI 3.2 the media type's schema describes one event of the stream
                "schema": {
                    "type": "object",
                    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
                    "required": ["data"],
                }
            },
        }
    },
    **{
        code: {"model": AnthropicError, "description": ERROR_RESPONSES[code]["description"]}
        for code in (400, 401, 404, 413, 429, 503)
    },
}


class AnthropicMessage(BaseModel):
    model_config = EXTRA_ALLOWED
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class AnthropicTool(BaseModel):
    model_config = EXTRA_ALLOWED
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class MessagesBase(BaseModel):
    model_config = EXTRA_ALLOWED
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: dict[str, Any] | None = None


class MessagesRequest(MessagesBase):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None  # ``format``: a JSON schema to follow


def _text(blocks: str | list[dict[str, Any]], where: str) -> str:
    """The text of a ``content`` (a string or text blocks)."""
    if isinstance(blocks, str):
        return blocks
    parts = []
    for j, b in enumerate(blocks):
        kind = b.get("type")
        if kind == "text" and isinstance(b.get("text"), str):
            parts.append(b["text"])
        elif kind in REFUSED_BLOCKS:
            raise unsupported(f"{where}.{j}", REFUSED_BLOCKS[kind])
        elif kind not in DROPPED_BLOCKS:
            raise APIError(400, f"{where}.{j}: expected a text block.", param=f"{where}.{j}")
    return "\n".join(parts)


def _messages(body: MessagesBase) -> list[dict[str, Any]]:
    """Anthropic's turns as OpenAI messages: tool results become ``tool`` messages, an
    assistant's ``tool_use`` blocks its ``tool_calls``."""
    out: list[dict[str, Any]] = []
    if body.system:
        out.append({"role": "system", "content": _text(body.system, "system")})
    for i, m in enumerate(body.messages):
        where = f"messages.{i}.content"
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts: list[dict[str, Any]] = []
        calls = []
        for j, b in enumerate(m.content):
            kind = b.get("type")
            if kind == "tool_result" and m.role == "user":
                content = b.get("content", "")
                text = _text(content, f"{where}.{j}.content") if content else ""
                out.append(
                    {"role": "tool", "tool_call_id": str(b.get("tool_use_id", "")), "content": text}
                )
            elif kind == "tool_use" and m.role == "assistant":
                calls.append(
                    {
                        "id": str(b.get("id", "")),
                        "type": "function",
                        "function": {
                            "name": str(b.get("name", "")),
                            "arguments": json.dumps(b.get("input", {})),
                        },
                    }
                )
            else:
                texts.append(b)
        text = _text(texts, where) if texts else ""
        if calls:
            out.append({"role": "assistant", "content": text, "tool_calls": calls})
        elif texts or not any(b.get("type") == "tool_result" for b in m.content):
            out.append({"role": m.role, "content": text})
    return out


def _tool_fields(body: MessagesBase) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if body.tools:
        fields["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    **({"description": t.description} if t.description else {}),
                    "parameters": t.input_schema,
                },
            }
            for t in body.tools
        ]
    choice = body.tool_choice or {}
    kind = choice.get("type")
    if kind == "any":
        fields["tool_choice"] = "required"
    elif kind == "tool":
        fields["tool_choice"] = {"type": "function", "function": {"name": choice.get("name", "")}}
    elif kind == "none":
        fields["tool_choice"] = "none"
    elif kind not in (None, "auto"):
        raise APIError(400, f"tool_choice type {kind!r} is unknown.", param="tool_choice.type")
    return fields


@anthropic_router.post(
    MESSAGES_PATH, summary="Messages (Anthropic-compatible)", responses=RESPONSES
)
async def messages(
    body: MessagesRequest, request: Request, response: Response, state: State
) -> Any:
    ignored = unknown_request_fields(state, MESSAGES_PATH, body)
    if body.stream and (load := first_load(state, body.model)) is not None:
        renderer = _renderer(body.model, [], state.tokenizer)(Reply.unstarted(body.model, "chat"))
        out: Any = stream_after_load(
            request, load, renderer, lambda: messages(body, request, response, state)
        )
        return with_ignored(out, response, ignored)
    state = await model_state(state, body.model)
    if body.thinking and body.thinking.get("type") == "enabled":
        raise unsupported("thinking", "Extended thinking")
    fields: dict[str, Any] = {
        "messages": _messages(body),
        "max_tokens": body.max_tokens,
        "stream": body.stream,
        **_tool_fields(body),
    }
    for name in ("temperature", "top_p", "top_k"):
        if getattr(body, name) is not None:
            fields[name] = getattr(body, name)
    fmt = (body.output_config or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        fields["response_format"] = {"type": "json_schema", "json_schema": {"schema": schema}}
    stops = [s for s in body.stop_sequences or [] if s]
    if stops:
        fields["stop"] = stops
    renderer = _renderer(body.model, stops, state.tokenizer)
    out = await serve_chat(state, request, contract(ChatCompletionRequest, fields), renderer)
    return with_ignored(out, response, ignored)


@anthropic_router.post(
    "/v1/messages/count_tokens",
    summary="Count a request's input tokens (Anthropic-compatible)",
    responses={k: v for k, v in RESPONSES.items() if k != 200},
)
async def count_tokens(body: MessagesBase, state: State) -> dict[str, int]:
    state = await model_state(state, body.model)
    internal = contract(ChatCompletionRequest, {"messages": _messages(body), **_tool_fields(body)})
    _, tokens = await chat_prompt(state, internal, chat_tools(state, internal))
    return {"input_tokens": len(tokens)}


def _renderer(model: str, stops: list[str], tokenizer: Any) -> Any:
    return lambda reply: AnthropicRenderer(reply, model, stops, tokenizer)


class AnthropicRenderer(Renderer):
    """A ``message`` object, or its event stream."""

    keepalive = b'event: ping\ndata: {"type": "ping"}\n\n'

    def __init__(self, reply: Reply, model: str, stops: list[str], tokenizer: Any) -> None:
        super().__init__(reply)
        self.model = model
        self.stops = stops
        self.tokenizer = tokenizer
        self.id = "msg_" + secrets.token_hex(12)
        self.blocks = 0  # content blocks started
        self.open_text: int | None = None  # the index of the text block being streamed

    def _stop(self, result: GenerationResult, finish: FinishReason) -> tuple[str, str | None]:
        """``stop_reason`` and the ``stop_sequence`` that ended the answer."""
        if finish == "tool_calls":
            return "tool_use", None
        if finish == "length":
            return "max_tokens", None
        if self.stops:  # which stop string: what the tokens say past the text
            tail = str(self.tokenizer.decode(result.tokens))[len(result.text) :]
            for s in self.stops:
                if s in tail:
                    return "stop_sequence", s
        return "end_turn", None

    def _usage(self, result: GenerationResult) -> dict[str, int]:
        s = result.stats
        return {
            "input_tokens": s.prompt_tokens,
            "output_tokens": s.generation_tokens,
            "cache_read_input_tokens": s.cached_tokens,
            "cache_creation_input_tokens": 0,
        }

    def complete(
        self,
        result: GenerationResult,
        content: str | None,
        calls: list[ParsedCall],
        finish: FinishReason,
        logprobs: list[TokenLogprob],
        reasoning: str | None = None,
    ) -> Any:
        # (a model's thinking is not returned: extended thinking is not offered here)
        blocks: list[dict[str, Any]] = []
        if content:
            blocks.append({"type": "text", "text": content})
        blocks += [_tool_use(c) for c in calls]
        reason, sequence = self._stop(result, finish)
        return JSONResponse(
            {
                "id": self.id,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": blocks,
                "stop_reason": reason,
                "stop_sequence": sequence,
                "usage": self._usage(result),
            }
        )

    @staticmethod
    def _event(kind: str, data: dict[str, Any]) -> bytes:
        payload = json.dumps({"type": kind, **data}, ensure_ascii=False)
        return f"event: {kind}\ndata: {payload}\n\n".encode()

    def start(self) -> list[bytes]:
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.reply.prompt_tokens, "output_tokens": 0},
        }
        return [self._event("message_start", {"message": message})]

    def _close_text(self) -> list[bytes]:
        if self.open_text is None:
            return []
        index, self.open_text = self.open_text, None
        return [self._event("content_block_stop", {"index": index})]

    def delta(
        self,
        text: str | None,
        calls: list[ParsedCall],
        logprobs: list[TokenLogprob],
        reasoning: str | None = None,
    ) -> list[bytes]:
        out: list[bytes] = []
        if text:
            if self.open_text is None:
                self.open_text = self.blocks
                self.blocks += 1
                empty = {"type": "text", "text": ""}
                out.append(
                    self._event(
                        "content_block_start", {"index": self.open_text, "content_block": empty}
                    )
                )
            out.append(
                self._event(
                    "content_block_delta",
                    {"index": self.open_text, "delta": {"type": "text_delta", "text": text}},
                )
            )
        for call in calls:
            out += self._close_text()
            index = self.blocks
            self.blocks += 1
            block: dict[str, Any] = {**_tool_use(call), "input": {}}
            delta = {"type": "input_json_delta", "partial_json": call.arguments}
            out += [
                self._event("content_block_start", {"index": index, "content_block": block}),
                self._event("content_block_delta", {"index": index, "delta": delta}),
                self._event("content_block_stop", {"index": index}),
            ]
        return out

    def end(self, result: GenerationResult, finish: FinishReason) -> list[bytes]:
        reason, sequence = self._stop(result, finish)
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        usage = {"output_tokens": result.stats.generation_tokens}
        return [
            *self._close_text(),
            self._event("message_delta", {"delta": delta, "usage": usage}),
            self._event("message_stop", {}),
        ]

    def error(self, message: str, type: str) -> list[bytes]:
        kind = "invalid_request_error" if type == "invalid_request_error" else "api_error"
        return [self._event("error", {"error": {"type": kind, "message": message}})]


def _tool_use(call: ParsedCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments_object()}
