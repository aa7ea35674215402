"""Where the daemon listens: the loopback check behind ``server.api_key``'s rule, the bound
socket uvicorn serves on, and ``runtime.json`` (how commands find a running daemon)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
from pathlib import Path
from typing import Any

from daemon.config import ConfigError, ServerSettings


def is_loopback_host(host: str) -> bool:
    """True if every address ``host`` resolves to is a loopback address."""
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    addrs = {str(info[4][0]).split("%", 1)[0] for info in infos}
    try:
        return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)
    except ValueError:
        return False


def check_bind_security(srv: ServerSettings) -> None:
    """Refuse to serve beyond loopback without an API key, unless told to."""
    if srv.api_key is None and not srv.allow_insecure_bind and not is_loopback_host(srv.host):
        raise ConfigError(
            f"refusing to serve on {srv.host!r} without an API key: it is not a loopback "
            "address, so anyone who can reach it could use the daemon. Set server.api_key "
            "(clients send 'Authorization: Bearer <key>'), bind 127.0.0.1, or set "
            "server.allow_insecure_bind: true"
        )


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket for ``host:port``; port 0 picks a free one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise ConfigError(f"server.host: cannot resolve {host!r}: {e}") from e
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ConfigError(
            f"cannot bind {host}:{port} (server.host/server.port): {e.strerror or e}"
        ) from e
    return sock


def write_runtime_file(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` atomically, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_runtime_file(path: Path, pid: int) -> None:
    """Remove ``path`` if it is still ours (another daemon may have replaced it)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and data.get("pid") == pid:
        with contextlib.suppress(OSError):
            path.unlink()
