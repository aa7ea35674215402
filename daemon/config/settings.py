"""`Settings`: the sections together, read from the environment and the merged config files,
and the places derived from them."""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from daemon.config.sections import (
    APP_NAME,
    ENV_NESTED,
    ENV_PREFIX,
    BufferSettings,
    DataSettings,
    LoggingSettings,
    ModelEntry,
    ModelsSettings,
    PathsSettings,
    SamplingSettings,
    ServerSettings,
    SpeculativeSettings,
    TrainingSettings,
    overridden,
)

# The merged config files, set by `load_settings` around one `Settings(...)`: pydantic-settings
# builds its sources from the class, so the files reach `_MergedFilesSource` this way.
FILE_DATA: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("FILE_DATA")


class _MergedFilesSource(PydanticBaseSettingsSource):
    """The deep-merged main config file and drop-ins, prepared by `load_settings`."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole mapping

    def __call__(self) -> dict[str, Any]:
        return FILE_DATA.get({})


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
                        overridden(getattr(self, key), getattr(entry, key))
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
            update["speculative"] = overridden(self.speculative, entry.speculative)
        if entry is not None and entry.training:
            update["training"] = overridden(self.training, entry.training)
        return self.model_copy(update=update)


def default_config_file() -> Path:
    """The main config file used when none is given: ``$SPECD_CONFIG`` or the platform dir."""
    env = os.environ.get("SPECD_CONFIG")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.yaml"


def drop_in_dir(config_file: Path) -> Path:
    return config_file.parent / "conf.d"
