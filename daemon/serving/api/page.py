"""The status page at ``/`` and the JSON behind it (``/status/history``).

The page is static HTML, CSS and script shipped in the package (``static/``, with uPlot, a
small MIT-licensed chart library, so it works with no internet and no build step). Its files
hold no data and are served without the API key; everything it shows comes from endpoints that
need it (``/status``, ``/status/history``, ``/v1/models``), so with ``server.api_key`` set the
page asks for the key and keeps it in the browser.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response

from daemon.serving.api.errors import APIError
from daemon.serving.api.generation import served_models
from daemon.serving.api.routes import AUTH, State
from daemon.serving.api.schemas import ErrorResponse
from daemon.serving.api.state import MODEL_ALIASES

__all__ = ["STATIC_FILES", "page_router"]

page_router = APIRouter(tags=["page"])

# the page's files, by name: what /static/ serves (nothing else from the package)
STATIC_FILES = {
    "page.js": "text/javascript; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "uPlot.LICENSE": "text/plain; charset=utf-8",
}
DEFAULT_WINDOW_S = 86_400.0


def _static(name: str) -> bytes:
    return (resources.files("daemon.serving.api") / "static" / name).read_bytes()


@page_router.get("/", include_in_schema=False)
async def index() -> Response:
    return Response(_static("index.html"), media_type="text/html; charset=utf-8")


@page_router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    if name not in STATIC_FILES:
        raise APIError(404, f"no file {name!r}", code="not_found")
    return Response(
        _static(name),
        media_type=STATIC_FILES[name],
        headers={"Cache-Control": "no-cache"},  # a new specd version's page, not a stale one
    )


@page_router.get(
    "/status/history",
    summary="Traffic, training runs and adapters over time",
    dependencies=AUTH,
    responses={
        400: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        409: {"model": ErrorResponse},
    },
)
async def status_history(
    state: State,
    since: Annotated[float | None, Query(description="Unix time (default: a day ago).")] = None,
    until: Annotated[float | None, Query(description="Unix time (default: now).")] = None,
    step: Annotated[float | None, Query(gt=0, description="Seconds per bucket.")] = None,
    model: Annotated[str | None, Query(description="Served model (default: the target).")] = None,
) -> dict[str, Any]:
    """One served model's requests per time bucket from the replay buffer (count, decoding
    tokens/s, acceptance overall and per drafting source, adapter versions), its training runs
    (steps with loss and gradient norm, the gate's decision) and its adapter versions."""
    names = [m.name for m, _ in served_models(state)]
    name = state.model_id if model in (None, "", *MODEL_ALIASES) else model
    if name not in names:
        raise APIError(
            404,
            f"The model '{model}' is not served; served: {', '.join(names)}.",
            param="model",
            code="model_not_found",
        )
    if state.history is None:
        raise APIError(409, "No replay buffer is attached.", code="no_history")
    now = time.time()
    start = now - DEFAULT_WINDOW_S if since is None else since
    end = now if until is None else until
    if end <= start:
        raise APIError(400, f"since ({start}) must be before until ({end}).", param="since")
    history = await asyncio.to_thread(state.history, name, start, end, step)
    return history.to_dict()
