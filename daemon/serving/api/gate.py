"""The outermost ASGI middleware: auth, shutdown, body size, per-request metrics and logs.

`Gate` runs before routing, so it sees every request, including those FastAPI would answer
itself (unknown paths, malformed bodies), and every response's status and end, including the
end of an SSE stream. It is plain ASGI: it reads (and replays) the body before FastAPI does, and
wraps ``send`` to see when a streamed response really ends.

For each request it opens a `RequestInfo` in ``scope["specd"]``; the generation route fills it
in, and when the response ends the gate cancels any generation still running (a client that
went away frees the worker), counts the request in `SpecdMetrics` and logs generation requests.
"""

from __future__ import annotations

import hmac
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon.logging import get_logger
from daemon.serving.api.errors import APIError, error_response
from daemon.serving.api.state import GENERATION_PATHS, AppState, RequestInfo

log = get_logger("api")

__all__ = ["KNOWN_PATHS", "MAX_BODY_BYTES", "Gate", "endpoint_label"]

MAX_BODY_BYTES = 1 << 20  # request bodies above this get 413
# Metric labels: these paths as they are, anything else as "other" (bounded label values).
KNOWN_PATHS = (
    *GENERATION_PATHS,
    "/v1/models",
    "/health",
    "/status",
    "/metrics",
    "/admin/adapters",
    "/admin/adapters/rollback",
    "/admin/train",
    "/openapi.json",
    "/docs",
    "/redoc",
    "/api/tags",
    "/api/show",
    "/api/ps",
    "/api/version",
    "/v1/messages/count_tokens",
    "/",
    "/status/history",
)
# the status page's own files hold no data: a browser gets them without the key, then asks
# for it (daemon.serving.api.page)
NO_AUTH_PATHS = ("/health", "/")
NO_AUTH_PREFIXES = ("/static/",)


def endpoint_label(path: str) -> str:
    """The ``endpoint`` label of a request to ``path``."""
    if path in KNOWN_PATHS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/static/"):
        return "/static/{file}"
    return "other"


def _force_json(scope: Scope) -> None:
    """Read generation bodies as JSON whatever their Content-Type.

    ``curl -d '{...}'`` sends ``application/x-www-form-urlencoded``; other OpenAI-compatible
    servers accept that, and a body that is not JSON still gets a clear 400.
    """
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    ctype = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
    if b"json" not in ctype.lower():
        scope["headers"] = [*headers, (b"content-type", b"application/json")]


class Gate:
    """Outermost middleware: runs before routing and sees every response's status and end."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        t0 = time.monotonic()
        path = scope["path"]
        endpoint = endpoint_label(path)
        generation = endpoint in GENERATION_PATHS and scope["method"] == "POST"
        info = RequestInfo(t0=t0, endpoint=endpoint)
        scope["specd"] = info

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                info.status = message["status"]
            await send(message)

        if generation:
            state.in_flight += 1
            _force_json(scope)
        try:
            err = self._check(scope, path, generation)
            if err is None:
                receive, err = await self._read_body(scope, receive)
            if err is not None:
                await error_response(err, path)(scope, receive, send_wrapper)
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            if info.handle is not None:
                info.handle.cancel()  # no-op once it finished; frees the worker otherwise
            if generation:  # after the cancel: a drained server has nothing left to run
                state.in_flight -= 1
            self._finished(info, generation)

    def _check(self, scope: Scope, path: str, generation: bool) -> APIError | None:
        key = self.state.settings.server.api_key
        if key is not None and path not in NO_AUTH_PATHS and not path.startswith(NO_AUTH_PREFIXES):
            auth = ""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    auth = value.decode("latin-1")
                    break
                if name == b"x-api-key":  # Anthropic's clients send the key here
                    auth = "Bearer " + value.decode("latin-1")
            scheme, _, token = auth.partition(" ")
            expected = key.get_secret_value().encode()
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode("latin-1"), expected
            ):
                msg = "Missing API key" if not auth else "Incorrect API key provided"
                return APIError(
                    401,
                    f"{msg}: pass it as 'Authorization: Bearer <key>' or 'x-api-key: <key>' "
                    "(server.api_key).",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        if generation and not self.state.accepting:
            return APIError(
                503,
                "The server is shutting down and accepts no new requests.",
                type="service_unavailable",
                code="shutting_down",
            )
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[Receive, APIError | None]:
        """Read the whole body (up to MAX_BODY_BYTES) and replay it to the app."""
        too_large = APIError(
            413,
            f"Request body too large (limit {MAX_BODY_BYTES} bytes).",
            code="request_too_large",
        )
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    if int(value) > MAX_BODY_BYTES:
                        return receive, too_large
                except ValueError:
                    pass
                break
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnect: let the app notice it
                pending: list[Message] = [message]
                break
            body = message.get("body", b"")
            size += len(body)
            if size > MAX_BODY_BYTES:
                return receive, too_large
            chunks.append(body)
            if not message.get("more_body", False):
                pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replay() -> Message:
            if pending:
                return pending.pop()
            return await receive()

        return replay, None

    def _finished(self, info: RequestInfo, generation: bool) -> None:
        status = info.status_override or info.status or 500
        endpoint = info.endpoint
        duration = time.monotonic() - info.t0
        ok = 200 <= status < 300
        self.state.metrics.observe_request(
            endpoint,
            status,
            duration=duration if generation and ok else None,
            ttft=info.ttft if generation and ok else None,
        )
        if generation:
            log.info(
                "request_finished",
                endpoint=endpoint,
                status=status,
                stream=info.stream,
                prompt_tokens=info.prompt_tokens,
                completion_tokens=info.completion_tokens,
                acceptance_rate=info.acceptance_rate,
                batched_tokens=info.batched_tokens,
                finish_reason=info.finish_reason,
                duration_s=round(duration, 4),
                ttft_s=round(info.ttft, 4) if info.ttft is not None else None,
                request_id=info.request_id,
                error=info.error,
            )
