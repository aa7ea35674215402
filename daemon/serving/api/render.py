"""Rendering one generation's answer in an API's shape: the `Renderer` interface and OpenAI's.

`daemon.serving.api.streaming.GenerationRun` waits for the worker's events and hands them to a
renderer: a whole answer (`Renderer.complete`) or a stream (`start`, `delta` per piece, `end`
or `error`). Each API (OpenAI here, Ollama in `ollama`, Anthropic in `anthropic`) is one
renderer over the same run, so the engine, the buffer records, metrics and auth are shared.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from daemon.core.engine import GenerationResult, TokenLogprob
from daemon.serving.api.errors import error_body
from daemon.serving.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatTokenLogprob,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    FinishReason,
    FunctionCall,
    PromptTokensDetails,
    SourceUsage,
    SpeculativeUsage,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from daemon.serving.api.tools import ParsedCall

__all__ = [
    "LogprobRenderer",
    "OpenAIRenderer",
    "Renderer",
    "Reply",
    "finish_reason",
    "usage",
]


def usage(result: GenerationResult, adapter_version: int) -> Usage:
    s = result.stats
    return Usage(
        prompt_tokens=s.prompt_tokens,
        completion_tokens=s.generation_tokens,
        total_tokens=s.prompt_tokens + s.generation_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=s.cached_tokens),
        speculative=SpeculativeUsage(
            drafted=s.drafted,
            accepted=s.accepted,
            num_drafts=s.num_drafts,
            acceptance_rate=s.acceptance_rate,
            mean_accepted_length=s.mean_accepted_length,
            sources={
                source: SourceUsage(drafted=n, accepted=s.accepted_by_source.get(source, 0))
                for source, n in s.drafted_by_source.items()
            },
            adapter_version=adapter_version,
            batched_tokens=s.batched_tokens,
        ),
    )


def finish_reason(result: GenerationResult) -> FinishReason:
    return "length" if result.finish_reason == "length" else "stop"


def _function(call: ParsedCall) -> FunctionCall:
    return FunctionCall(name=call.name, arguments=call.arguments)


def _tool_call(call: ParsedCall) -> ToolCall:
    return ToolCall(id=call.id, function=_function(call))


class LogprobRenderer:
    """Token log-probabilities in OpenAI's two shapes; tokens as their own decoded text (a
    token that is part of a UTF-8 character shows U+FFFD; ``bytes`` is exact only for whole
    characters, as the decoded text is all a tokenizer gives back per token). End-of-sequence
    tokens are left out: they are not part of the answer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos = set(getattr(tokenizer, "eos_token_ids", None) or ())
        self.offset = 0  # completions: where the next token's text starts

    def text(self, token: int) -> str:
        return str(self.tokenizer.decode([token]))

    def content(self, lps: list[TokenLogprob], limit: int | None = None) -> list[TokenLogprob]:
        """The entries of the answer's tokens: no EOS, none past ``limit`` characters (a
        stop string cut there)."""
        out, pos = [], 0
        for lp in lps:
            if lp.token in self.eos or (limit is not None and pos >= limit):
                break
            out.append(lp)
            pos += len(self.text(lp.token))
        return out

    def _top(self, token: int, logprob: float) -> TopLogprob:
        text = self.text(token)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    def chat(self, lps: list[TokenLogprob]) -> ChoiceLogprobs:
        entries = []
        for lp in lps:
            head = self._top(lp.token, lp.logprob)
            alts = [self._top(t, v) for t, v in lp.top]
            entries.append(ChatTokenLogprob(**head.model_dump(), top_logprobs=alts))
        return ChoiceLogprobs(content=entries)

    def completion(self, lps: list[TokenLogprob]) -> CompletionLogprobs:
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for lp in lps:
            text = self.text(lp.token)
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self.text(t): v for t, v in lp.top})
            out.text_offset.append(self.offset)
            self.offset += len(text)
        return out

    def render(self, kind: str, lps: list[TokenLogprob]) -> Any:
        return self.chat(lps) if kind == "chat" else self.completion(lps)


@dataclass
class Reply:
    """What every rendering of one request needs."""

    id: str
    created: int
    model: str
    kind: Literal["chat", "completion"]
    include_usage: bool
    adapter_version: Callable[[], int]  # the version that served it (known once it ran)
    logprobs: LogprobRenderer | None = None
    prompt_tokens: int = 0

    @classmethod
    def unstarted(cls, model: str, kind: Literal["chat", "completion"]) -> Reply:
        """A request's reply before it was read (what a stream's keep-alives and errors need
        while its model loads)."""
        return cls("", int(time.time()), model, kind, False, lambda: 0)


class Renderer:
    """One API's shape of an answer. ``keepalive``: sent while a stream waits for its first
    token (None: nothing; NDJSON has no comments)."""

    media_type = "text/event-stream"
    keepalive: bytes | None = b": keep-alive\n\n"

    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    def complete(
        self,
        result: GenerationResult,
        content: str | None,
        calls: list[ParsedCall],
        finish: FinishReason,
        logprobs: list[TokenLogprob],
        reasoning: str | None = None,
    ) -> Any:
        """The whole answer (``reasoning``: a reasoning model's thinking, split off)."""
        raise NotImplementedError

    def start(self) -> list[bytes]:
        return []

    def delta(
        self,
        text: str | None,
        calls: list[ParsedCall],
        logprobs: list[TokenLogprob],
        reasoning: str | None = None,
    ) -> list[bytes]:
        raise NotImplementedError

    def end(self, result: GenerationResult, finish: FinishReason) -> list[bytes]:
        raise NotImplementedError

    def error(self, message: str, type: str) -> list[bytes]:
        raise NotImplementedError


def _sse(model: BaseModel) -> bytes:
    return b"data: " + model.model_dump_json().encode() + b"\n\n"


class OpenAIRenderer(Renderer):
    """Chat completions and completions: JSON, or server-sent events ending ``[DONE]``."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply)
        self.calls = 0  # tool calls streamed so far (their delta index)

    def _logprobs(self, lps: list[TokenLogprob]) -> Any:
        r = self.reply.logprobs
        return None if r is None or not lps else r.render(self.reply.kind, lps)

    def complete(
        self,
        result: GenerationResult,
        content: str | None,
        calls: list[ParsedCall],
        finish: FinishReason,
        logprobs: list[TokenLogprob],
        reasoning: str | None = None,
    ) -> BaseModel:
        r = self.reply
        lps = None if r.logprobs is None else r.logprobs.render(r.kind, logprobs)
        use = usage(result, r.adapter_version())
        if r.kind == "chat":
            tool_calls = [_tool_call(c) for c in calls] or None
            message = AssistantMessage(
                content=content, reasoning_content=reasoning, tool_calls=tool_calls
            )
            choice = ChatChoice(index=0, message=message, finish_reason=finish, logprobs=lps)
            return ChatCompletionResponse(
                id=r.id, created=r.created, model=r.model, choices=[choice], usage=use
            )
        choice_ = CompletionChoice(index=0, text=content or "", finish_reason=finish, logprobs=lps)
        return CompletionResponse(
            id=r.id, created=r.created, model=r.model, choices=[choice_], usage=use
        )

    def _chunk(
        self,
        text: str | None,
        finish: FinishReason | None,
        role: bool = False,
        calls: list[ParsedCall] | None = None,
        logprobs: list[TokenLogprob] | None = None,
        reasoning: str | None = None,
    ) -> bytes:
        r = self.reply
        lps = self._logprobs(logprobs or [])
        if r.kind == "chat":
            deltas = None
            if calls:
                deltas = [
                    ToolCallDelta(index=self.calls + i, id=c.id, function=_function(c))
                    for i, c in enumerate(calls)
                ]
                self.calls += len(calls)
            delta = ChatDelta(
                role="assistant" if role else None,
                content=text,
                reasoning_content=reasoning,
                tool_calls=deltas,
            )
            choice = ChatChunkChoice(index=0, delta=delta, finish_reason=finish, logprobs=lps)
            return _sse(
                ChatCompletionChunk(id=r.id, created=r.created, model=r.model, choices=[choice])
            )
        choice_ = CompletionChoice(index=0, text=text or "", finish_reason=finish, logprobs=lps)
        return _sse(
            CompletionResponse(id=r.id, created=r.created, model=r.model, choices=[choice_])
        )

    def start(self) -> list[bytes]:
        return [self._chunk("", None, role=True)] if self.reply.kind == "chat" else []

    def delta(
        self,
        text: str | None,
        calls: list[ParsedCall],
        logprobs: list[TokenLogprob],
        reasoning: str | None = None,
    ) -> list[bytes]:
        return [self._chunk(text, None, calls=calls, logprobs=logprobs, reasoning=reasoning)]

    def end(self, result: GenerationResult, finish: FinishReason) -> list[bytes]:
        r = self.reply
        out = [self._chunk(None if r.kind == "chat" else "", finish)]
        if r.include_usage:
            cls = ChatCompletionChunk if r.kind == "chat" else CompletionResponse
            use = usage(result, r.adapter_version())
            out.append(_sse(cls(id=r.id, created=r.created, model=r.model, choices=[], usage=use)))
        return [*out, b"data: [DONE]\n\n"]

    def error(self, message: str, type: str) -> list[bytes]:
        code = "invalid_value" if type == "invalid_request_error" else "generation_failed"
        body = error_body(message, type, code=code)
        return [b"data: " + json.dumps(body).encode() + b"\n\n", b"data: [DONE]\n\n"]
