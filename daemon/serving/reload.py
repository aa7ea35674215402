"""Live configuration reloads: a watchdog observer on the main config file and ``conf.d/``.

Editors save by writing a temporary file and renaming it over the original, so created,
modified, moved and deleted events all count; a burst of them triggers one debounced reload.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from daemon.config import (
    ConfigError,
    Settings,
    default_config_file,
    drop_in_dir,
    load_settings,
)
from daemon.logging import get_logger

log = get_logger("reload")

# Keys that only take effect at the next start; everything else applies live.
RESTART_KEYS = (
    "models.",
    "server.host",
    "server.port",
    "server.allow_insecure_bind",
    "server.cors_origins",
    "paths.",
    "logging.file",
    "logging.console",
)


def settings_diff(old: Settings, new: Settings) -> list[str]:
    """Dotted keys whose values differ."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old.model_dump()), flat(new.model_dump())
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


# ... except these, which apply live although their section does not (a trailing dot: all
# keys under it; the registry of other models: one added or removed, the others untouched)
LIVE_KEYS = (
    "models.keep_alive_seconds",
    "models.max_loaded",
    "models.memory_budget_gb",
    "models.targets.",
)


def needs_restart(key: str) -> bool:
    if any(key == k or (k.endswith(".") and key.startswith(k)) for k in LIVE_KEYS):
        return False
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESTART_KEYS)


def freeze(new: Settings, running: Settings, keys: list[str]) -> Settings:
    """``new`` with the fields behind ``keys`` (dotted, as `settings_diff` gives them) taken
    from ``running``: what a reload may install while those keys wait for a restart."""
    sections: dict[str, dict[str, Any]] = {}
    for key in keys:
        section, _, rest = key.partition(".")
        name = rest.split(".", 1)[0]  # a nested key freezes its whole top-level field
        sections.setdefault(section, {})[name] = getattr(getattr(running, section), name)
    if not sections:
        return new
    update = {
        section: getattr(new, section).model_copy(update=fields)
        for section, fields in sections.items()
    }
    return new.model_copy(update=update)


class ConfigReloader:
    """Rebuilds settings when the config files change (or on `trigger`) and hands valid ones
    to ``apply(new, changed_keys)``; an invalid result is logged and the old settings stay.

    ``current`` is the *effective* settings: the files' values, except that keys which need a
    restart keep the value the daemon started with (``pending_restart`` lists those the files
    have changed), so nothing that reads the settings later (the training run, shutdown's
    cleanup) follows a model or directory the daemon is not serving. Reloads are serialised:
    SIGHUP (main thread) and file events (a timer thread) may ask at once."""

    def __init__(
        self,
        config_file: Path,
        overrides: dict[str, Any],
        current: Settings,
        apply: Callable[[Settings, list[str]], None],
        debounce: float = 0.5,
    ) -> None:
        self.config_file = config_file
        self.overrides = overrides
        self.current = current
        self.apply = apply
        self.debounce = debounce
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._observer: Any = None
        self.reloads = 0
        self.rejected = 0  # reloads refused as invalid (the previous settings stayed)
        self.pending_restart: list[str] = []  # keys the files changed, applied at next start
        self._reload_lock = threading.Lock()

    def start(self) -> None:
        handler = _Handler(self)
        self._observer = Observer()
        self._observer.daemon = True
        watched = []
        try:
            # A new user has no config directory yet: create it and conf.d, so that a drop-in
            # written later is seen without a restart.
            drop_in_dir(self.config_file).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.warning(
                "config_dir_not_created",
                path=str(drop_in_dir(self.config_file)),
                error=str(e),
                note="drop-ins there are read at the next start only",
            )
        for directory in (self.config_file.parent, drop_in_dir(self.config_file)):
            if directory.is_dir():
                self._observer.schedule(handler, str(directory), recursive=False)
                watched.append(str(directory))
        self._observer.start()
        log.info("config_watch_started", watching=watched)

    def stop(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)

    def relevant(self, path: str) -> bool:
        p = Path(path)
        if p == self.config_file:
            return True
        return (
            p.parent == drop_in_dir(self.config_file)
            and p.suffix in (".yaml", ".yml")
            and not p.name.startswith(".")
        )

    def schedule(self) -> None:
        """Reload after ``debounce`` seconds without further events."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.debounce, self.reload)
            self._timer.daemon = True
            self._timer.start()

    def reload(self) -> bool:
        """Rebuild and apply the settings now; False if the new ones are invalid."""
        with self._reload_lock:
            return self._reload()

    def _reload(self) -> bool:
        # the default main file may not exist (a new user with drop-ins only), as at start;
        # a file named explicitly must
        missing_default = (
            not self.config_file.exists() and self.config_file == default_config_file()
        )
        try:
            new, sources = load_settings(
                None if missing_default else self.config_file, self.overrides
            )
        except ConfigError as e:
            self.rejected += 1
            log.error("config_reload_rejected", error=str(e), kept="previous settings")
            return False
        self.reloads += 1
        changed = settings_diff(self.current, new)
        restart = [k for k in changed if needs_restart(k)]
        live = [k for k in changed if not needs_restart(k)]
        effective = freeze(new, self.current, restart)
        self.pending_restart = restart
        if live:
            self.current = effective
            self.apply(effective, live)
        log.info(
            "config_reloaded",
            changed=changed,
            applied=live,
            pending_restart=restart,
            sources=sources.describe(),
        )
        if restart:
            log.warning("config_needs_restart", keys=restart)
        return True


class _Handler(FileSystemEventHandler):
    def __init__(self, reloader: ConfigReloader) -> None:
        self.reloader = reloader

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in ("opened", "closed_no_write"):
            return
        paths = [event.src_path, getattr(event, "dest_path", "") or ""]
        if any(p and self.reloader.relevant(str(p)) for p in paths):
            self.reloader.schedule()
