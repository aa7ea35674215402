"""The errors a user can act on, in one place (base layer: imports nothing of specd).

Every room raises these; the CLI catches `SpecdError` and prints its message (which names the
file, key, model or request at fault) instead of a traceback. Defining them here, not next to
each raiser, lets a caller catch a lower room's error without importing that room's code.
"""

from __future__ import annotations

from pathlib import Path


class SpecdError(Exception):
    """An error whose message is for the user: what is wrong, and where."""


class ConfigError(SpecdError):
    """A configuration file or value is invalid; the message names the source, key and reason."""


class ModelLoadError(SpecdError):
    """A model cannot be loaded or the pair is incompatible; the message names the models."""


class GGUFImportError(SpecdError):
    """A GGUF file could not be imported; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot import GGUF file {self.path}: {reason}")


class GenerationError(SpecdError, ValueError):
    """A request the engine refuses (bad prompt or sampling parameters).

    Raised by :meth:`SpeculativeEngine.generate` before any cache is created or touched.
    """


class PromptFileError(SpecdError, ValueError):
    """A prompt file cannot be read; the message names the file and line."""


class BufferError(SpecdError):  # deliberately shadows the builtin within importing modules
    """The buffer database cannot be used (unreadable, corrupt, foreign or too new)."""


class AdapterError(SpecdError):
    """An adapter is missing, corrupt or does not fit the draft; the old one stays in service."""


class AdapterNotFoundError(AdapterError):
    """No stored adapter has the version asked for."""


class TrainingError(SpecdError):
    """A training run cannot be done or did not produce a usable adapter."""


class DaemonError(SpecdError):
    """The daemon answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServiceError(SpecdError):
    """The service files cannot be rendered or the service manager refused."""


class DistributedError(SpecdError):
    """The group of ranks (MLX distributed) cannot serve: a model that does not split, ranks
    that loaded different models, or a rank that died or stopped answering."""
