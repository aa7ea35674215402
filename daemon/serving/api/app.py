"""`create_app`: the FastAPI application around an `AppState`.

Wiring only: the OpenAPI metadata, the error handlers (`daemon.serving.api.errors`), the three
routers (`daemon.serving.api.routes`) and, outermost, the `Gate` middleware.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from daemon import __version__
from daemon.serving.api.anthropic import anthropic_router
from daemon.serving.api.errors import add_error_handlers
from daemon.serving.api.gate import Gate
from daemon.serving.api.ollama import ollama_router
from daemon.serving.api.page import page_router
from daemon.serving.api.routes import admin_router, daemon_router, openai_router
from daemon.serving.api.schemas import IGNORED_HEADER
from daemon.serving.api.state import AppState

__all__ = ["create_app"]


def create_app(state: AppState) -> FastAPI:
    """Build the FastAPI application around ``state``."""
    app = FastAPI(
        title="specd",
        version=__version__,
        description="OpenAI-compatible speculative decoding with live acceptance metrics. "
        "When server.api_key is set, every endpoint except /health needs "
        "'Authorization: Bearer <key>'.",
    )
    app.state.specd = state  # the routes' `get_state`
    add_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(daemon_router)
    app.include_router(admin_router)
    app.include_router(ollama_router)
    app.include_router(anthropic_router)
    app.include_router(page_router)
    app.add_middleware(Gate, state=state)
    origins = state.settings.server.cors_origins
    if origins:
        # outermost, so that preflights and error responses carry the CORS headers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["Retry-After", IGNORED_HEADER],
        )
    _document_auth_as_configured(app, state)
    return app


def _document_auth_as_configured(app: FastAPI, state: AppState) -> None:
    """``/openapi.json`` requires the bearer key only while ``server.api_key`` is set.

    The key can be set or removed by a live config reload, so the document follows the
    current settings instead of FastAPI's cached one: a client (or a fuzzer) reading it never
    sees a requirement the server does not enforce.
    """
    full = app.openapi  # FastAPI's own builder, cached after its first call

    def openapi() -> dict[str, Any]:
        doc = full()
        if state.settings.server.api_key is not None:
            return doc
        open_doc = copy.deepcopy(doc)
        for operations in open_doc.get("paths", {}).values():
            for operation in operations.values():
                if isinstance(operation, dict):
                    operation.pop("security", None)
        return open_doc

    app.openapi = openapi  # type: ignore[method-assign]
