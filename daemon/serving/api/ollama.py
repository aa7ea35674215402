"""Ollama's API: ``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/show``, ``/api/ps``,
``/api/version``, for the desktop apps, editor plugins and scripts that speak only Ollama.

A request is translated into the OpenAI request models (`daemon.serving.api.generation`, the
one request path: same engine, buffer records, metrics and auth) and its answer rendered as
Ollama renders it (`OllamaRenderer`): one JSON object, or NDJSON lines when streaming (Ollama's
default). ``options`` map onto the same controls (``num_predict``, ``temperature``, ``top_k``,
``top_p``, ``min_p``, ``seed``, ``stop``, ``repeat_penalty`` / ``presence_penalty`` /
``frequency_penalty`` over ``repeat_last_n`` tokens (Ollama's default 64), ``num_ctx``);
``format`` (``"json"`` or a JSON schema) is the same constrained decoding; ``keep_alive``
sets how long the models stay loaded after the request. Unknown fields and options are
ignored and named in the ``X-Specd-Ignored-Fields`` header; ``think`` switches a reasoning
model's thinking (``message.thinking`` holds it); ``suffix`` is fill-in-the-middle (models with
FIM tokens); ``images`` and a custom ``template`` are refused by name. Errors are Ollama's
``{"error": message}``.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from daemon import __version__
from daemon.core.engine import GenerationResult, TokenLogprob
from daemon.serving.api.errors import APIError
from daemon.serving.api.generation import (
    RunOptions,
    contract,
    model_state,
    serve_chat,
    serve_completion,
    served_models,
    unknown_request_fields,
    unsupported,
    with_ignored,
)
from daemon.serving.api.render import Renderer, Reply
from daemon.serving.api.routes import AUTH, State
from daemon.serving.api.schemas import (
    ERROR_RESPONSES,
    ChatCompletionRequest,
    CompletionRequest,
    FinishReason,
)
from daemon.serving.api.state import (
    OLLAMA_CHAT_PATH,
    OLLAMA_GENERATE_PATH,
    AppState,
    ModelListing,
)
from daemon.serving.api.tools import ParsedCall

__all__ = ["OllamaRenderer", "ollama_router", "parse_keep_alive"]

ollama_router = APIRouter(tags=["ollama"], dependencies=AUTH)


class OllamaError(BaseModel):
    """Ollama's error shape."""

    error: str


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {
        code: {"model": OllamaError, "description": ERROR_RESPONSES[code]["description"]}
        for code in codes
    }


GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/x-ndjson": {"schema": {"type": "string"}},
        }
    },
    **_errors(400, 401, 404, 413, 429, 503),
}

# unknown fields kept (and named in the response header); JSON types exact, as Go reads them
EXTRA_ALLOWED = ConfigDict(extra="allow", strict=True)
REPEAT_LAST_N = 64  # Ollama's default window of the repetition penalties
# options mapped onto the request's own fields (the rest are listed as ignored)
OPTION_FIELDS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
HANDLED_OPTIONS = {*OPTION_FIELDS, "num_predict", "repeat_last_n", "num_ctx"}


class OllamaFunction(BaseModel):
    model_config = EXTRA_ALLOWED
    name: str
    arguments: dict[str, Any] = {}


class OllamaToolCall(BaseModel):
    model_config = EXTRA_ALLOWED
    function: OllamaFunction


class OllamaMessage(BaseModel):
    model_config = EXTRA_ALLOWED
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None


class OllamaRequest(BaseModel):
    model_config = EXTRA_ALLOWED
    model: str = ""
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: bool = True
    keep_alive: str | float | None = None
    think: bool | str | None = None


class OllamaChatRequest(OllamaRequest):
    messages: list[OllamaMessage] = []
    tools: list[dict[str, Any]] | None = None


class OllamaGenerateRequest(OllamaRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    images: list[str] | None = None


class ShowRequest(BaseModel):
    model_config = EXTRA_ALLOWED
    model: str = ""
    name: str | None = None  # the field's older name


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def parse_keep_alive(value: str | float | None) -> float | None:
    """Ollama's ``keep_alive``: seconds, or a Go duration (``"5m"``, ``"1h30m"``, ``"0"``);
    negative: forever (inf). None: not given."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip()
        units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3}
        parts = re.fullmatch(r"-?(?:\d+(?:\.\d+)?(?:ms|h|m|s))+|-?\d+(?:\.\d+)?", text)
        if not parts:
            raise APIError(
                400,
                f"keep_alive {value!r} is not a duration (e.g. 300, '5m', '1h', '-1').",
                param="keep_alive",
            )
        if re.fullmatch(r"-?\d+(?:\.\d+)?", text):
            seconds = float(text)
        else:
            sign = -1.0 if text.startswith("-") else 1.0
            found = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
            seconds = sign * sum(float(n) * units[u] for n, u in found)
    return math.inf if seconds < 0 else seconds


def _translate(body: OllamaRequest) -> tuple[dict[str, Any], RunOptions, list[str]]:
    """The OpenAI request fields, the run options and the ignored option names."""
    fields: dict[str, Any] = {"model": body.model or None, "stream": body.stream}
    opts = dict(body.options or {})
    ignored = [f"options.{k}" for k in opts if k not in HANDLED_OPTIONS]
    for key, name in OPTION_FIELDS.items():
        if opts.get(key) is not None:
            fields[name] = opts[key]
    if isinstance(fields.get("stop"), list) and not fields["stop"]:
        del fields["stop"]
    n = opts.get("num_predict")
    if isinstance(n, int) and n > 0:  # -1: until the end; -2: fill the context
        fields["max_tokens"] = n
    window = opts.get("repeat_last_n", REPEAT_LAST_N)
    if window == -1:
        window = opts.get("num_ctx") or 1 << 30
    if isinstance(window, int) and window > 0:
        for name in ("repetition", "presence", "frequency"):
            fields[f"{name}_context_size"] = window
    elif window == 0:  # Ollama: 0 turns the penalties off
        for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
            fields.pop(name, None)
    fmt = body.format
    if fmt == "json":
        fields["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict) and fmt:
        fields["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt}}
    elif fmt not in (None, ""):
        raise APIError(400, 'format must be "json" or a JSON schema.', param="format")
    num_ctx = opts.get("num_ctx")
    options = RunOptions(
        num_ctx=num_ctx if isinstance(num_ctx, int) and num_ctx > 0 else None,
        keep_alive=parse_keep_alive(body.keep_alive),
    )
    return fields, options, ignored


def _thinking(state: AppState, body: OllamaRequest, fields: dict[str, Any]) -> None:
    """``think``: the template's thinking switch (``true``/``false``) or effort (``"low"``
    ...); a 400, as Ollama answers, for a model without thinking."""
    if body.think is None:
        return
    if not getattr(state.tokenizer, "has_thinking", False):
        if body.think is False:
            return
        raise APIError(400, f"{body.model!r} does not support thinking", param="think")
    if isinstance(body.think, str):
        fields["reasoning_effort"] = body.think
    else:
        fields["chat_template_kwargs"] = {"enable_thinking": body.think}


def _messages(body: OllamaChatRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(body.messages):
        if m.images:
            raise unsupported(f"messages.{i}.images", "images")
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            msg["tool_calls"] = [
                {
                    "id": f"call_{i}_{j}",
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": json.dumps(c.function.arguments),
                    },
                }
                for j, c in enumerate(m.tool_calls)
            ]
        if m.role == "tool":  # Ollama names the tool; templates key on the call id
            msg["tool_call_id"] = m.tool_name or ""
        out.append(msg)
    return out


def _loaded(state: AppState, model: str, chat: bool, keep_alive: float | None) -> JSONResponse:
    """Ollama's answer to a request with nothing to generate: the model is (kept) loaded, or,
    with ``keep_alive`` 0, unloaded."""
    if keep_alive is not None and state.keep_alive is not None:
        state.keep_alive(state.model_id, keep_alive)
    reason = "unload" if keep_alive == 0 else "load"
    body: dict[str, Any] = {"model": model, "created_at": _now(), "done": True}
    if chat:
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    body["done_reason"] = reason
    return JSONResponse(body)


@ollama_router.post(
    OLLAMA_CHAT_PATH, summary="Chat (Ollama-compatible)", responses=GENERATE_RESPONSES
)
async def ollama_chat(
    body: OllamaChatRequest, request: Request, response: Response, state: State
) -> Any:
    ignored = unknown_request_fields(state, OLLAMA_CHAT_PATH, body)
    fields, options, more = _translate(body)
    state = await model_state(state, _model_id(body.model))
    if not body.messages:
        return _loaded(state, body.model, True, options.keep_alive)
    fields["model"] = None
    _thinking(state, body, fields)
    fields["messages"] = _messages(body)
    if body.tools:
        fields["tools"] = body.tools
    internal = contract(ChatCompletionRequest, fields)
    out = await serve_chat(state, request, internal, _renderer(body.model, True), options)
    return with_ignored(out, response, ignored + more)


@ollama_router.post(
    OLLAMA_GENERATE_PATH, summary="Generate (Ollama-compatible)", responses=GENERATE_RESPONSES
)
async def ollama_generate(
    body: OllamaGenerateRequest, request: Request, response: Response, state: State
) -> Any:
    ignored = unknown_request_fields(state, OLLAMA_GENERATE_PATH, body)
    fields, options, more = _translate(body)
    state = await model_state(state, _model_id(body.model))
    if body.images:
        raise unsupported("images", "images")
    if body.template:
        raise unsupported("template", "A request's own template")
    if not body.prompt:
        return _loaded(state, body.model, False, options.keep_alive)
    fields["model"] = None
    renderer = _renderer(body.model, False)
    if body.raw or body.suffix:  # fill-in-the-middle is a raw prompt in the FIM tokens
        data = {**fields, "prompt": body.prompt}
        if body.suffix:
            data["suffix"] = body.suffix
        raw = contract(CompletionRequest, data)
        out = await serve_completion(state, request, raw, renderer, options)
    else:  # the prompt through the chat template, as Ollama does
        messages = [{"role": "system", "content": body.system}] if body.system else []
        messages.append({"role": "user", "content": body.prompt})
        _thinking(state, body, fields)
        internal = contract(ChatCompletionRequest, {**fields, "messages": messages})
        out = await serve_chat(state, request, internal, renderer, options)
    return with_ignored(out, response, ignored + more)


def _model_id(name: str) -> str | None:
    """Ollama names carry a tag (``name:latest``); an empty name is the served model."""
    if not name:
        return None
    return name[: -len(":latest")] if name.endswith(":latest") else name


def _renderer(model: str, chat: bool) -> Any:
    return lambda reply: OllamaRenderer(reply, model, chat)


class OllamaRenderer(Renderer):
    """Ollama's shapes: a JSON object, or NDJSON lines ending with one that has ``done``."""

    media_type = "application/x-ndjson"
    keepalive = None  # a line must be JSON: nothing to send while waiting

    def __init__(self, reply: Reply, model: str, chat: bool) -> None:
        super().__init__(reply)
        self.model = model or reply.model
        self.chat = chat

    def _base(self, done: bool) -> dict[str, Any]:
        return {"model": self.model, "created_at": _now(), "done": done}

    def _piece(
        self, text: str, calls: list[ParsedCall], reasoning: str | None = None
    ) -> dict[str, Any]:
        if not self.chat:
            return {"response": text, **({"thinking": reasoning} if reasoning else {})}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if reasoning:
            message["thinking"] = reasoning
        if calls:
            message["tool_calls"] = [
                {"function": {"name": c.name, "arguments": c.arguments_object()}} for c in calls
            ]
        return {"message": message}

    def _stats(self, result: GenerationResult, finish: FinishReason) -> dict[str, Any]:
        s = result.stats
        ns = 1_000_000_000
        return {
            "done_reason": "length" if finish == "length" else "stop",
            "total_duration": int((s.prompt_time + s.generation_time) * ns),
            "load_duration": 0,
            "prompt_eval_count": s.prompt_tokens,
            "prompt_eval_duration": int(s.prompt_time * ns),
            "eval_count": s.generation_tokens,
            "eval_duration": int(s.generation_time * ns),
        }

    @staticmethod
    def _line(obj: dict[str, Any]) -> bytes:
        return json.dumps(obj, ensure_ascii=False).encode() + b"\n"

    def complete(
        self,
        result: GenerationResult,
        content: str | None,
        calls: list[ParsedCall],
        finish: FinishReason,
        logprobs: list[TokenLogprob],
        reasoning: str | None = None,
    ) -> Any:
        body = {**self._base(True), **self._piece(content or "", calls, reasoning)}
        return JSONResponse({**body, **self._stats(result, finish)})

    def delta(
        self,
        text: str | None,
        calls: list[ParsedCall],
        logprobs: list[TokenLogprob],
        reasoning: str | None = None,
    ) -> list[bytes]:
        if not text and not calls and not reasoning:
            return []
        return [self._line({**self._base(False), **self._piece(text or "", calls, reasoning)})]

    def end(self, result: GenerationResult, finish: FinishReason) -> list[bytes]:
        body = {**self._base(True), **self._piece("", []), **self._stats(result, finish)}
        return [self._line(body)]

    def error(self, message: str, type: str) -> list[bytes]:
        return [self._line({"error": message})]


# --------------------------------------------------------------------------------------------
# Models: what is served, and its details


def _details(state: AppState) -> dict[str, Any]:
    d = state.model_details
    family = str(d.get("family", ""))
    return {
        "parent_model": "",
        "format": str(d.get("format", "mlx")),
        "family": family,
        "families": [family] if family else None,
        "parameter_size": str(d.get("parameter_size", "")),
        "quantization_level": str(d.get("quantization_level", state.dtype)),
    }


def _entry(state: AppState) -> dict[str, Any]:
    return {
        "name": state.model_id,
        "model": state.model_id,
        "modified_at": datetime.fromtimestamp(state.started, UTC).isoformat(),
        "size": int(state.model_details.get("size", 0)),
        "digest": "",
        "details": _details(state),
    }


@ollama_router.get("/api/tags", summary="Served models (Ollama-compatible)", responses=_errors(401))
async def ollama_tags(state: State) -> dict[str, Any]:
    return {"models": [_listed(state, m, served) for m, served in served_models(state)]}


def _listed(state: AppState, listing: ModelListing, served: AppState | None) -> dict[str, Any]:
    """A served model's entry; one not loaded yet has only its name (its details come from
    its files, read when it loads)."""
    if served is not None:
        return _entry(served)
    return {
        "name": listing.name,
        "model": listing.name,
        "modified_at": datetime.fromtimestamp(state.started, UTC).isoformat(),
        "size": 0,
        "digest": "",
        "details": {},
    }


@ollama_router.get("/api/ps", summary="Loaded models (Ollama-compatible)", responses=_errors(401))
async def ollama_ps(state: State) -> dict[str, Any]:
    never = datetime(9999, 1, 1, tzinfo=UTC)
    now = datetime.now(UTC)
    return {
        "models": [
            {
                **_entry(served),
                "expires_at": (
                    never
                    if listing.expires_in is None
                    else now + timedelta(seconds=listing.expires_in)
                ).isoformat(),
                "size_vram": 0,
                "context_length": served.max_context,
            }
            for listing, served in served_models(state)
            if listing.loaded and served is not None
        ]
    }


@ollama_router.post(
    "/api/show", summary="Model details (Ollama-compatible)", responses=_errors(400, 401, 404, 413)
)
async def ollama_show(body: ShowRequest, state: State) -> dict[str, Any]:
    state = await model_state(state, _model_id(body.model or body.name or ""))
    tok = state.tokenizer
    family = str(state.model_details.get("family", ""))
    capabilities = ["completion"]
    if getattr(tok, "has_tool_calling", False):
        capabilities.append("tools")
    template = getattr(tok, "chat_template", None)
    return {
        "modelfile": "",
        "parameters": "",
        "template": template if isinstance(template, str) else "",
        "details": _details(state),
        "model_info": {
            "general.architecture": family,
            f"{family}.context_length": state.max_context,
        },
        "capabilities": capabilities,
        "modified_at": datetime.fromtimestamp(state.started, UTC).isoformat(),
    }


@ollama_router.get("/api/version", summary="Version (Ollama-compatible)", responses=_errors(401))
async def ollama_version() -> dict[str, str]:
    return {"version": __version__}
