"""The text side of one generation: detokenizing, EOS, stop strings and what may be sent.

Shared by the speculative engine and the batch decoder, so that a request moved from one to
the other mid-answer (`daemon.core.batch`) keeps its text state: the detokenizer, what was
already sent, and text held back because it may begin a stop string.
"""

from __future__ import annotations

from collections.abc import Iterable

from mlx_lm.tokenizer_utils import TokenizerWrapper


class TextStream:
    """Tokens in, text deltas out.

    ``add(token)`` returns ``"stop"`` when the token ends the answer (an EOS token, or a stop
    string now complete in the text); ``delta()`` returns the text that may be sent so far
    (a possible stop-string prefix at the end is held back); ``finish()`` flushes the
    detokenizer and returns the last delta. ``text`` is the answer's text (stop string
    excluded) once finished, and what was sent before that.
    """

    def __init__(
        self, tokenizer: TokenizerWrapper, stops: Iterable[str], eos_ids: Iterable[int]
    ) -> None:
        self._detok = tokenizer.detokenizer  # a fresh copy per call
        self._eos = set(eos_ids)
        self._stops = list(stops)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._sent = 0  # characters of the detokenizer's text already handed out
        self._stop_at: int | None = None  # where a stop string starts in the detokenizer text

    @property
    def text(self) -> str:
        return self._detok.text[: self._sent]

    def add(self, token: int) -> str | None:
        if token in self._eos:
            return "stop"
        self._detok.add_token(token)
        if self._stops:
            self._stop_at = self._find_stop(self._detok.text)
            if self._stop_at is not None:
                return "stop"
        return None

    def delta(self) -> str:
        text = self._detok.text
        end = self._visible_end(text) if self._stops else len(text)
        out = text[self._sent : end]
        self._sent = end
        return out

    def finish(self) -> str:
        if self._stop_at is None:
            self._detok.finalize()
            if self._stops:
                self._stop_at = self._find_stop(self._detok.text)
        text = self._detok.text
        end = self._stop_at if self._stop_at is not None else len(text)
        out = text[self._sent : end]
        self._sent = end
        return out

    @property
    def stopped_by_string(self) -> bool:
        return self._stop_at is not None

    def _find_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s, self._sent) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _visible_end(self, text: str) -> int:
        """End of the text that can be sent: hold back a possible stop-string prefix."""
        for n in range(min(self._max_stop - 1, len(text) - self._sent), 0, -1):
            tail = text[len(text) - n :]
            if any(s.startswith(tail) for s in self._stops):
                return len(text) - n
        return len(text)
