"""Structured logging: JSON lines to a file for ``tail -f``, readable console output on a TTY.

Every record carries ``timestamp``, ``level``, ``event`` and ``component`` plus its own fields.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any, Literal

import structlog
from structlog.typing import EventDict, Processor

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Processors shared by structlog loggers and foreign (stdlib) records.
_SHARED: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def _default_component(_: Any, __: str, event: EventDict) -> EventDict:
    event.setdefault("component", "specd")
    return event


def get_logger(component: str) -> structlog.stdlib.BoundLogger:
    """A logger whose records carry ``component``.

    Lazy: safe at module level, it picks up `configure_logging` whenever that runs.
    """
    return structlog.get_logger("specd", component=component)


def configure_logging(
    level: str = "info",
    log_file: Path | None = None,
    console: Literal["auto", "pretty", "json", "off"] = "auto",
) -> None:
    """(Re)configure logging; safe to call again, e.g. on a config reload."""
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_SHARED,
            _default_component,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_specd", False):
            root.removeHandler(h)
            h.close()
    root.setLevel(_LEVELS[level])

    pre = [*_SHARED, _default_component]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        # WatchedFileHandler reopens the file when logrotate/newsyslog moves it away.
        fh = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
        fh.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=pre,
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer(default=str),
                ],
            )
        )
        fh._specd = True  # type: ignore[attr-defined]
        root.addHandler(fh)

    if console == "auto":
        console = "pretty" if sys.stderr.isatty() else "json"
    if console != "off":
        renderer: Any = (
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
            if console == "pretty"
            else structlog.processors.JSONRenderer(default=str)
        )
        procs: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
        if console == "json":
            procs.append(structlog.processors.format_exc_info)
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=pre, processors=[*procs, renderer]
            )
        )
        sh._specd = True  # type: ignore[attr-defined]
        root.addHandler(sh)

    # Third-party chatter stays out of the user's log unless asked for.
    for name in ("uvicorn.access", "apscheduler", "watchdog", "httpx"):
        logging.getLogger(name).setLevel(max(_LEVELS[level], logging.WARNING))


def set_level(level: str) -> None:
    """Change the log level live."""
    logging.getLogger().setLevel(_LEVELS[level])
