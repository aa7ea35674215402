"""specd's OpenAI-compatible HTTP API (FastAPI).

Endpoints
    ``POST /v1/chat/completions``, ``POST /v1/completions`` (non-streaming and SSE streaming),
    ``GET /v1/models``, ``GET /v1/models/{model}``, ``GET /health`` (no auth), ``GET /status``,
    ``GET /metrics`` (Prometheus text format), ``GET /openapi.json``, and the admin routes
    ``GET /admin/adapters``, ``POST /admin/adapters/rollback``, ``POST /admin/train``.

Requests are handed to the `GenerationWorker` (one thread owning the models, a bounded FIFO);
its events are bridged into asyncio by `AsyncHandle` (``loop.call_soon_threadsafe``). A full
queue answers 429 with ``Retry-After``; a client that goes away cancels its generation (the
worker stops at the next round).

Every error, including malformed JSON and schema violations, is an OpenAI-style error object
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status; a 5xx only means a bug or
a failure of the backend itself.

`create_app` takes an `AppState`: everything the handlers need, built by
:class:`daemon.server.Server`. Optional hooks on it: ``status_providers`` (callables returning
dicts merged into ``/status``), ``adapter_version`` (a callable) and ``admin`` (an
`AdminControl`: the adaptation loop, which serving never imports).

Modules, outermost first:

- ``app``: `create_app` (error handlers, routers, middleware);
- ``gate``: the outermost ASGI middleware (auth, body limit, shutting down, request metrics
  and logs);
- ``routes``: the route handlers on ``APIRouter``s, with the state from a dependency;
- ``streaming``: `AsyncHandle` and `GenerationRun` (submit, wait, JSON or SSE rendering);
- ``errors``: `APIError` and the handlers that give every error the OpenAI shape;
- ``schemas``: the pydantic request/response models and OpenAPI doc fragments;
- ``state``: `AppState`, `AdminControl`, `RequestInfo` and the paths the modules share.
"""

from daemon.serving.api.app import create_app
from daemon.serving.api.gate import MAX_BODY_BYTES
from daemon.serving.api.state import MODEL_ALIASES, AdminControl, AppState
from daemon.serving.api.streaming import AsyncHandle

__all__ = [
    "MAX_BODY_BYTES",
    "MODEL_ALIASES",
    "AdminControl",
    "AppState",
    "AsyncHandle",
    "create_app",
]
