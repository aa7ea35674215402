"""Every error the API answers, as an OpenAI-style ``{"error": {...}}`` object.

Handlers raise `APIError`; `add_error_handlers` turns it, FastAPI's validation errors
(malformed JSON, schema violations: 400), Starlette's HTTP errors (unknown path: 404, wrong
method: 405) and anything unexpected (500, logged) into the same body shape. The gate, which
runs outside FastAPI, renders its refusals with `error_response`. A 5xx only means a bug or a
failure of the backend itself.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from daemon.logging import get_logger
from daemon.serving.api.schemas import ErrorDetail

log = get_logger("api")

__all__ = [
    "APIError",
    "ErrorJSONResponse",
    "add_error_handlers",
    "dialect_body",
    "error_body",
    "error_response",
]


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = headers


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ErrorJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: error messages may quote input with lone surrogates."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


# Anthropic's error types by status (its API reference, "Errors")
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def dialect_body(path: str, status: int, detail: dict[str, Any]) -> dict[str, Any]:
    """An error body in the shape the API at ``path`` uses: Ollama's ``{"error": message}``
    under ``/api/``, Anthropic's ``{"type": "error", "error": {"type", "message"}}`` for
    ``/v1/messages``, OpenAI's otherwise."""
    if path.startswith("/api/"):
        return {"error": detail["message"]}
    if path.startswith("/v1/messages"):
        kind = ANTHROPIC_TYPES.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": detail["message"]}}
    return {"error": detail}


def error_response(err: APIError, path: str = "") -> JSONResponse:
    body = dialect_body(path, err.status, err.detail.model_dump())
    return ErrorJSONResponse(body, status_code=err.status, headers=err.headers)


def add_error_handlers(app: FastAPI) -> None:
    """Answer every exception that reaches FastAPI with an OpenAI-style error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message = f"Invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}"
            code = "invalid_json"
            param = None
        elif first.get("type") == "extra_forbidden":
            # a field specd does not implement: refused, never silently dropped
            message = (
                f"Unsupported field {param!r}: specd does not implement it, and a request is "
                "never served with a field ignored."
            )
            code = "unsupported_parameter"
        else:
            parts = []
            for e in errors[:5]:
                where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
                parts.append(f"{where}: {e.get('msg')}")
            message = "Invalid request: " + "; ".join(parts)
            code = "invalid_value"
        detail = error_body(message, "invalid_request_error", param, code)["error"]
        return ErrorJSONResponse(dialect_body(request.url.path, 400, detail), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else None
        detail = error_body(str(exc.detail), "invalid_request_error", code=kind)["error"]
        return ErrorJSONResponse(
            dialect_body(request.url.path, exc.status_code, detail),
            exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled_error", path=request.url.path, error=repr(exc), exc_info=exc)
        detail = error_body("Internal server error.", "server_error", code="internal_error")
        return ErrorJSONResponse(dialect_body(request.url.path, 500, detail["error"]), 500)
