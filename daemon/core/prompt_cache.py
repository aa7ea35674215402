"""KV caches kept across requests: a new prompt starts from the longest cached prefix.

Chat clients resend the whole conversation every turn, so most of each prompt was already
processed by the previous request. The target's and the draft's caches of finished requests go
into mlx-lm's `LRUPromptCache` (a token trie with LRU eviction; a cache that runs past the new
prompt is trimmed back to the common prefix), one for each model so that the draft's can be
dropped whole when the draft changes: a draft entry never outlives the adapter that made it.
Both together stay within ``max_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_lm.models.cache import LRUPromptCache

__all__ = ["CACHE_KEY", "CacheStats", "PromptCache"]

# The trie is keyed by "model"; each LRU here holds one model's entries.
CACHE_KEY = "kv"


@dataclass
class CacheStats:
    """Counts since start: lookups that found a prefix, lookups that did not, tokens reused."""

    hits: int = 0
    misses: int = 0
    cached_tokens: int = 0


class PromptCache:
    """The target's and the draft's KV caches of past requests, by token prefix."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._lrus = {
            "target": LRUPromptCache(max_entries, max_bytes),
            "draft": LRUPromptCache(max_entries, max_bytes),
        }
        self._draft_owner: int | None = None
        self.stats = CacheStats()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    @property
    def nbytes(self) -> int:
        return sum(lru.nbytes for lru in self._lrus.values())

    def __len__(self) -> int:
        return sum(len(lru) for lru in self._lrus.values())

    def status(self) -> dict[str, int]:
        """What ``/status`` shows: bounds, what is held, and the counts since start."""
        return {
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
            "entries": len(self._lrus["target"]),
            "bytes": self.nbytes,
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "cached_tokens": self.stats.cached_tokens,
        }

    def resize(self, max_entries: int, max_bytes: int) -> None:
        """New bounds (a live config change), evicting what no longer fits."""
        self.max_entries, self.max_bytes = max_entries, max_bytes
        for lru in self._lrus.values():
            lru.max_size, lru.max_bytes = max_entries, max_bytes
            lru.trim_to(n_sequences=max_entries, n_bytes=max_bytes)
        self._lrus["draft"].trim_to(n_bytes=max(0, max_bytes - self._lrus["target"].nbytes))

    def clear(self) -> None:
        """Drop every entry (the models' memory is being freed)."""
        self._lrus = {w: LRUPromptCache(self.max_entries, self.max_bytes) for w in self._lrus}

    def use_draft(self, serial: int) -> None:
        """Drop the draft's entries when the draft (``SpeculativeEngine.draft_serial``) is not
        the one that made them."""
        if serial != self._draft_owner:
            self._draft_owner = serial
            self._lrus["draft"] = LRUPromptCache(self.max_entries, self.max_bytes)

    def fetch(self, which: str, tokens: list[int]) -> tuple[list[Any] | None, int]:
        """A copy of the cache of the longest cached prefix of ``tokens`` for ``which``
        ("target" or "draft") and how many tokens it covers; ``(None, 0)`` when none."""
        if not self.enabled or not tokens:
            return None, 0
        cache, rest = self._lrus[which].fetch_nearest_cache(CACHE_KEY, list(tokens))
        covered = len(tokens) - len(rest) if cache is not None else 0
        if which == "target":
            if covered:
                self.stats.hits += 1
                self.stats.cached_tokens += covered
            else:
                self.stats.misses += 1
        return (cache, covered) if covered else (None, 0)

    def keep(self, which: str, seq: list[int], cache: list[Any]) -> None:
        """Keep ``cache``, which holds a prefix of ``seq`` (its ``offset`` says how long)."""
        held = getattr(cache[0], "offset", 0) if cache else 0
        if isinstance(held, int) and 0 < held <= len(seq):
            self.store(which, seq[:held], cache)

    def store(self, which: str, tokens: list[int], cache: list[Any]) -> None:
        """Keep ``cache`` (which holds exactly ``tokens``) for later prompts."""
        if not self.enabled or not tokens:
            return
        self._lrus[which].insert_cache(CACHE_KEY, list(tokens), cache)
        other = self._lrus["draft" if which == "target" else "target"]
        # one byte budget for both: the model just stored gives way
        self._lrus[which].trim_to(n_bytes=max(0, self.max_bytes - other.nbytes))
