"""The settings' sections, one pydantic model each (``models.*``, ``server.*``, ...), with
their defaults, bounds and the reasons for them; `daemon.config.settings` puts them together."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import platformdirs
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from daemon.config.merge import merge

APP_NAME = "specd"
ENV_PREFIX = "SPECD_"
ENV_NESTED = "__"
EMBEDDED_TARGET = "embedded:smollm2-135m"
AUTO_DRAFT = "auto"  # models.draft: a feature draft where the target allows one, else layer-skip


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelEntry(_Section):
    """One more model the daemon serves (``models.targets.NAME``), chosen by a request's
    ``model``; what it leaves out is taken from the ``models.*`` keys."""

    target: str = Field(description="A local MLX directory, an HF repo id or the embedded one.")
    draft: str | None = Field(AUTO_DRAFT, description="As models.draft.")
    draft_layers: list[int] | None = Field(None, description="As models.draft_layers.")
    draft_head_tokens: int | None = Field(None, ge=0, description="As models.draft_head_tokens.")
    feature_layers: Literal["auto"] | list[int] | None = Field(
        None, description="As models.feature_layers."
    )
    keep_alive_seconds: float | None = Field(
        None,
        gt=0,
        description="As models.keep_alive_seconds, for this model alone; .inf: never freed "
        "for idleness (null: models.keep_alive_seconds).",
    )
    speculative: dict[str, Any] = Field(
        default_factory=dict, description="speculative.* keys with other values for this model."
    )
    training: dict[str, Any] = Field(
        default_factory=dict,
        description="training.* keys (lora.* included) with other values for this model.",
    )

    @field_validator("draft_layers")
    @classmethod
    def _check_layers(cls, layers: list[int] | None) -> list[int] | None:
        return None if layers is None else _check_draft_layers(layers)

    def same_weights(self, other: ModelEntry) -> bool:
        """Whether ``other`` loads the same models (it may differ in the keys that apply to
        a loaded one: keep-alive, speculative and training settings)."""
        keys = {"target", "draft", "draft_layers", "draft_head_tokens", "feature_layers"}
        return self.model_dump(include=keys) == other.model_dump(include=keys)

    @field_validator("speculative")
    @classmethod
    def _check_speculative(cls, values: dict[str, Any]) -> dict[str, Any]:
        overridden(SpeculativeSettings(), values)  # a bad key or value is named now
        return values

    @field_validator("training")
    @classmethod
    def _check_training(cls, values: dict[str, Any]) -> dict[str, Any]:
        overridden(TrainingSettings(), values)
        return values


SectionT = TypeVar("SectionT", bound=BaseModel)


def overridden(section: SectionT, values: dict[str, Any]) -> SectionT:
    """``section`` with ``values`` deep-merged over it, validated as the section is; a
    ValueError naming the first bad key otherwise."""
    merged = section.model_dump()
    merge(merged, values, {}, "")
    try:
        return type(section).model_validate(merged)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "?"
        raise ValueError(f"{where}: {err['msg']}") from None


class ModelsSettings(_Section):
    target: str = Field(
        EMBEDDED_TARGET,
        description="Target model: the embedded default, a local MLX directory or an HF repo id.",
    )
    draft: str | None = Field(
        AUTO_DRAFT,
        description="'auto': 'feature' where the target's hidden states are at hand in this "
        "process (not a target split across a group; an mlx-lm family that exposes them), "
        "else null. 'feature': a draft over the target's own hidden states, learned from "
        "traffic (the layer-skip draft serves until its first version passes the gate). "
        "null: a layer-skip draft (LoRA learned). Else a separate draft model (path or repo id).",
    )
    draft_layers: list[int] = Field(
        default_factory=lambda: [0, 1, 2, 3],
        description="Target layer indices that make up the layer-skip draft.",
    )
    feature_layers: Literal["auto"] | list[int] = Field(
        "auto",
        description="models.draft: feature. Target layers whose outputs the feature draft "
        "reads besides the final hidden states (EAGLE-3); auto: a low, the middle and a "
        "high layer (2, L/2, L-3); []: the final hidden states alone.",
    )
    draft_head_tokens: int = Field(
        8192,
        ge=0,
        description="Cut the draft's output head to this many frequent tokens (FR-Spec; the "
        "target still verifies over the full vocabulary); 0: the full head.",
    )
    dequantize: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: dequantize quantized weights to float32 on the CPU backend only."
    )
    preload_openblas: bool = Field(
        True, description="Linux CPU backend: re-exec once with a system OpenBLAS preloaded."
    )
    trust_remote_code: bool = False
    keep_alive_seconds: float | None = Field(
        None,
        gt=0,
        description="Free the models' memory after this many seconds without requests and "
        "load them again on the next one (Ollama's keep_alive); null: keep them loaded.",
    )
    targets: dict[str, ModelEntry] = Field(
        default_factory=dict,
        description="More models served by name, besides models.target (served under its own "
        "id); each loaded on its first request.",
    )
    max_loaded: int = Field(
        2,
        ge=1,
        description="Models kept in memory at once; the least recently used beyond it are "
        "written to the data dir and freed until a request names them again.",
    )
    split: Literal["auto", "tensor", "pipeline"] = Field(
        "auto",
        description="How a group of ranks splits the target: tensor (heads and MLP columns; "
        "needs them to divide; two all-reduces per layer), pipeline (blocks of layers; one "
        "hand-off per rank), auto (tensor over a JACCL/RDMA link when the shapes divide, "
        "pipeline otherwise).",
    )
    split_layers: list[int] | None = Field(
        None,
        description="A pipeline split's layers per rank, in rank order; null: proportional "
        "to each rank's free memory.",
    )
    memory_budget_gb: float | None = Field(
        None,
        gt=0,
        description="Weights kept in memory at once, in GB (besides models.max_loaded): the "
        "least recently used models are freed before one that would pass it loads; null: no "
        "budget.",
    )

    @field_validator("draft_layers")
    @classmethod
    def _check_layers(cls, layers: list[int]) -> list[int]:
        return _check_draft_layers(layers)

    @model_validator(mode="after")
    def _check_names(self) -> ModelsSettings:
        for name in self.targets:
            if not name.strip() or name != name.strip():
                raise ValueError(f"targets: {name!r} is not a model name")
            if name == self.target:
                raise ValueError(f"targets: {name!r} is models.target's own name")
        return self

    def names(self) -> list[str]:
        """The models served, by the name a request gives: models.target first."""
        return [self.target, *self.targets]

    def entry(self, name: str) -> ModelsSettings:
        """These settings as they apply to model ``name`` (KeyError when not served)."""
        if name == self.target:
            return self
        e = self.targets[name]
        changes: dict[str, Any] = {"target": e.target, "draft": e.draft, "targets": {}}
        if e.draft_layers is not None:
            changes["draft_layers"] = e.draft_layers
        if e.draft_head_tokens is not None:
            changes["draft_head_tokens"] = e.draft_head_tokens
        if e.feature_layers is not None:
            changes["feature_layers"] = e.feature_layers
        if e.keep_alive_seconds is not None:
            changes["keep_alive_seconds"] = e.keep_alive_seconds
        return self.model_copy(update=changes)


def _check_draft_layers(layers: list[int]) -> list[int]:
    if not layers:
        raise ValueError("must name at least one layer")
    if any(i < 0 for i in layers):
        raise ValueError("layer indices must be non-negative")
    if len(set(layers)) != len(layers):
        raise ValueError("contains duplicates")
    return layers


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    api_key: SecretStr | None = None
    allow_insecure_bind: bool = Field(
        False, description="Allow binding a non-loopback address without an API key."
    )
    queue_size: int = Field(16, ge=1, description="Requests waiting for the generation worker.")
    batch_size: int = Field(
        8,
        ge=1,
        le=256,
        description="Requests decoded together when several are ready (continuous batching, "
        "no speculation inside a batch); 1: one at a time, always speculative.",
    )
    max_tokens_limit: int = Field(
        4096,
        ge=1,
        description="The most tokens one answer may have: a request asking more is answered "
        "up to it, with finish_reason 'length' (an operator's cap, not a client error).",
    )
    strict_fields: bool = Field(
        False,
        description="Refuse (400) a request carrying a field specd does not know; off: such "
        "fields are ignored, logged once and named in the X-Specd-Ignored-Fields header.",
    )
    shutdown_timeout: float = Field(30.0, ge=0, description="Seconds to finish in-flight work.")
    request_timeout_seconds: float | None = Field(
        600.0,
        gt=0,
        description="A request that hears nothing from the worker (no token, no answer) for "
        "this long, queued or running, is stopped with an error (504): the last line of "
        "defence against a hang; null: never.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed to call the API (CORS), e.g. "
        "'http://localhost:3000', or '*'; empty: none.",
    )
    prompt_cache_size: int = Field(
        10,
        ge=0,
        description="Finished requests whose KV caches are kept so that a prompt starting "
        "the same way (the next turn of a chat) skips that prefill; 0: off.",
    )
    prompt_cache_bytes: int = Field(
        1 << 31, ge=0, description="Memory the kept KV caches may use, target and draft together."
    )
    rank_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="Served across ranks (mlx.launch): a rank whose collective does not "
        "finish within this long is taken as gone, and the others exit with an error naming "
        "it. Must exceed the longest single forward (a prefill chunk).",
    )


class SpeculativeSettings(_Section):
    num_draft_tokens: int = Field(4, ge=1, le=64)
    adaptive: bool = True
    min_draft_tokens: int = Field(1, ge=1, le=64)
    max_draft_tokens: int = Field(8, ge=1, le=64)
    top_logprobs: int = Field(20, ge=1, le=1000)
    lookup: bool = Field(True, description="Draft by copying from the request's own context.")
    suffix_tokens: int = Field(
        65536, ge=0, description="Past outputs kept to draft from (tokens; 0: off)."
    )
    max_proposal_tokens: int = Field(16, ge=1, le=64)
    cost_aware: bool = Field(
        True, description="Choose each round's source and length by measured tokens per second."
    )
    continue_proposals: bool = Field(
        True,
        description="Let the draft model continue a copied proposal that runs out, in the "
        "same round, where the measured costs say it pays (cost_aware; not a feature draft).",
    )
    draft_confidence: bool = Field(
        False,
        description="In a model round, verify a draft token only where the draft's confidence "
        "there says it pays for its row, and draft another only where one more may pay "
        "(cost_aware).",
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> SpeculativeSettings:
        if self.min_draft_tokens > self.max_draft_tokens:
            raise ValueError("min_draft_tokens must not exceed max_draft_tokens")
        return self


class SamplingSettings(_Section):
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="0: off.")
    repetition_penalty: float = Field(
        0.0, ge=0.0, description="Over the last 20 tokens (mlx-lm's); 0 or 1: off."
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Default for requests without max_tokens; null: until EOS or the end of "
        "the context (within server.max_tokens_limit).",
    )


class BufferSettings(_Section):
    failure_threshold: float = Field(0.7, ge=0.0, le=1.0)
    holdout_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_records: int = Field(100_000, ge=1)


class LoraSettings(_Section):
    # 32, not the seed's 8: +0.026 held-out agreement after one run on 316 failures (README).
    rank: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    scale: float = Field(20.0, gt=0.0)
    keys: list[str] | None = Field(None, description="Module keys to adapt; null = mlx-lm default.")
    num_layers: int = Field(-1, description="Last N draft layers get LoRA; -1 = all.")


TrainingLoss = Literal["ce", "fkl", "tvd", "jsd", "acceptance"]
TRAINING_LOSSES: tuple[str, ...] = get_args(TrainingLoss)


class TrainingSettings(_Section):
    # 1e-3 without accumulation, not the seed's 1e-4 x 4: held-out agreement after one run on
    # 120 failures went 0.03 -> 0.38 instead of 0.03 -> 0.05 (README, "Training the draft").
    learning_rate: float = Field(1e-3, gt=0.0)
    warmup_steps: int = Field(10, ge=0)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    min_failure_cases: int = Field(50, ge=1)
    # 0.5: small runs revisit older traffic; with rank 32, the loop's schedule gained ~+0.04
    # over rank 8 + replay 0.2 (README; the two were not measured apart).
    replay_ratio: float = Field(0.5, ge=0.0, lt=1.0)
    # 3, not 2: +0.025 held-out agreement on 316 failures (README, "Training the draft").
    epochs: int = Field(3, ge=1, description="Passes over a run's examples.")
    feature_epochs: int | None = Field(
        6,
        ge=1,
        description="models.draft: feature. Passes over a run's examples for a feature draft "
        "(a whole layer keeps gaining from passes over a small buffer); null: training.epochs.",
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="Clip the global gradient norm.")
    loss: TrainingLoss = Field(
        "ce",
        description="Per-position loss: cross-entropy with the target's output token, or a "
        "divergence from the target's full distribution (forward KL, total variation, "
        "Jensen-Shannon, -log of the speculative acceptance probability), recomputed by the "
        "training process.",
    )
    kd_weight: float = Field(
        0.0, ge=0.0, description="Weight of KL(target top-k || draft) at rejected positions."
    )
    disagreement_weight: float = Field(
        0.0,
        ge=0.0,
        description="Extra loss weight (1 + this) on positions where the draft was rejected "
        "in service or, teacher forced, the draft as the run starts disagrees with the target.",
    )
    feature_regression: float = Field(
        1.0,
        ge=0.0,
        description="models.draft: feature. Weight of the smooth-L1 distance between the "
        "draft's output features and the target's (EAGLE's regression term), next to the "
        "token loss.",
    )
    feature_second_step: float = Field(
        1.0,
        ge=0.0,
        description="models.draft: feature. Weight of the loss on a round's second draft "
        "token, drafted from the draft's own first output feature as in service (HASS); 0: off.",
    )
    feature_prompt_weight: float = Field(
        1.0,
        ge=0.0,
        description="models.draft: feature. Weight of a loss at the prompt's positions, each "
        "labelled with the token the target would put next there (its own greedy choice, "
        "read from the features the run computes anyway); 0: off.",
    )
    feature_noise: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="models.draft: feature. Uniform noise added to the target's features the "
        "draft reads in training, U(-a, a) times each feature's RMS (EAGLE's augmentation); "
        "0: off.",
    )
    feature_layer_lr: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="models.draft: feature. Learning rate of the draft's decoder layer (a copy "
        "of the target's last) as a fraction of training.learning_rate; the projections keep "
        "the full rate. 0 freezes the layer.",
    )
    rehearsal_tokens: int | None = Field(
        None,
        ge=0,
        description="Tokens a run may generate with the target before it trains: its own "
        "answers to the run's train prompts, each started from 1-4 sampled tokens (and the "
        "rewritten requests of training.rehearsal_requests), as extra examples (kept for later "
        "runs); never from holdout rows. 0: off; null: 16384 for a feature draft (measured to "
        "pay), 0 for the others (not measured).",
    )
    rehearsal_variants: int = Field(
        1,
        ge=1,
        description="Rehearsed answers per recorded train prompt (training.rehearsal_tokens).",
    )
    rehearsal_requests: int = Field(
        0,
        ge=0,
        description="Rewritten requests per recorded train prompt, within training."
        "rehearsal_tokens: the prompt's last message kept in part, the rest sampled from the "
        "target, then the target's greedy answer, as extra examples. 0: off.",
    )
    synthetic_per_failure: float = Field(
        0.0,
        ge=0.0,
        le=8.0,
        description="Synthetic rows like the traffic (specd warmup's) a run writes with the "
        "target before it trains, per pending failure case of real traffic, less those already "
        "pending; stored in the buffer as train rows, trained on by this run and replayed by "
        "later ones. 0: off.",
    )
    optimizer: Literal["adamw", "adam"] = "adamw"
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay.")
    min_lr_ratio: float = Field(
        0.1, ge=0.0, le=1.0, description="Cosine decay ends at learning_rate * this."
    )
    eval_max_rows: int = Field(200, ge=1, description="Holdout rows scored before/after a run.")
    seed: int = Field(0, description="Shuffling, replay sampling and LoRA initialisation.")
    # The adaptive loop (when training runs by itself, and how candidates are judged).
    enabled: bool = Field(True, description="Train, gate and hot-swap automatically.")
    policy: Literal["immediate", "idle"] = Field(
        "immediate", description="Start a due run at once, or only once the server is idle."
    )
    idle_seconds: float = Field(30.0, ge=0.0, description="Idle time the 'idle' policy needs.")
    cooldown_seconds: float = Field(60.0, ge=0.0, description="Pause between two runs.")
    max_run_seconds: float = Field(3600.0, gt=0.0, description="A longer run is stopped.")
    check_interval_seconds: float = Field(30.0, gt=0.0, description="Scheduler check period.")
    min_improvement: float = Field(
        0.01,
        description="Held-out agreement gain a candidate needs over the current adapter "
        "(gate: agreement).",
    )
    gate: Literal["speed", "agreement"] = Field(
        "speed",
        description="What a candidate must beat the draft in service on: the expected tokens "
        "per second on the holdout (a paired bootstrap test) or held-out agreement alone.",
    )
    gate_confidence: float = Field(
        0.9,
        gt=0.5,
        lt=1.0,
        description="gate: speed installs when the expected speedup gain's lower bound at "
        "this confidence is above zero.",
    )
    min_holdout_rows: int = Field(
        20,
        ge=1,
        description="Holdout rows needed before a run, and under the speed gate the fewest "
        "rows it installs on (its bootstrap bound means little on fewer; `specd bench gate`).",
    )
    keep_adapters: int = Field(5, ge=1, description="Adapter versions kept in the store.")
    nice: int = Field(10, ge=0, le=19, description="Niceness of the training process.")
    lora: LoraSettings = Field(default_factory=LoraSettings)


class DataSettings(_Section):
    max_prompt_length: int = Field(512, ge=1)
    max_output_length: int = Field(256, ge=1)


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    file: Path | None = Field(None, description="JSON log file; null = <log_dir>/specd.log.")
    console: Literal["auto", "pretty", "json", "off"] = "auto"


class PathsSettings(_Section):
    data_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_data_dir(APP_NAME)),
        description="Buffer, adapters, imported models, runtime.json.",
    )
    log_dir: Path | None = Field(
        None, description="null = <data_dir>/logs if data_dir was set, else the platform log dir."
    )
