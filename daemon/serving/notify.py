"""systemd's sd_notify protocol: READY=1, STOPPING=1, STATUS=... to ``$NOTIFY_SOCKET``.

Outside systemd (no ``NOTIFY_SOCKET``) every call does nothing and returns False.
"""

from __future__ import annotations

import os
import socket
import time


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. ``"READY=1"``) to the service manager; True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError:
        return False
    return True


def ready(status: str = "serving") -> bool:
    return notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def stopping() -> bool:
    return notify("STOPPING=1")


def reloading() -> bool:
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")
