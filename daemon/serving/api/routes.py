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
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel

from daemon import __version__
from daemon.core.backend import backend_info
from daemon.errors import AdapterError, AdapterNotFoundError
from daemon.logging import get_logger
from daemon.serving.api.errors import APIError
from daemon.serving.api.generation import (
    model_state,
    serve_chat,
    serve_completion,
    served_models,
    unknown_request_fields,
    with_ignored,
)
from daemon.serving.api.schemas import (
    ERROR_RESPONSES,
    SSE_DOC,
    AcceptanceStatus,
    AdapterList,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
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
)
from daemon.serving.api.state import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    MODEL_ALIASES,
    AdminControl,
    AppState,
    ModelListing,
)
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
    ignored = unknown_request_fields(state, CHAT_PATH, body)
    return with_ignored(await serve_chat(state, request, body), response, ignored)


@openai_router.post(
    COMPLETIONS_PATH,
    response_model=CompletionResponse,
    responses=GENERATION_RESPONSES,
    summary="Text completion (OpenAI-compatible legacy endpoint)",
)
async def completions(
    body: CompletionRequest, request: Request, response: Response, state: State
) -> Response | BaseModel:
    ignored = unknown_request_fields(state, COMPLETIONS_PATH, body)
    return with_ignored(await serve_completion(state, request, body), response, ignored)


def _model_card(state: AppState, listing: ModelListing) -> ModelCard:
    return ModelCard(
        id=listing.name,
        created=int(state.started),
        loaded=listing.loaded,
        adapter_version=listing.adapter_version,
        acceptance_rate=state.metrics.model_acceptance(listing.name),
    )


@openai_router.get("/v1/models", response_model=ModelList)
async def list_models(state: State) -> ModelList:
    return ModelList(data=[_model_card(state, m) for m, _ in served_models(state)])


@openai_router.get(
    "/v1/models/{model:path}",
    response_model=ModelCard,
    responses={404: ERROR_RESPONSES[404]},
)
async def get_model(model: str, state: State) -> ModelCard:
    listings = {m.name: m for m, _ in served_models(state)}
    name = state.model_id if model in ("", *MODEL_ALIASES) else model
    if name not in listings:
        await model_state(state, model or "?")  # raises the 404 naming what is served
    return _model_card(state, listings[name])


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
    # providers read the buffer, the adapter store and files: on a thread, so that a slow
    # disk delays this answer only, never the event loop every other request runs on
    extra, errors = await asyncio.to_thread(_provided, list(state.status_providers))
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
            loaded=next((m.loaded for m in state.models() if m.name == state.model_id), True),
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


def _provided(providers: list[Callable[[], dict[str, Any]]]) -> tuple[dict, dict[str, str]]:
    """What the status providers add, and the errors of those that failed."""
    extra: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for provider in providers:
        try:
            extra.update(provider())
        except Exception as e:  # one broken component must not hide the rest
            name = getattr(provider, "__qualname__", repr(provider))
            errors[name] = repr(e)
    return extra, errors


@daemon_router.get(
    "/metrics",
    response_class=PlainTextResponse,
    dependencies=AUTH,
    responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}},
)
async def metrics(state: State) -> PlainTextResponse:
    # gauges read the buffer and the worker: off the event loop, as /status
    text = await asyncio.to_thread(state.metrics.render)
    return PlainTextResponse(text, media_type=CONTENT_TYPE)


# --------------------------------------------------------------------------------------------
# Admin routes: the adaptation loop, through `AdminControl`


def _admin(state: AppState, model: str | None = None) -> AdminControl:
    """The adaptive loop of ``model`` (default: models.target)."""
    if model not in (None, "", state.model_id, *MODEL_ALIASES):
        names = [m.name for m, _ in served_models(state)]
        if model not in names:
            raise APIError(
                404,
                f"The model '{model}' is not served; served: {', '.join(names)}.",
                param="model",
                code="model_not_found",
            )
        admin = state.admins.get(model)
    else:
        admin = state.admin
    if admin is None:
        # 409, not 5xx: the server works; its configuration (training.enabled) says no.
        raise APIError(
            409,
            "The adaptation loop is not running (training.enabled is false).",
            code="adaptation_disabled",
        )
    return admin


@admin_router.get(
    "/admin/adapters",
    response_model=AdapterList,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)
async def list_adapters(state: State, model: str | None = None) -> AdapterList:
    """Stored adapter versions and the one in service (of ``model``; default: the target)."""
    listing = await asyncio.to_thread(_admin(state, model).list_adapters)
    return AdapterList(**asdict(listing))


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
    control = _admin(state, body.model if body else None)
    try:
        out = await asyncio.to_thread(control.rollback, body.version if body else None)
    except AdapterError as e:
        code = 404 if isinstance(e, AdapterNotFoundError) else 409
        raise APIError(code, str(e), param="version", code="adapter_error") from None
    return RollbackResponse(**asdict(out))


@admin_router.post(
    "/admin/train",
    response_model=TrainResponse,
    responses={
        400: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        409: {"model": ErrorResponse},
    },
)
async def train_now(state: State, body: TrainRequest | None = None) -> TrainResponse:
    """Start a training run now (it goes through the same gate as automatic ones)."""
    body = body or TrainRequest()
    control = _admin(state, body.model)
    try:
        run_id = await asyncio.to_thread(control.train_now, body.epochs, body.max_steps)
    except RuntimeError as e:
        raise APIError(409, str(e), code="training_running") from None
    return TrainResponse(run_id=run_id)
