"""Loading the settings from every source, with each value's origin for error messages, and
the snapshot a training child reads."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from daemon.config.merge import merge
from daemon.config.sections import ENV_NESTED, ENV_PREFIX
from daemon.config.settings import FILE_DATA, Settings, default_config_file, drop_in_dir
from daemon.errors import ConfigError


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
        merge(merged, _read_yaml(main), origin, str(main))
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
            merge(merged, _read_yaml(path), origin, str(path))

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

    token = FILE_DATA.set(merged)
    try:
        settings = Settings(**init)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origin)) from None
    finally:
        FILE_DATA.reset(token)
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
