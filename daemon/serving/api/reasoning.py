"""Reasoning models: the text inside a thinking block is ``reasoning_content``, the rest is the
answer.

mlx-lm's tokenizer knows a model's thinking markers (``<think>`` / ``</think>`` and others:
``has_thinking``, ``think_start``, ``think_end``). An answer starts inside a thinking block when
its prompt ends in an open one (templates such as DeepSeek-R1's, or Qwen3's with thinking on,
put the opening marker in the generation prompt). `ReasoningStream` splits streamed text
incrementally, holding back a suffix that may begin a marker, as `tools.ToolStream` does for
tool calls; the content it returns goes on to the tool-call parser. The replay buffer records
the whole output, thinking included: the draft learns to draft it too.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ReasoningStream", "reasoning_stream"]


def _held_back(text: str, marker: str) -> int:
    """The length of the longest suffix of ``text`` that begins ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ReasoningStream:
    """Splits streamed text into (reasoning, content) deltas."""

    def __init__(self, start: str, end: str, thinking: bool) -> None:
        self.start, self.end = start, end
        self.thinking = thinking  # inside a thinking block now
        self._held = ""

    def feed(self, delta: str) -> tuple[str, str]:
        self._held += delta
        reasoning, content = "", ""
        while True:
            marker = self.end if self.thinking else self.start
            i = self._held.find(marker)
            if i < 0:
                cut = len(self._held) - _held_back(self._held, marker)
                if self.thinking:
                    reasoning += self._held[:cut]
                else:
                    content += self._held[:cut]
                self._held = self._held[cut:]
                return reasoning, content
            if self.thinking:
                reasoning += self._held[:i]
            else:
                content += self._held[:i]
            self._held = self._held[i + len(marker) :]
            self.thinking = not self.thinking

    def finish(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        return (held, "") if self.thinking else ("", held)

    def split(self, text: str) -> tuple[str, str]:
        """A whole answer's (reasoning, content)."""
        reasoning, content = self.feed(text)
        more_r, more_c = self.finish()
        return reasoning + more_r, content + more_c


def reasoning_stream(tokenizer: Any, prompt_tokens: list[int]) -> ReasoningStream | None:
    """A splitter for a model with thinking markers (None without): it starts inside a
    thinking block when the prompt's last marker opens one. Leading whitespace of the answer
    after the block is the template's, and is kept."""
    if not getattr(tokenizer, "has_thinking", False):
        return None
    opened = tokenizer.rfind_think_start(prompt_tokens)
    closed = tokenizer.rfind_think_end(prompt_tokens)
    return ReasoningStream(tokenizer.think_start, tokenizer.think_end, opened > closed)
