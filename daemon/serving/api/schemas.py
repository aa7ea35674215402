"""The HTTP API's pydantic models: requests, responses, errors, and OpenAPI doc fragments.

A field specd knows is honoured or refused (a 400 naming it: ``n > 1``, ``best_of > 1``), except
the documented harmless ones (`IGNORED_FIELDS`), accepted and ignored. A field it does not
know, at the top level or in a message, is accepted (``extra="allow"``: clients send vendor
extras and new parameters), logged once and named in the response's `IGNORED_HEADER`
(`unknown_fields`); ``server.strict_fields`` makes it a 400 instead. The response models are
both the JSON written and the ``/openapi.json`` schema, which the tests fuzz with
schemathesis; renaming a model renames its ``components/schemas`` entry. Errors are
OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (`ErrorResponse`);
`daemon.serving.api.errors` raises and renders them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# --------------------------------------------------------------------------------------------
# Errors


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail


# --------------------------------------------------------------------------------------------
# OpenAPI doc fragments

# The errors a generation route can answer; the other routes document a subset.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    429: {"model": ErrorResponse, "description": "Request queue full; see Retry-After"},
    503: {"model": ErrorResponse, "description": "Shutting down"},
}
SSE_DOC = {
    "text/event-stream": {
        # Before OpenAPI 3.2 the media type's schema describes one event of the stream.
        "schema": {
            "type": "object",
            "description": "With stream=true: server-sent events, one JSON chunk per "
            "'data:' line, ending with 'data: [DONE]'. Lines starting with ':' are keep-alive "
            "comments, sent while the request waits in the queue or prefills.",
            "properties": {
                "data": {"type": "string", "description": "A JSON chunk, or [DONE]."},
                "event": {"type": "string"},
            },
            "required": ["data"],
        }
    }
}


# --------------------------------------------------------------------------------------------
# Request and response models


# Requests are validated strictly: JSON ``false`` is not a ``top_k`` of 0, nor ``"1"`` a
# temperature (pydantic's lax mode would coerce both). Integers are still valid floats.
STRICT = ConfigDict(strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = Field(False, description="Send a final chunk carrying usage.")


Stop = Annotated[str, Field(min_length=1)]


# Accepted and ignored: they describe the request to OpenAI's platform (tracking, storage,
# billing tier), not the generation.
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier")
# The response header naming the unknown fields a request carried (ignored).
IGNORED_HEADER = "X-Specd-Ignored-Fields"
LENIENT = ConfigDict(extra="allow", strict=True)


def unknown_fields(body: BaseModel) -> list[str]:
    """The fields of ``body`` no model declares: top-level names, ``messages[].name`` and
    ``messages[].content[].name``; each once, in order."""
    out = list(body.model_extra or {})
    declared = "messages" in type(body).model_fields  # (an unknown "messages" is a value)
    for m in getattr(body, "messages", None) or [] if declared else []:
        if not isinstance(m, BaseModel):
            continue
        out += [f"messages[].{k}" for k in m.model_extra or {}]
        content = getattr(m, "content", None)
        if isinstance(content, list):
            for part in content:
                if isinstance(part, BaseModel):  # (another API's blocks are plain dicts)
                    out += [f"messages[].content[].{k}" for k in part.model_extra or {}]
    return list(dict.fromkeys(out))


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(
        default_factory=dict, alias="schema", description="The JSON schema the output follows."
    )
    strict: bool | None = Field(None, description="Output always follows the schema exactly.")


class ResponseFormat(BaseModel):
    model_config = STRICT | ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class GenerationParams(BaseModel):
    model_config = LENIENT

    model: str | None = Field(
        None, description="The served target model id or 'specd'; may be omitted."
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens to generate at most. More than server.max_tokens_limit or the "
        "context leaves room for is answered up to that bound, with finish_reason 'length'.",
    )
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="Extension: top-k filter (0: off).")
    stop: Stop | list[Stop] | None = Field(
        None, max_length=16, description="Stop string(s), not included in the output."
    )
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, description="Only 1 is supported.")
    response_format: ResponseFormat | None = Field(
        None,
        description="json_object or json_schema: the output follows it, by constrained "
        "decoding of the target and the draft (llguidance).",
    )
    min_p: float | None = Field(
        None, ge=0, le=1, description="Drop tokens less likely than min_p times the top one."
    )
    frequency_penalty: float | None = Field(
        None,
        ge=-2,
        le=2,
        description="Subtracted from a token's logit once per occurrence in the last "
        "frequency_context_size tokens.",
    )
    frequency_context_size: int | None = Field(None, ge=1, description="Default 20.")
    presence_penalty: float | None = Field(
        None,
        ge=-2,
        le=2,
        description="Subtracted from the logit of a token seen in the last "
        "presence_context_size tokens.",
    )
    presence_context_size: int | None = Field(None, ge=1, description="Default 20.")
    repetition_penalty: float | None = Field(
        None,
        ge=0,
        description="Divides a positive logit (multiplies a negative one) of a token seen in the "
        "last repetition_context_size tokens; 0 or 1: off.",
    )
    repetition_context_size: int | None = Field(None, ge=1, description="Default 20.")
    logit_bias: dict[str, float] | None = Field(
        None, description="Added to the logits of the given token ids (-100..100)."
    )
    user: str | None = Field(None, description="Accepted and ignored.")
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored.")
    store: bool | None = Field(None, description="Accepted and ignored (nothing is stored).")
    service_tier: str | None = Field(None, description="Accepted and ignored.")


class TextContentPart(BaseModel):
    model_config = LENIENT

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = STRICT | ConfigDict(extra="forbid")

    name: str
    arguments: str = Field(description="The arguments as JSON text.")


class ToolCall(BaseModel):
    model_config = STRICT | ConfigDict(extra="forbid")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = LENIENT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant's tool calls.")
    tool_call_id: str | None = Field(None, description="The call a 'tool' message answers.")
    audio: None = Field(None, description="Not supported (audio in messages is refused).")


class FunctionDef(BaseModel):
    model_config = STRICT | ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments.")
    strict: bool | None = None


class Tool(BaseModel):
    model_config = STRICT | ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = STRICT | ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT | ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(GenerationParams):
    messages: list[ChatMessage] = Field(..., min_length=1)
    tools: list[Tool] | None = Field(
        None,
        description="Functions the model may call (the model's chat template must support them).",
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description="'required' or a named function forces a call (by constrained decoding).",
    )
    parallel_tool_calls: bool | None = Field(
        None, description="Accepted; a forced call is one call, otherwise the model decides."
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None,
        description="Passed to the chat template, e.g. {'enable_thinking': false} for Qwen3.",
    )
    reasoning_effort: str | None = Field(
        None,
        description="Passed to the chat template as reasoning_effort (templates without it "
        "ignore it).",
    )
    logprobs: bool | None = Field(
        None,
        description="Return each output token's log-probability: the target's, after the "
        "penalties and logit_bias, at temperature 1.",
    )
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="With logprobs: the most likely alternatives per token."
    )


class CompletionRequest(GenerationParams):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        ..., description="A string, or one prompt's token ids; batches are not supported."
    )
    echo: bool | None = Field(False, description="Not supported (must be false).")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="Return each output token's log-probability and this many alternatives.",
    )
    best_of: int | None = Field(None, ge=1, description="Only 1 is supported.")
    suffix: str | None = Field(
        None,
        description="Fill-in-the-middle: the text after the cursor (models with FIM tokens).",
    )


class SourceUsage(BaseModel):
    drafted: int = Field(description="Tokens this source proposed.")
    accepted: int = Field(description="Of those, tokens the target accepted.")


class SpeculativeUsage(BaseModel):
    drafted: int = Field(description="Draft tokens proposed.")
    accepted: int = Field(description="Draft tokens the target accepted.")
    num_drafts: int = Field(description="Verification rounds that drafted tokens.")
    acceptance_rate: float = Field(description="accepted / drafted (0 if nothing drafted).")
    mean_accepted_length: float = Field(description="1 + accepted / num_drafts.")
    sources: dict[str, SourceUsage] = Field(
        description="drafted / accepted by drafting source: 'model' (the draft model), "
        "'lookup' (copied from the request's own context), 'suffix' (from past outputs)."
    )
    adapter_version: int = Field(
        description="The draft adapter version that served the request (0: none). Adapters are "
        "swapped between requests, so one version served all of it.",
    )
    batched_tokens: int = Field(
        0,
        description="Completion tokens decoded in a batch with other requests (continuous "
        "batching; nothing is drafted there). 0: served alone, speculatively, throughout.",
    )


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(
        description="Prompt tokens served from the prompt cache (not processed again)."
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    speculative: SpeculativeUsage


FinishReason = Literal["stop", "length", "tool_calls"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="The token's UTF-8 bytes.")


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(
        None, description="A reasoning model's thinking (the text of its thinking block)."
    )
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    """A completion; streamed chunks have the same shape (usage null until the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "specd"
    loaded: bool | None = Field(None, description="specd: its weights are in memory now.")
    adapter_version: int | None = Field(
        None, description="specd: the draft adapter in service (0: none)."
    )
    acceptance_rate: float | None = Field(
        None, description="specd: accepted / drafted tokens over its requests since start."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: Literal["ok", "shutting_down", "loading"] = Field(
        description="'loading' (with 503) while the models load after start"
    )


class ModelsStatus(BaseModel):
    target: str
    draft: str
    draft_kind: str
    draft_head_tokens: int | None = Field(
        description="Tokens the draft's pruned output head covers (the adapter's subset); "
        "null: the full vocabulary."
    )
    dtype: str
    max_context: int | None
    loaded: bool = Field(
        description="The weights are in memory; false after models.keep_alive_seconds without "
        "requests (the next request loads them again)."
    )


class AcceptanceStatus(BaseModel):
    window: int | None = Field(description="Number of most recent requests considered.")
    requests: int
    drafted: int
    accepted: int
    acceptance_rate: float | None
    mean_accepted_length: float | None


class QueueStatus(BaseModel):
    depth: int = Field(description="Requests waiting for the worker.")
    size: int = Field(description="Queue capacity (server.queue_size).")
    active: bool = Field(description="A generation is running.")
    batched: int = Field(description="Requests being decoded together in a batch now.")
    batch_size: int = Field(description="The most decoded together (server.batch_size).")
    in_flight: int = Field(description="Generation requests being served (queued included).")


class StatusResponse(BaseModel):
    """Daemon status; attached components (replay buffer, training) add their own keys."""

    model_config = ConfigDict(extra="allow")

    version: str
    pid: int
    uptime_s: float
    accepting: bool
    models: ModelsStatus
    backend: dict[str, Any]
    adapter_version: int
    acceptance: AcceptanceStatus
    queue: QueueStatus
    queue_depth: int = Field(description="Same as queue.depth.")
    rolling_acceptance: float | None = Field(description="Same as acceptance.acceptance_rate.")


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    version: int | None = Field(
        None,
        ge=0,
        description="Version to put in service (0: no adapter); default: the "
        "installed version before the current one.",
    )
    model: str | None = Field(None, description="The served model (default: models.target).")


class RollbackResponse(BaseModel):
    previous_version: int
    adapter_version: int


class AdapterInfo(BaseModel):
    version: int
    status: str
    created: float | None = None
    parent: int | None = None
    gate: dict[str, Any] | None = None
    heldout_agreement: float | None = None
    expected_speedup: float | None = None


class AdapterList(BaseModel):
    current: int
    versions: list[AdapterInfo]


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    epochs: int | None = Field(None, ge=1, description="Default: training.epochs.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many updates.")
    model: str | None = Field(None, description="The served model (default: models.target).")


class TrainResponse(BaseModel):
    run_id: str
