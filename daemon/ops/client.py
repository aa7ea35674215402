"""Finding and calling the running daemon from CLI commands (via ``runtime.json``)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import Settings
from daemon.errors import DaemonError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_runtime(path: Path) -> dict[str, Any] | None:
    """The daemon's runtime.json if it describes a live process, else None."""
    try:
        info = json.loads(path.read_text())
        pid = int(info["pid"])
        _ = info["host"], int(info["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if _pid_alive(pid) else None


@dataclass
class DaemonClient:
    """A minimal JSON client for the daemon's HTTP API (stdlib only)."""

    base_url: str
    api_key: str | None = None
    timeout: float = 600.0

    @classmethod
    def find(cls, settings: Settings) -> DaemonClient | None:
        """The running daemon for this data dir, if one answers /health."""
        info = read_runtime(settings.runtime_file)
        if info is None:
            return None
        host = info["host"]
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        key = settings.server.api_key.get_secret_value() if settings.server.api_key else None
        client = cls(f"http://{host}:{int(info['port'])}", key, timeout=600.0)
        try:
            client.request("GET", "/health", timeout=5)
        except DaemonError:
            return None
        return client

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except Exception:
                message = e.reason
            raise DaemonError(f"{method} {path}: HTTP {e.code}: {message}", e.code) from None
        except (urllib.error.URLError, OSError) as e:
            raise DaemonError(f"cannot reach the daemon at {self.base_url}: {e}") from None
