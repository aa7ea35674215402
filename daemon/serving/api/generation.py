"""The one request path: a generation request, whatever API it came in by, checked, templated
and run here, then rendered in that API's shape (`daemon.serving.api.render`).

`serve_chat` and `serve_completion` take OpenAI's request models as the internal contract: the
OpenAI routes pass their bodies through, the Ollama and Anthropic routes translate theirs into
them (`daemon.serving.api.ollama`, `daemon.serving.api.anthropic`), so a control added here
serves all three. What they refuse is an `APIError` (400/404) before anything reaches the
worker.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from daemon.core.constraints import Constraint
from daemon.core.engine import SamplingParams
from daemon.core.prompts import encode_fim, encode_prompt, fim_tokens, prompt_text
from daemon.errors import GenerationError
from daemon.logging import get_logger
from daemon.serving.api.errors import APIError
from daemon.serving.api.render import OpenAIRenderer, Renderer, Reply
from daemon.serving.api.schemas import (
    IGNORED_HEADER,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerationParams,
    unknown_fields,
)
from daemon.serving.api.state import MODEL_ALIASES, AppState, ModelListing, ServedModel
from daemon.serving.api.streaming import GenerationRun, stream_after_load
from daemon.serving.api.tools import forced_call_grammar

__all__ = [
    "RunOptions",
    "chat_prompt",
    "chat_tools",
    "first_load",
    "model_state",
    "served_models",
    "contract",
    "serve_chat",
    "serve_completion",
    "unknown_request_fields",
    "unsupported",
    "with_ignored",
]

log = get_logger("api")

ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass
class RunOptions:
    """What other APIs ask beyond OpenAI's fields: Ollama's ``num_ctx`` (prompt and answer
    within it) and ``keep_alive`` (seconds the models stay loaded after it; inf: always)."""

    num_ctx: int | None = None
    keep_alive: float | None = None


def served_models(state: AppState) -> list[tuple[ModelListing, AppState | None]]:
    """Every served model with the state its requests are served with (None: not loaded
    yet); models.target first."""
    listings = state.models() or [ModelListing(state.model_id, True, state.adapter_version(), None)]
    out: list[tuple[ModelListing, AppState | None]] = []
    for m in listings:
        if m.name == state.model_id:
            out.append((m, state))
        else:
            out.append((m, state.serving(m.served) if m.served is not None else None))
    return out


def first_load(state: AppState, model: str | None) -> Future[ServedModel] | None:
    """The load a request for ``model`` waits for, started now: its model's first (not
    described yet); None when it waits for none (models.target, a model loaded before, a
    name not served: `model_state` answers those)."""
    if model in (None, "", state.model_id, *MODEL_ALIASES) or state.load_model is None:
        return None
    listing = next((m for m in state.models() if m.name == model), None)
    if listing is None or listing.served is not None:
        return None
    return state.load_model(model)


async def model_state(state: AppState, model: str | None) -> AppState:
    """The state a request for ``model`` is served with (`AppState.serving`): models.target's
    for none, its id or an alias; another served model's once it is ready (loaded on its first
    request, which waits); a 404 listing the served names for any other."""
    if model in (None, "", state.model_id, *MODEL_ALIASES):
        return state
    listings = state.models()
    listing = next((m for m in listings if m.name == model), None)
    if listing is None or state.load_model is None:
        names = [m.name for m in listings] or [state.model_id]
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves "
            + ", ".join(f"'{n}'" for n in names)
            + ".",
            param="model",
            code="model_not_found",
        )
    served = listing.served
    if served is None:
        served = await asyncio.wrap_future(state.load_model(model))
    return state.serving(served)


def unknown_request_fields(state: AppState, endpoint: str, body: BaseModel) -> list[str]:
    """The request's unknown fields (`unknown_fields`), each logged the first time an endpoint
    sees it; with ``server.strict_fields`` the first is a 400 naming it."""
    names = unknown_fields(body)
    if names and state.settings.server.strict_fields:
        raise APIError(
            400,
            f"Unsupported field {names[0]!r}: specd does not implement it "
            "(server.strict_fields is on, so it is refused rather than ignored).",
            param=names[0],
            code="unsupported_parameter",
        )
    seen = state.unknown_logged
    for name in names:
        # bounded: a client inventing names must not grow the set (or the log) forever
        if (endpoint, name) not in seen and len(seen) < MAX_LOGGED_UNKNOWN:
            seen.add((endpoint, name))
            log.info("unknown_field_ignored", field=name, endpoint=endpoint)
    return names


MAX_LOGGED_UNKNOWN = 1024
MAX_HEADER_NAMES = 64


def with_ignored(out: Response | BaseModel, response: Response, names: list[str]) -> Any:
    """Name the ignored fields in the response's header (streamed or not); names that are
    not printable ASCII are percent-encoded (a header value is latin-1 text)."""
    if names:
        shown = [quote(n, safe="[]._-~") or '""' for n in names[:MAX_HEADER_NAMES]]
        if len(names) > MAX_HEADER_NAMES:
            shown.append(f"... ({len(names) - MAX_HEADER_NAMES} more)")
        value = ", ".join(shown)
        (out if isinstance(out, Response) else response).headers[IGNORED_HEADER] = value
    return out


def unsupported(param: str, what: str) -> APIError:
    """The 400 for a field specd knows but cannot honour (a refusal, never a silent drop)."""
    return APIError(400, f"{what} is not supported by specd.", param=param, code="unsupported")


def contract(cls: type[ModelT], data: dict[str, Any]) -> ModelT:
    """Another API's request translated into the internal contract (``cls``, an OpenAI
    request model); what it refuses is a 400 naming the field."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise APIError(400, f"{where}: {first['msg']}", param=where) from None


def _constraint(state: AppState, body: GenerationParams) -> Constraint | None:
    """The grammar of ``response_format`` (None for plain text); a 400 naming what is wrong."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        if fmt is not None and fmt.json_schema is not None:
            raise APIError(
                400,
                "response_format.json_schema is only valid with type 'json_schema'.",
                param="response_format.json_schema",
                code="invalid_value",
            )
        return None
    if fmt.type == "json_object":
        schema: dict[str, Any] = {"type": "object"}
        param = "response_format"
    else:
        if fmt.json_schema is None or not fmt.json_schema.schema_:
            raise APIError(
                400,
                "response_format type 'json_schema' needs json_schema.schema.",
                param="response_format.json_schema.schema",
                code="invalid_value",
            )
        schema, param = fmt.json_schema.schema_, "response_format.json_schema.schema"
    try:
        return Constraint.json_schema(state.tokenizer, schema)
    except GenerationError as e:
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_value") from None


def _sampling(
    state: AppState,
    body: GenerationParams,
    max_tokens: int | None,
    max_tokens_param: str,
    logprobs: int | None = None,
) -> SamplingParams:
    s = state.settings
    if body.n is not None and body.n > 1:
        raise unsupported("n", "n > 1 (several choices)")
    # more than the server's cap or the context allows is answered up to that bound (the
    # engine stops at the context end, finish_reason "length"), as other servers do
    limit = s.server.max_tokens_limit
    if max_tokens is None and s.sampling.max_tokens is not None:
        max_tokens = s.sampling.max_tokens
    max_tokens = limit if max_tokens is None else min(max_tokens, limit)
    if state.max_context is not None:
        max_tokens = min(max_tokens, state.max_context)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    params = SamplingParams(
        temperature=_given(body.temperature, s.sampling.temperature),
        top_p=_given(body.top_p, s.sampling.top_p),
        top_k=_given(body.top_k, s.sampling.top_k),
        min_p=_given(body.min_p, s.sampling.min_p),
        seed=body.seed,
        max_tokens=max_tokens,
        stop=stop,
        logit_bias=_logit_bias(state, body.logit_bias),
        repetition_penalty=_given(body.repetition_penalty, s.sampling.repetition_penalty),
        repetition_context_size=_given(body.repetition_context_size, 20),
        presence_penalty=_given(body.presence_penalty, 0.0),
        presence_context_size=_given(body.presence_context_size, 20),
        frequency_penalty=_given(body.frequency_penalty, 0.0),
        frequency_context_size=_given(body.frequency_context_size, 20),
        logprobs=logprobs,
    )
    try:
        params.validate(state.max_context)
    except GenerationError as e:
        raise APIError(400, str(e), code="invalid_value") from None
    return params


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def _logit_bias(state: AppState, bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's ``logit_bias`` (token id strings to -100..100) as token ids; a 400 naming
    an entry that is not a token of this model."""
    out: dict[int, float] = {}
    vocab = state.vocab_size
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab or not -100 <= value <= 100:
            raise APIError(
                400,
                f"logit_bias maps token ids (0 to {vocab - 1}) to values in [-100, 100]; "
                f"got {key!r}: {value!r}.",
                param=f"logit_bias.{key}",
                code="invalid_value",
            )
        out[token] = float(value)
    return out


def _check_prompt(state: AppState, tokens: list[int], param: str) -> None:
    if not tokens:
        raise APIError(400, "The prompt is empty.", param=param, code="invalid_value")
    ctx = state.max_context
    if ctx is not None and len(tokens) >= ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens; the prompt has "
            f"{len(tokens)} tokens (at least one must remain for the completion).",
            param=param,
            code="context_length_exceeded",
        )


def _message_text(m: ChatMessage) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    return "\n".join(p.text for p in m.content)


async def _run(
    state: AppState,
    request: Request,
    kind: Literal["chat", "completion"],
    tokens: list[int],
    text: str,
    params: SamplingParams,
    body: GenerationParams,
    tools: list[dict[str, Any]] | None = None,
    forced_call: str | None = None,
    renderer: Callable[[Reply], Renderer] = OpenAIRenderer,
    options: RunOptions | None = None,
) -> Response | BaseModel:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if forced_call is not None:  # building a matcher is CPU work, like _constraint's
        constraint: Constraint | None = await run_in_threadpool(
            Constraint, state.tokenizer, forced_call
        )
    else:
        constraint = await run_in_threadpool(_constraint, state, body)
    options = options or RunOptions()
    if options.num_ctx is not None:  # the request's own context bound
        params.max_tokens = max(1, min(params.max_tokens, options.num_ctx - len(tokens)))
    run = GenerationRun(
        state,
        request,
        kind,
        tokens,
        text,
        params,
        include_usage,
        constraint,
        tools,
        renderer,
        options.keep_alive,
    )
    return await run.respond(bool(body.stream))


async def serve_chat(
    state: AppState,
    request: Request,
    body: ChatCompletionRequest,
    renderer: Callable[[Reply], Renderer] = OpenAIRenderer,
    options: RunOptions | None = None,
) -> Response | BaseModel:
    """A chat request, in the internal contract every API is translated to: validated,
    templated, run, rendered by ``renderer``."""
    if body.stream and (load := first_load(state, body.model)) is not None:
        return stream_after_load(
            request,
            load,
            renderer(Reply.unstarted(body.model or "", "chat")),
            lambda: serve_chat(state, request, body, renderer, options),
        )
    state = await model_state(state, body.model)
    if body.top_logprobs and not body.logprobs:  # as OpenAI answers it
        raise APIError(
            400,
            "top_logprobs needs logprobs set to true.",
            param="top_logprobs",
            code="invalid_value",
        )
    max_tokens = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
    param = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = _sampling(state, body, max_tokens, param, logprobs)
    tools, forced = _tools(state, body)
    messages, tokens = await chat_prompt(state, body, tools)
    _check_prompt(state, tokens, "messages")
    text = prompt_text(messages)
    return await _run(
        state, request, "chat", tokens, text, params, body, tools, forced, renderer, options
    )


async def chat_prompt(
    state: AppState, body: ChatCompletionRequest, tools: list[dict[str, Any]] | None
) -> tuple[list[dict[str, Any]], list[int]]:
    """The messages as the chat template takes them, and the prompt's token ids."""
    messages = [_template_message(i, m) for i, m in enumerate(body.messages)]
    kwargs = dict(body.chat_template_kwargs or {})
    reserved = sorted(set(kwargs) & {"messages", "tools", "add_generation_prompt", "tokenize"})
    if reserved:
        raise APIError(
            400,
            f"chat_template_kwargs may not set {reserved[0]!r} (the server sets it).",
            param=f"chat_template_kwargs.{reserved[0]}",
            code="invalid_value",
        )
    if body.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", body.reasoning_effort)
    try:
        tokens = await run_in_threadpool(encode_prompt, state.tokenizer, messages, tools, kwargs)
    except Exception as e:  # template errors (roles, missing fields) are the request's fault
        raise APIError(400, f"Cannot apply the chat template: {e}", param="messages") from None
    return messages, tokens


def chat_tools(state: AppState, body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools the template renders for ``body`` (checked as `serve_chat` checks them)."""
    return _tools(state, body)[0]


def _template_message(i: int, m: ChatMessage) -> dict[str, Any]:
    """A message as chat templates take it (tool-call arguments as objects, as HF's do)."""
    out: dict[str, Any] = {
        "role": "system" if m.role == "developer" else m.role,
        "content": _message_text(m),
    }
    if m.tool_calls:
        calls = []
        for j, call in enumerate(m.tool_calls):
            try:
                args = json.loads(call.function.arguments)
            except ValueError:
                raise APIError(
                    400,
                    "tool call arguments must be JSON text",
                    param=f"messages.{i}.tool_calls.{j}.function.arguments",
                    code="invalid_value",
                ) from None
            fn = {"name": call.function.name, "arguments": args}
            calls.append({"id": call.id, "type": "function", "function": fn})
        out["tool_calls"] = calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _tools(
    state: AppState, body: ChatCompletionRequest
) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The tools to render (None: none) and, when a call is forced, its grammar."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError(
                400, "tool_choice needs tools.", param="tool_choice", code="invalid_value"
            )
        return None, None
    if not getattr(state.tokenizer, "has_tool_calling", False):
        raise APIError(
            400,
            f"The model {state.model_id!r} does not support tools: its chat template has no "
            "tool-call format.",
            param="tools",
            code="unsupported",
        )
    if choice == "none":
        return None, None
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    if choice is None or choice == "auto":
        return tools, None
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(
            400,
            "A forced tool call and response_format cannot both constrain the answer.",
            param="tool_choice",
            code="invalid_value",
        )
    name = None if choice == "required" else choice.function.name
    if name is not None and name not in {t.function.name for t in body.tools}:
        raise APIError(400, f"tool_choice names an unknown function {name!r}.", param="tool_choice")
    grammar = forced_call_grammar(state.tokenizer, tools, name)
    if grammar is None:
        raise APIError(
            400,
            "Forcing a tool call needs the JSON tool-call format; this model's template uses "
            "another one. Use tool_choice 'auto'.",
            param="tool_choice",
            code="unsupported",
        )
    return tools, grammar


async def serve_completion(
    state: AppState,
    request: Request,
    body: CompletionRequest,
    renderer: Callable[[Reply], Renderer] = OpenAIRenderer,
    options: RunOptions | None = None,
) -> Response | BaseModel:
    """A completion request (raw prompt text or token ids), as `serve_chat`."""
    if body.stream and (load := first_load(state, body.model)) is not None:
        return stream_after_load(
            request,
            load,
            renderer(Reply.unstarted(body.model or "", "completion")),
            lambda: serve_completion(state, request, body, renderer, options),
        )
    state = await model_state(state, body.model)
    if body.echo:
        raise unsupported("echo", "echo")
    if body.best_of is not None and body.best_of > 1:
        raise unsupported("best_of", "best_of > 1")
    fim = bool(body.suffix)
    if fim and fim_tokens(state.tokenizer) is None:
        raise APIError(
            400,
            f"suffix (fill-in-the-middle) needs a model with FIM tokens; {state.model_id!r} "
            "has none.",
            param="suffix",
            code="unsupported",
        )
    params = _sampling(state, body, body.max_tokens, "max_tokens", body.logprobs)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) > 1:
            raise APIError(
                400,
                "Batched prompts are not supported: send one prompt per request.",
                param="prompt",
                code="unsupported",
            )
        prompt = prompt[0]
    tok = state.tokenizer
    if fim:
        if not isinstance(prompt, str):
            raise APIError(400, "suffix needs a text prompt.", param="prompt", code="invalid_value")
        text = prompt
        try:
            tokens = await run_in_threadpool(encode_fim, tok, prompt, body.suffix or "")
        except Exception as e:  # e.g. lone surrogates the tokenizer cannot take
            raise APIError(
                400, f"Cannot tokenize the prompt: {e}", param="prompt", code="invalid_value"
            ) from None
    elif isinstance(prompt, str):
        text = prompt
        try:
            tokens = [int(t) for t in await run_in_threadpool(tok.encode, prompt)]
        except Exception as e:  # e.g. lone surrogates the tokenizer cannot take
            raise APIError(
                400, f"Cannot tokenize the prompt: {e}", param="prompt", code="invalid_value"
            ) from None
    else:  # token ids: a batch of several prompts was refused above
        tokens = [int(t) for t in cast("list[int]", prompt)]
        try:
            text = tok.decode(tokens)
        except Exception:  # out-of-range ids: the engine refuses them below
            text = ""
    _check_prompt(state, tokens, "prompt")
    return await _run(
        state, request, "completion", tokens, text, params, body, None, None, renderer, options
    )
