"""The route handlers, on three routers: OpenAI-compatible, the daemon's own, and admin.

Handlers get the `AppState` through the `get_state` dependency (``request.app.state.specd``),
so the routers are plain module-level objects that `create_app` includes. A generation route
validates what the worker cannot check (model name, unsupported options, token limits, the
prompt against the context) and hands the request to a `GenerationRun`; everything it refuses
is an `APIError` (400/404), before anything reaches the worker.

Authentication is enforced by the gate; the ``HTTPBearer`` dependency on the routes only
documents it in the OpenAPI schema (``/health`` takes no key).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Annotated, Any, Literal, cast
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from daemon import __version__
from daemon.core.backend import backend_info
from daemon.core.constraints import Constraint
from daemon.core.engine import SamplingParams
from daemon.core.prompts import encode_prompt, prompt_text
from daemon.errors import AdapterError, GenerationError
from daemon.logging import get_logger
from daemon.serving.api.errors import APIError
from daemon.serving.api.schemas import (
    ERROR_RESPONSES,
    IGNORED_HEADER,
    SSE_DOC,
    AcceptanceStatus,
    AdapterList,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    GenerationParams,
    HealthResponse,
    ModelCard,
    ModelList,
    ModelsStatus,
    QueueStatus,
    RollbackRequest,
    RollbackResponse,
    StatusResponse,
    TrainRequest,
    TrainResponse,
    unknown_fields,
)
from daemon.serving.api.state import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    MODEL_ALIASES,
    AdminControl,
    AppState,
)
from daemon.serving.api.streaming import GenerationRun
from daemon.serving.api.tools import forced_call_grammar
from daemon.serving.metrics import CONTENT_TYPE

__all__ = ["admin_router", "daemon_router", "get_state", "openai_router"]

log = get_logger("api")


async def get_state(request: Request) -> AppState:
    """The application's `AppState` (async: a sync dependency would cost a threadpool hop)."""
    state: AppState = request.app.state.specd
    return state


State = Annotated[AppState, Depends(get_state)]

bearer = HTTPBearer(auto_error=False, description="server.api_key, when configured")
AUTH = [Depends(bearer)]  # documents the scheme; the gate enforces it
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": SSE_DOC},
    **ERROR_RESPONSES,
}

openai_router = APIRouter(tags=["openai"], dependencies=AUTH)
daemon_router = APIRouter(tags=["daemon"])  # per route: /health takes no key
admin_router = APIRouter(tags=["admin"], dependencies=AUTH)


# --------------------------------------------------------------------------------------------
# Checks shared by the generation routes


def _check_model(state: AppState, model: str | None) -> None:
    if model in (None, "", state.model_id, *MODEL_ALIASES):
        return
    raise APIError(
        404,
        f"The model '{model}' does not exist; this server serves '{state.model_id}'.",
        param="model",
        code="model_not_found",
    )


def _unknown_fields(state: AppState, endpoint: str, body: BaseModel) -> list[str]:
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


def _with_ignored(out: Response | BaseModel, response: Response, names: list[str]) -> Any:
    """Name the ignored fields in the response's header (streamed or not); names that are
    not printable ASCII are percent-encoded (a header value is latin-1 text)."""
    if names:
        shown = [quote(n, safe="[]._-~") or '""' for n in names[:MAX_HEADER_NAMES]]
        if len(names) > MAX_HEADER_NAMES:
            shown.append(f"... ({len(names) - MAX_HEADER_NAMES} more)")
        value = ", ".join(shown)
        (out if isinstance(out, Response) else response).headers[IGNORED_HEADER] = value
    return out


def _unsupported(param: str, what: str) -> APIError:
    return APIError(400, f"{what} is not supported by specd.", param=param, code="unsupported")


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
        raise _unsupported("n", "n > 1 (several choices)")
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
) -> Response | BaseModel:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if forced_call is not None:  # building a matcher is CPU work, like _constraint's
        constraint: Constraint | None = await run_in_threadpool(
            Constraint, state.tokenizer, forced_call
        )
    else:
        constraint = await run_in_threadpool(_constraint, state, body)
    run = GenerationRun(
        state, request, kind, tokens, text, params, include_usage, constraint, tools
    )
    return await run.respond(bool(body.stream))


# --------------------------------------------------------------------------------------------
# OpenAI-compatible routes


@openai_router.post(
    CHAT_PATH,
    response_model=ChatCompletionResponse,
    responses=GENERATION_RESPONSES,
    summary="Chat completion (OpenAI-compatible)",
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, response: Response, state: State
) -> Response | BaseModel:
    ignored = _unknown_fields(state, CHAT_PATH, body)
    _check_model(state, body.model)
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
    messages = [_template_message(i, m) for i, m in enumerate(body.messages)]
    try:
        tokens = await run_in_threadpool(encode_prompt, state.tokenizer, messages, tools)
    except Exception as e:  # template errors (roles, missing fields) are the request's fault
        raise APIError(400, f"Cannot apply the chat template: {e}", param="messages") from None
    _check_prompt(state, tokens, "messages")
    out = await _run(
        state, request, "chat", tokens, prompt_text(messages), params, body, tools, forced
    )
    return _with_ignored(out, response, ignored)


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


@openai_router.post(
    COMPLETIONS_PATH,
    response_model=CompletionResponse,
    responses=GENERATION_RESPONSES,
    summary="Text completion (OpenAI-compatible legacy endpoint)",
)
async def completions(
    body: CompletionRequest, request: Request, response: Response, state: State
) -> Response | BaseModel:
    ignored = _unknown_fields(state, COMPLETIONS_PATH, body)
    _check_model(state, body.model)
    if body.echo:
        raise _unsupported("echo", "echo")
    if body.best_of is not None and body.best_of > 1:
        raise _unsupported("best_of", "best_of > 1")
    if body.suffix:
        raise _unsupported("suffix", "suffix")
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
    if isinstance(prompt, str):
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
    out = await _run(state, request, "completion", tokens, text, params, body)
    return _with_ignored(out, response, ignored)


def _model_card(state: AppState) -> ModelCard:
    return ModelCard(id=state.model_id, created=int(state.started))


@openai_router.get("/v1/models", response_model=ModelList)
async def list_models(state: State) -> ModelList:
    return ModelList(data=[_model_card(state)])


@openai_router.get(
    "/v1/models/{model:path}",
    response_model=ModelCard,
    responses={404: ERROR_RESPONSES[404]},
)
async def get_model(model: str, state: State) -> ModelCard:
    _check_model(state, model or "?")
    return _model_card(state)


# --------------------------------------------------------------------------------------------
# The daemon's own routes


@daemon_router.get(
    "/health",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "Shutting down"}},
)
async def health(state: State) -> Response | HealthResponse:
    if not state.accepting:
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    return HealthResponse(status="ok")


@daemon_router.get("/status", response_model=StatusResponse, dependencies=AUTH)
async def status(state: State) -> StatusResponse:
    worker = state.worker
    extra: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for provider in list(state.status_providers):
        try:
            extra.update(provider())
        except Exception as e:  # one broken component must not hide the rest
            name = getattr(provider, "__qualname__", repr(provider))
            errors[name] = repr(e)
    for key in [k for k in extra if k in StatusResponse.model_fields]:
        errors[f"key:{key}"] = "reserved key, ignored"
        del extra[key]
    if errors:
        extra["provider_errors"] = errors
    acceptance = state.metrics.rolling_acceptance()
    depth = worker.queue_depth
    return StatusResponse(
        version=__version__,
        pid=os.getpid(),
        uptime_s=round(time.time() - state.started, 3),
        accepting=state.accepting,
        models=ModelsStatus(
            target=state.model_id,
            draft=state.draft_id,
            draft_kind=state.draft_kind,
            draft_head_tokens=state.draft_head_tokens(),
            dtype=state.dtype,
            max_context=state.max_context,
            loaded=worker.loaded,
        ),
        backend=backend_info(),
        adapter_version=int(state.adapter_version()),
        acceptance=AcceptanceStatus(**acceptance),
        queue_depth=depth,
        rolling_acceptance=acceptance["acceptance_rate"],
        queue=QueueStatus(
            depth=depth,
            size=worker.queue_size,
            active=worker.active is not None,
            batched=worker.batched,
            batch_size=worker.batch_size,
            in_flight=state.in_flight,
        ),
        **extra,
    )


@daemon_router.get(
    "/metrics",
    response_class=PlainTextResponse,
    dependencies=AUTH,
    responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}},
)
async def metrics(state: State) -> PlainTextResponse:
    return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)


# --------------------------------------------------------------------------------------------
# Admin routes: the adaptation loop, through `AdminControl`


def _admin(state: AppState) -> AdminControl:
    if state.admin is None:
        # 409, not 5xx: the server works; its configuration (training.enabled) says no.
        raise APIError(
            409,
            "The adaptation loop is not running (training.enabled is false).",
            code="adaptation_disabled",
        )
    return state.admin


@admin_router.get(
    "/admin/adapters",
    response_model=AdapterList,
    responses={409: {"model": ErrorResponse}},
)
async def list_adapters(state: State) -> AdapterList:
    """Stored adapter versions and the one in service."""
    return AdapterList(**await asyncio.to_thread(_admin(state).list_adapters))


@admin_router.post(
    "/admin/adapters/rollback",
    response_model=RollbackResponse,
    responses={
        400: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        409: {"model": ErrorResponse},
    },
)
async def rollback(state: State, body: RollbackRequest | None = None) -> RollbackResponse:
    """Swap the draft to another stored version between requests (live, no restart)."""
    control = _admin(state)
    try:
        out = await asyncio.to_thread(control.rollback, body.version if body else None)
    except AdapterError as e:
        code = 404 if "no adapter version" in str(e) else 409
        raise APIError(code, str(e), param="version", code="adapter_error") from None
    return RollbackResponse(**out)


@admin_router.post(
    "/admin/train",
    response_model=TrainResponse,
    responses={400: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)
async def train_now(state: State, body: TrainRequest | None = None) -> TrainResponse:
    """Start a training run now (it goes through the same gate as automatic ones)."""
    control = _admin(state)
    body = body or TrainRequest()
    try:
        run_id = await asyncio.to_thread(control.train_now, body.epochs, body.max_steps)
    except RuntimeError as e:
        raise APIError(409, str(e), code="training_running") from None
    return TrainResponse(run_id=run_id)
