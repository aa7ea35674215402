"""What the HTTP layer shares: `AppState`, the `AdminControl` protocol, per-request `RequestInfo`.

`AppState` is built by :class:`daemon.server.Server` and reaches the routes as
``request.app.state.specd``; the gate holds it directly. `AdminControl` is what the admin routes
need from the adaptation loop: serving never imports adaptation, the server passes its
``AdaptationLoop`` in and it fits the protocol structurally. `RequestInfo` is the record the
gate opens for each request (``scope["specd"]``), the generation route fills in, and the gate
counts and logs once the response has ended.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from daemon.config import Settings
from daemon.serving.metrics import SpecdMetrics
from daemon.serving.requests import RequestHandle

if TYPE_CHECKING:
    from daemon.serving.runtime import ModelRuntime
from daemon.serving.worker import GenerationWorker
from daemon.store.adapters import AdapterListing, Rollback
from daemon.store.history import StatusHistory

__all__ = [
    "CHAT_PATH",
    "CLIENT_CLOSED",
    "COMPLETIONS_PATH",
    "GENERATION_PATHS",
    "MESSAGES_PATH",
    "MODEL_ALIASES",
    "OLLAMA_CHAT_PATH",
    "OLLAMA_GENERATE_PATH",
    "AdminControl",
    "AppState",
    "ModelListing",
    "RequestInfo",
    "ServedModel",
]

MODEL_ALIASES = ("specd",)  # accepted in "model" besides the target id (and omitting it)
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
OLLAMA_CHAT_PATH = "/api/chat"
OLLAMA_GENERATE_PATH = "/api/generate"
MESSAGES_PATH = "/v1/messages"  # Anthropic's
GENERATION_PATHS = (
    CHAT_PATH,
    COMPLETIONS_PATH,
    OLLAMA_CHAT_PATH,
    OLLAMA_GENERATE_PATH,
    MESSAGES_PATH,
)
CLIENT_CLOSED = 499  # nginx's "client closed request", for logs and metrics only


class AdminControl(Protocol):
    """The adaptation loop as the ``/admin`` routes see it (blocking calls, run in a thread).

    ``list_adapters()``: the store's versions (`AdapterListing`). ``rollback(version)``: what
    it did (`Rollback`); raises ``daemon.errors.AdapterError`` for a version it cannot put in
    service (`AdapterNotFoundError` when there is no such version). ``train_now(epochs,
    max_steps)``: the new run's id; raises RuntimeError while a run is going.
    """

    def list_adapters(self) -> AdapterListing: ...

    def rollback(self, version: int | None = None) -> Rollback: ...

    def train_now(self, epochs: int | None = None, max_steps: int | None = None) -> str: ...


@dataclass
class ServedModel:
    """What the API needs of a served model to take its requests (its tokenizer, limits and
    the names it reports); the weights may be elsewhere (models.max_loaded)."""

    name: str
    tokenizer: Any
    draft_id: str = ""
    draft_kind: str = ""
    dtype: str = ""
    max_context: int | None = None
    vocab_size: int = 0
    model_details: dict[str, Any] = field(default_factory=dict)
    adapter_version: Callable[[], int] = lambda: 0


def served_model(runtime: ModelRuntime) -> ServedModel:
    """A loaded model as the API describes it (`daemon.serving.api.state.ServedModel`)."""
    from daemon.core.models import model_details  # loads MLX: only once a model is

    pair, engine = runtime.pair, runtime.engine
    assert pair is not None and engine is not None, "a model is described once loaded"
    return ServedModel(
        name=runtime.name,
        tokenizer=pair.tokenizer,
        draft_id=pair.draft_id,
        draft_kind=pair.draft_kind,
        dtype=pair.dtype,
        max_context=pair.max_context,
        vocab_size=engine.shared_vocab(),
        model_details=model_details(pair),
        adapter_version=lambda: runtime.adapter_version,
    )


@dataclass
class ModelListing:
    """A served model as ``/v1/models`` and ``/api/tags`` list it."""

    name: str
    loaded: bool  # its weights are in memory now
    adapter_version: int
    served: ServedModel | None  # None until it was first loaded
    expires_in: float | None = None  # seconds until it is freed if unused; None: not planned


@dataclass
class AppState:
    """What the HTTP handlers need; `daemon.server.Server` builds it.

    ``status_providers``: callables returning a dict merged into ``/status`` (e.g.
    ``{"buffer": {...}}``, ``{"training": {...}}``); a provider that raises is reported under
    ``provider_errors`` instead. ``adapter_version``: returns the version of the draft adapter in
    use (0: none); ``draft_head_tokens`` the size of its pruned output head (None: full).
    ``admin``: the adaptation loop, when it runs (the admin routes answer 409 without it).
    ``accepting`` turns False when shutdown starts: generation requests get 503.
    ``in_flight`` counts generation requests between arrival and their last byte.
    """

    settings: Settings
    worker: GenerationWorker
    tokenizer: Any
    metrics: SpecdMetrics
    model_id: str
    draft_id: str = ""
    draft_kind: str = ""
    dtype: str = ""
    max_context: int | None = None
    vocab_size: int = 0  # the vocabulary target and draft share: what a request may bias
    # what Ollama's /api/tags and /api/show report: family, parameter_size,
    # quantization_level, format, size (bytes of the target's weights)
    model_details: dict[str, Any] = field(default_factory=dict)
    adapter_version: Callable[[], int] = lambda: 0
    draft_head_tokens: Callable[[], int | None] = lambda: None  # None: the full head
    status_providers: list[Callable[[], dict[str, Any]]] = field(default_factory=list)
    admin: AdminControl | None = None
    admins: dict[str, AdminControl] = field(default_factory=dict)  # other models' loops
    # a served model's history for the status page: (model, since, until, step)
    history: Callable[[str, float, float, float | None], StatusHistory] | None = None
    # every served model (models.target first) and how to get one ready for its first request
    models: Callable[[], list[ModelListing]] = lambda: []
    load_model: Callable[[str], Future[ServedModel]] | None = None
    # keep a served model loaded this many seconds from now (Ollama's keep_alive alone)
    keep_alive: Callable[[str, float], None] | None = None
    started: float = field(default_factory=time.time)
    accepting: bool = True
    in_flight: int = 0
    # (endpoint, field) pairs of unknown request fields already logged (once each)
    unknown_logged: set[tuple[str, str]] = field(default_factory=set)

    def serving(self, model: ServedModel) -> AppState:
        """This state as the handlers of a request for ``model`` read it: its tokenizer,
        limits and names in place of models.target's (the counters stay this state's)."""
        return replace(
            self,
            tokenizer=model.tokenizer,
            model_id=model.name,
            draft_id=model.draft_id,
            draft_kind=model.draft_kind,
            dtype=model.dtype,
            max_context=model.max_context,
            vocab_size=model.vocab_size,
            model_details=model.model_details,
            adapter_version=model.adapter_version,
        )


@dataclass
class RequestInfo:
    """One request as the gate counts and logs it; the generation route fills in the rest.

    ``status`` is the status sent; ``status_override`` replaces it in metrics and logs (499 when
    the client went away mid-stream, after a 200 was already sent). ``handle`` is the submitted
    generation, cancelled by the gate when the response ends (a no-op once it finished).
    """

    t0: float
    endpoint: str
    status: int | None = None
    status_override: int | None = None
    handle: RequestHandle | None = None
    request_id: str | None = None
    stream: bool | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    acceptance_rate: float | None = None
    batched_tokens: int | None = None
    finish_reason: str | None = None
    ttft: float | None = None  # seconds from arrival to the first generated token
    error: str | None = None
