"""Deep-merging config mappings while recording where each leaf came from (the config files
and drop-ins, and a models.targets entry's keys over a section)."""

from __future__ import annotations

from typing import Any


def merge(
    base: dict[str, Any], new: dict[str, Any], origin: dict[str, str], src: str, prefix: str = ""
) -> None:
    """Deep-merge ``new`` into ``base`` in place, recording each leaf's source."""
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value, origin, src, dotted + ".")
        else:
            base[key] = value
            record(origin, dotted, value, src)


def record(origin: dict[str, str], dotted: str, value: Any, src: str) -> None:
    for k in [k for k in origin if k == dotted or k.startswith(dotted + ".")]:
        del origin[k]
    if isinstance(value, dict):
        for k, v in value.items():
            record(origin, f"{dotted}.{k}", v, src)
    else:
        origin[dotted] = src
