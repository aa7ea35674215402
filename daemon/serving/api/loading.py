"""The HTTP front while the models load: the port answers before the API exists.

The daemon binds and serves HTTP first, then loads its models (seconds to minutes for a large
target). Until the API is attached, `LoadingSwitch` answers ``/health`` with 503
``{"status": "loading"}`` and every other path with a 503 error and ``Retry-After``, so clients
and health checks see a daemon that is starting, not a refused connection.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from daemon.serving.api.errors import error_body

__all__ = ["LOADING_RETRY_AFTER_S", "LoadingSwitch"]

LOADING_RETRY_AFTER_S = 5


class LoadingSwitch:
    """An ASGI app that serves ``app`` once it is set, and the loading answers before."""

    def __init__(self) -> None:
        self.app: Any = None  # the API (an ASGI app), set when the models are ready

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        app = self.app
        if app is not None:
            await app(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        if scope.get("path") == "/health":
            response = JSONResponse({"status": "loading"}, status_code=503)
        else:
            response = JSONResponse(
                error_body(
                    "specd is loading its models; retry shortly.",
                    "service_unavailable",
                    code="loading",
                ),
                status_code=503,
                headers={"Retry-After": str(LOADING_RETRY_AFTER_S)},
            )
        await response(scope, receive, send)
