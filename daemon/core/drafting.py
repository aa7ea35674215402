"""Drafting without a model: proposals copied from tokens already seen.

A draft model costs a forward pass per drafted token (0.23 of a target step for the default
layer-skip draft here, 0.1 of it the output head). Text often repeats what is already there:
an edit request repeats most of its prompt, code repeats its identifiers, and a daemon's
traffic repeats itself across requests. Two sources exploit that at almost no cost:

- **lookup**: the current request's own context, prompt and output so far (prompt lookup
  decoding, llama.cpp's ``ngram`` drafting);
- **suffix**: the target's past outputs from the replay buffer's train split (SuffixDecoding's
  global tree), rebuilt at start and extended as records commit, within a token budget (the
  oldest outputs are evicted first). Holdout rows never enter it, so held-out measurements stay
  honest.

Both use `NgramIndex`: for every position it remembers, per n-gram length ``n`` in
``NGRAM_SIZES``, where that n-gram last ended and how often it occurred. A proposal continues
the longest n-gram that ends the current context: the tokens that followed its most recent
occurrence, as many as the match supports (``tokens_per_match`` per matched token, within
``max_tokens``), never across the end of a document. The target verifies proposals like model
drafts; at temperature > 0 a proposal is a point mass (q = 1 on the proposed token), which
keeps speculative sampling exact.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

# n-gram lengths that are indexed, longest first (a longer match predicts better).
NGRAM_SIZES = (16, 8, 5, 3, 2, 1)
_TAIL = max(NGRAM_SIZES)  # the most context a proposal can match
_BOUNDARY = -1  # between documents: no n-gram or continuation crosses it


@dataclass(frozen=True)
class Proposal:
    """Tokens to verify, where they came from and how much evidence backs them."""

    tokens: list[int]
    source: str  # "lookup" | "suffix"
    match: int  # length of the matched n-gram
    count: int  # how often that n-gram occurred


class NgramIndex:
    """Where each n-gram of a token stream last ended; documents never run into each other.

    Positions are absolute (they keep counting when old documents are dropped), so an entry
    that points below ``base`` belongs to an evicted document and is ignored.
    """

    def __init__(self, sizes: Sequence[int] = NGRAM_SIZES, min_match: int = 1) -> None:
        self.sizes = tuple(sorted(set(sizes), reverse=True))
        self.min_match = min_match
        self._tokens: list[int] = []  # absolute position = base + index
        self.base = 0
        # n-gram -> (where it last ended, where it ended before that, occurrences)
        self._last: dict[tuple[int, ...], tuple[int, int, int]] = {}

    @property
    def size(self) -> int:
        """Tokens held (boundaries included)."""
        return len(self._tokens)

    @property
    def entries(self) -> int:
        return len(self._last)

    def _get(self, pos: int) -> int:
        return self._tokens[pos - self.base]

    def tail(self, n: int) -> list[int]:
        """The last ``n`` tokens held (what a context that is itself indexed ends with)."""
        return self._tokens[-n:]

    def add_document(self, tokens: Iterable[int]) -> None:
        """Index ``tokens`` as a new document (a past output, or a request's context)."""
        if self._tokens and self._tokens[-1] != _BOUNDARY:
            self._tokens.append(_BOUNDARY)
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append ``tokens`` to the current document."""
        toks = self._tokens
        last = self._last
        for t in tokens:
            toks.append(int(t))
            end = len(toks)  # the n-grams ending here continue at index `end`
            for n in self.sizes:
                if n > end:
                    continue
                gram = tuple(toks[end - n : end])
                if _BOUNDARY in gram:
                    continue
                prev = last.get(gram)
                if prev is None:
                    last[gram] = (self.base + end, 0, 1)
                else:
                    last[gram] = (self.base + end, prev[0], prev[2] + 1)

    def drop_before(self, pos: int) -> None:
        """Forget the tokens before absolute position ``pos`` (stale entries are skipped on
        lookup and removed by `compact`)."""
        cut = min(max(pos - self.base, 0), len(self._tokens))
        del self._tokens[:cut]
        self.base += cut

    def compact(self) -> None:
        """Remove entries that point into dropped tokens."""
        self._last = {g: v for g, v in self._last.items() if v[0] > self.base}

    def propose(
        self,
        context: Sequence[int],
        max_tokens: int,
        tokens_per_match: int = 2,
        source: str = "lookup",
        exclude_end: int | None = None,
    ) -> Proposal | None:
        """Continue the longest indexed n-gram that ends ``context``; None without a match.

        ``exclude_end``: an absolute position whose continuation must not be proposed (the
        context's own end when the context itself is indexed: it has no continuation yet, so
        the occurrence before it is used).
        """
        if max_tokens < 1 or not context:
            return None
        for n in self.sizes:
            if n < self.min_match or n > len(context):
                continue
            found = self._last.get(tuple(context[-n:]))
            if found is None:
                continue
            end, before, count = found
            if end == exclude_end:
                end, count = before, count - 1
            if end <= self.base:
                continue
            stop = min(end + min(max_tokens, tokens_per_match * n), self.base + len(self._tokens))
            out: list[int] = []
            for pos in range(end, stop):
                t = self._get(pos)
                if t == _BOUNDARY:
                    break
                out.append(t)
            if out:
                return Proposal(out, source, n, count)
        return None


class Proposer(Protocol):
    """A source of copied draft tokens for one request, as the rounds see it: a new source
    is a class with these two methods and a line in the engine's list of sources."""

    source: str

    def propose(self, max_tokens: int, tokens_per_match: int = 2) -> Proposal | None:
        """Tokens to verify after the request's verified tokens so far; None without one."""
        ...

    def extend(self, tokens: Sequence[int]) -> None:
        """The tokens verified since (the request's own; accepted drafts and the target's)."""
        ...


class ContextIndex:
    """The lookup source for one request: its prompt and output, indexed as they grow."""

    source = "lookup"

    def __init__(self, prompt: Sequence[int]) -> None:
        self.index = NgramIndex()
        self.index.add_document(prompt)

    def extend(self, tokens: Sequence[int]) -> None:
        self.index.extend(tokens)

    def propose(self, max_tokens: int, tokens_per_match: int = 2) -> Proposal | None:
        index = self.index
        end = index.base + index.size  # the context's own end: nothing follows it yet
        context = index.tail(index.sizes[0])  # the longest n-gram it can end with
        return index.propose(context, max_tokens, tokens_per_match, exclude_end=end)


class SuffixIndex:
    """The suffix source: the target's past outputs, within a token budget, thread-safe.

    Extended from the buffer writer's thread as records commit and read from the generation
    thread; a lock keeps the two apart. Beyond ``budget`` tokens the oldest outputs go.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._index = NgramIndex(min_match=2)  # one shared token is no evidence across requests
        self._ends: deque[int] = deque()  # where each output ends (absolute), oldest first
        self._lock = threading.Lock()

    @property
    def outputs(self) -> int:
        with self._lock:
            return len(self._ends)

    @property
    def tokens(self) -> int:
        with self._lock:
            return self._index.size

    def add(self, output: Sequence[int]) -> None:
        """Index one past output (no-op when the budget is 0 or the output empty)."""
        if self.budget <= 0 or not output:
            return
        output = list(output)[-self.budget :]
        with self._lock:
            idx = self._index
            idx.add_document(output)
            self._ends.append(idx.base + idx.size)
            while idx.size > self.budget and self._ends:
                idx.drop_before(self._ends.popleft())
            if idx.entries > 8 * max(idx.size, 1) * len(idx.sizes):
                # far more entries than the live tokens can hold (at most one per token and
                # n-gram size): most point into dropped outputs, so reclaim them
                idx.compact()

    def propose(
        self, context: Sequence[int], max_tokens: int, tokens_per_match: int = 2
    ) -> Proposal | None:
        with self._lock:
            return self._index.propose(context, max_tokens, tokens_per_match, source="suffix")

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "outputs": len(self._ends),
                "tokens": self._index.size,
                "budget": self.budget,
                "entries": self._index.entries,
            }


class SuffixProposer:
    """The suffix source for one request: the shared `SuffixIndex` continued from the
    request's last verified tokens (the longest n-gram's worth of them)."""

    source = "suffix"

    def __init__(self, index: SuffixIndex, seq: Sequence[int]) -> None:
        self.index = index
        self._tail = list(seq[-_TAIL:])

    def propose(self, max_tokens: int, tokens_per_match: int = 2) -> Proposal | None:
        return self.index.propose(self._tail, max_tokens, tokens_per_match)

    def extend(self, tokens: Sequence[int]) -> None:
        self._tail = (self._tail + list(tokens))[-_TAIL:]
