"""Typed settings for specd.

Sources, highest priority first: explicit CLI options, environment (``SPECD_`` prefix, ``__``
nesting), drop-ins ``conf.d/*.yaml`` next to the main config (lexical order, later wins, deep
merge), the main ``config.yaml``, defaults. Every value remembers where it came from so that a bad
one is reported with the file (or variable) and the key.
"""

from __future__ import annotations

import contextvars
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import platformdirs
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from daemon.errors import ConfigError

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
        _overridden(SpeculativeSettings(), values)  # a bad key or value is named now
        return values

    @field_validator("training")
    @classmethod
    def _check_training(cls, values: dict[str, Any]) -> dict[str, Any]:
        _overridden(TrainingSettings(), values)
        return values


SectionT = TypeVar("SectionT", bound=BaseModel)


def _overridden(section: SectionT, values: dict[str, Any]) -> SectionT:
    """``section`` with ``values`` deep-merged over it, validated as the section is; a
    ValueError naming the first bad key otherwise."""
    merged = section.model_dump()
    _merge(merged, values, {}, "")
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


@dataclass
class ConfigSources:
    """Where the settings came from, for start-up logs and error messages."""

    main_file: Path | None = None
    drop_ins: list[Path] = field(default_factory=list)
    env_keys: list[str] = field(default_factory=list)
    cli_keys: list[str] = field(default_factory=list)
    # dotted key -> human description of its source
    origin: dict[str, str] = field(default_factory=dict)

    def describe(self) -> list[str]:
        out = [str(self.main_file)] if self.main_file else []
        out += [str(p) for p in self.drop_ins]
        out += [f"env:{k}" for k in self.env_keys]
        out += [f"cli:{k}" for k in self.cli_keys]
        return out


_FILE_DATA: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("_FILE_DATA")


class _MergedFilesSource(PydanticBaseSettingsSource):
    """The deep-merged main config file and drop-ins, prepared by `load_settings`."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole mapping

    def __call__(self) -> dict[str, Any]:
        return _FILE_DATA.get({})


class Settings(BaseSettings):
    """All of specd's settings, one section per component."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED,
        extra="forbid",
        validate_assignment=True,
    )

    models: ModelsSettings = Field(default_factory=ModelsSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    speculative: SpeculativeSettings = Field(default_factory=SpeculativeSettings)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    buffer: BufferSettings = Field(default_factory=BufferSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    paths: PathsSettings = Field(default_factory=PathsSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _MergedFilesSource(settings_cls))

    @model_validator(mode="after")
    def _check_entries(self) -> Settings:
        # an entry's keys are checked alone when read; over these sections they must hold too
        for name, entry in self.models.targets.items():
            for key in ("speculative", "training"):
                if getattr(entry, key):
                    try:
                        _overridden(getattr(self, key), getattr(entry, key))
                    except ValueError as e:
                        raise ValueError(f"models.targets.{name}.{key}: {e}") from None
        return self

    # Derived locations: everything the daemon writes lives under data_dir unless set otherwise.
    @property
    def log_dir(self) -> Path:
        if self.paths.log_dir is not None:
            return self.paths.log_dir
        default_data = Path(platformdirs.user_data_dir(APP_NAME))
        if self.paths.data_dir != default_data:
            return self.paths.data_dir / "logs"
        return Path(platformdirs.user_log_dir(APP_NAME))

    @property
    def log_file(self) -> Path:
        return self.logging.file or self.log_dir / "specd.log"

    @property
    def models_dir(self) -> Path:
        return self.paths.data_dir / "models"

    @property
    def runtime_file(self) -> Path:
        return self.paths.data_dir / "runtime.json"

    def with_models(self, extra: dict[str, ModelEntry]) -> Settings:
        """These settings serving ``extra`` too (models found by directory), after the
        configured ones; a configured name wins."""
        if not extra:
            return self
        targets = {**extra, **self.models.targets}
        return self.model_copy(
            update={"models": self.models.model_copy(update={"targets": targets})}
        )

    def for_model(self, name: str) -> Settings:
        """These settings as they apply to the served model ``name``: ``models.*`` and, for a
        models.targets entry, its ``speculative`` and ``training`` keys."""
        update: dict[str, Any] = {"models": self.models.entry(name)}
        entry = self.models.targets.get(name)
        if entry is not None and entry.speculative:
            update["speculative"] = _overridden(self.speculative, entry.speculative)
        if entry is not None and entry.training:
            update["training"] = _overridden(self.training, entry.training)
        return self.model_copy(update=update)


def default_config_file() -> Path:
    """The main config file used when none is given: ``$SPECD_CONFIG`` or the platform dir."""
    env = os.environ.get("SPECD_CONFIG")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.yaml"


def drop_in_dir(config_file: Path) -> Path:
    return config_file.parent / "conf.d"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: top level must be a mapping of sections, got {type(data).__name__}"
        )
    return data


def _merge(base: dict[str, Any], new: dict[str, Any], origin: dict[str, str], src: str, prefix=""):
    """Deep-merge ``new`` into ``base`` in place, recording each leaf's source."""
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, origin, src, dotted + ".")
        else:
            base[key] = value
            _record(origin, dotted, value, src)


def _record(origin: dict[str, str], dotted: str, value: Any, src: str) -> None:
    for k in [k for k in origin if k == dotted or k.startswith(dotted + ".")]:
        del origin[k]
    if isinstance(value, dict):
        for k, v in value.items():
            _record(origin, f"{dotted}.{k}", v, src)
    else:
        origin[dotted] = src


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        target = target.setdefault(p, {})
    target[parts[-1]] = value


def _origin_of(loc: tuple[Any, ...], origin: dict[str, str]) -> str:
    parts = [str(p) for p in loc if not isinstance(p, int)]
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in origin:
            return origin[key]
        children = [v for k, v in origin.items() if k.startswith(key + ".")]
        if children:
            return children[-1] if len(set(children)) == 1 else ", ".join(sorted(set(children)))
    return "defaults"


def format_validation_error(err: ValidationError, origin: dict[str, str]) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in e and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{_origin_of(e['loc'], origin)}: {key}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(
    config_file: Path | str | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[Settings, ConfigSources]:
    """Build `Settings` from all sources.

    ``overrides`` are dotted keys from explicit CLI options (``{"paths.data_dir": "/x"}``).
    A missing default config file is fine; a missing explicit one is an error.
    """
    explicit = config_file is not None
    main = Path(config_file).expanduser() if config_file is not None else default_config_file()
    sources = ConfigSources()
    origin = sources.origin
    merged: dict[str, Any] = {}
    if main.exists():
        sources.main_file = main
        _merge(merged, _read_yaml(main), origin, str(main))
    elif explicit:
        raise ConfigError(f"{main}: config file does not exist")
    conf_d = drop_in_dir(main)
    if conf_d.is_dir():
        for path in sorted(conf_d.glob("*.yaml")) + sorted(conf_d.glob("*.yml")):
            if path.name.startswith("."):
                continue  # editors' temporary files
            sources.drop_ins.append(path)
        sources.drop_ins.sort(key=lambda p: p.name)
        for path in sources.drop_ins:
            _merge(merged, _read_yaml(path), origin, str(path))

    for name in sorted(os.environ):
        if name.upper().startswith(ENV_PREFIX) and ENV_NESTED in name:
            dotted = name[len(ENV_PREFIX) :].lower().replace(ENV_NESTED, ".")
            sources.env_keys.append(name)
            origin[dotted] = f"environment variable {name}"

    init: dict[str, Any] = {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        _set_dotted(init, dotted, value)
        sources.cli_keys.append(dotted)
        origin[dotted] = f"command-line option for {dotted}"

    token = _FILE_DATA.set(merged)
    try:
        settings = Settings(**init)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origin)) from None
    finally:
        _FILE_DATA.reset(token)
    return settings, sources


# --- a snapshot of the effective settings (for a training child) ---------------------------

# the API key is no business of a training run, and must not land in a file
_SNAPSHOT_EXCLUDE = {"server": {"api_key"}}


def settings_snapshot(settings: Settings) -> str:
    """``settings`` as JSON, for `read_settings_snapshot`: a child process gets exactly the
    settings its parent runs with, not what the config files (or the environment) say now."""
    return settings.model_dump_json(exclude=_SNAPSHOT_EXCLUDE, indent=2) + "\n"


def read_settings_snapshot(path: Path | str) -> Settings:
    """The settings `settings_snapshot` wrote; neither files nor environment are read."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        # model_validate, not Settings(...): the constructor would merge the environment
        return Settings.model_validate(data)
    except (OSError, ValueError) as e:  # ValidationError is a ValueError
        raise ConfigError(f"{path}: not a settings snapshot: {e}") from None
