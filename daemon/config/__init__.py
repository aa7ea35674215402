"""Typed settings for specd.

Sources, highest priority first: explicit CLI options, environment (``SPECD_`` prefix, ``__``
nesting), drop-ins ``conf.d/*.yaml`` next to the main config (lexical order, later wins, deep
merge), the main ``config.yaml``, defaults. Every value remembers where it came from so that a bad
one is reported with the file (or variable) and the key.

sections: one model per section; settings: `Settings` and the places derived from it; load:
`load_settings` from every source, and the snapshot a training child reads.
"""

from daemon.config.load import (
    ConfigSources,
    format_validation_error,
    load_settings,
    read_settings_snapshot,
    settings_snapshot,
)
from daemon.config.sections import (
    APP_NAME,
    AUTO_DRAFT,
    EMBEDDED_TARGET,
    ENV_NESTED,
    ENV_PREFIX,
    TRAINING_LOSSES,
    BufferSettings,
    DataSettings,
    LoggingSettings,
    LoraSettings,
    ModelEntry,
    ModelsSettings,
    PathsSettings,
    SamplingSettings,
    ServerSettings,
    SpeculativeSettings,
    TrainingLoss,
    TrainingSettings,
)
from daemon.config.settings import Settings, default_config_file, drop_in_dir
from daemon.errors import ConfigError

__all__ = [
    "APP_NAME",
    "AUTO_DRAFT",
    "EMBEDDED_TARGET",
    "ENV_NESTED",
    "ENV_PREFIX",
    "TRAINING_LOSSES",
    "BufferSettings",
    "ConfigError",
    "ConfigSources",
    "DataSettings",
    "LoggingSettings",
    "LoraSettings",
    "ModelEntry",
    "ModelsSettings",
    "PathsSettings",
    "SamplingSettings",
    "ServerSettings",
    "Settings",
    "SpeculativeSettings",
    "TrainingLoss",
    "TrainingSettings",
    "default_config_file",
    "drop_in_dir",
    "format_validation_error",
    "load_settings",
    "read_settings_snapshot",
    "settings_snapshot",
]
