"""Tool calls: the chat template renders ``tools``, mlx-lm's tool parser reads the calls back.

mlx-lm infers the tool-call format from the model's chat template and attaches its parser to
the tokenizer (``tool_call_start``/``tool_call_end`` markers and ``tool_parser``). A model
whose template has no tool support (the embedded SmolLM2) answers a request with ``tools``
with a 400. The generated text is split at the markers: the text outside is the content, each
marked span is parsed into an OpenAI ``tool_call``; `ToolStream` does the same incrementally
for streams, holding back text that may be the start of a marker.

``tool_choice`` ``"required"`` or a named function forces a call by constrained decoding
(`daemon.core.constraints`): a grammar of the marker and a JSON object with the function's
name and its parameters' schema. It is built for the JSON tool-call format (Qwen, Hermes:
``<tool_call>{"name": ..., "arguments": ...}</tool_call>``), the format of most templates.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from daemon.core.constraints import JSON_OPTIONS
from daemon.logging import get_logger

__all__ = ["ParsedCall", "ToolStream", "forced_call_grammar", "split_tool_calls"]

log = get_logger("api")


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str

    def arguments_object(self) -> dict[str, Any]:
        """The arguments as an object, as Ollama and Anthropic send them ({} when the model
        wrote text that is not a JSON object: the parser passes a string through as is)."""
        try:
            value = json.loads(self.arguments)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


def _parse(tokenizer: Any, text: str, tools: list[dict[str, Any]] | None) -> ParsedCall | None:
    try:
        call = tokenizer.tool_parser(text, tools)
        name = call["name"]
        args = call.get("arguments", {})
    except Exception as e:  # noqa: BLE001 - any parser failure: the text stays content
        log.warning("tool_call_unparsed", error=f"{type(e).__name__}: {e}", text=text[:200])
        return None
    if not isinstance(name, str):
        return None
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ParsedCall(name=name, arguments=arguments, id="call_" + secrets.token_hex(12))


def split_tool_calls(
    tokenizer: Any, text: str, tools: list[dict[str, Any]] | None
) -> tuple[str, list[ParsedCall]]:
    """``(content, calls)`` of a finished answer."""
    stream = ToolStream(tokenizer, tools)
    content, calls = stream.feed(text)
    more, last = stream.finish()
    return content + more, calls + last


class ToolStream:
    """Splits streamed text into content deltas and completed tool calls."""

    def __init__(self, tokenizer: Any, tools: list[dict[str, Any]] | None) -> None:
        self.tokenizer = tokenizer
        self.tools = tools
        self.start: str = tokenizer.tool_call_start
        self.end: str | None = getattr(tokenizer, "tool_call_end", None)
        self._held = ""  # text not yet classified
        self._in_call = False

    def feed(self, delta: str) -> tuple[str, list[ParsedCall]]:
        self._held += delta
        content, calls = "", list[ParsedCall]()
        while True:
            if not self._in_call:
                i = self._held.find(self.start)
                if i < 0:
                    # keep back a suffix that could begin a marker
                    keep = next(
                        (n for n in range(min(len(self.start) - 1, len(self._held)), 0, -1)
                         if self.start.startswith(self._held[-n:])),
                        0,
                    )  # fmt: skip
                    cut = len(self._held) - keep
                    content += self._held[:cut]
                    self._held = self._held[cut:]
                    return content, calls
                content += self._held[:i]
                self._held = self._held[i + len(self.start) :]
                self._in_call = True
            if not self.end:
                return content, calls  # the call runs to the end of the answer
            j = self._held.find(self.end)
            if j < 0:
                return content, calls
            call = _parse(self.tokenizer, self._held[:j], self.tools)
            if call is None:
                content += self.start + self._held[: j + len(self.end)]
            else:
                calls.append(call)
            self._held = self._held[j + len(self.end) :]
            self._in_call = False

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """What is left when the answer ends (a call without its end marker included)."""
        held, self._held = self._held, ""
        if not self._in_call:
            return held, []
        self._in_call = False
        call = _parse(self.tokenizer, held, self.tools) if held.strip() else None
        return ("", [call]) if call is not None else (self.start + held, [])


def forced_call_grammar(
    tokenizer: Any, tools: list[dict[str, Any]], name: str | None
) -> str | None:
    """A grammar that makes the answer one call of ``name`` (or of any of ``tools``), or None
    when the model's tool-call format is not the JSON one."""
    import llguidance

    parser = getattr(tokenizer, "tool_parser", None)
    if parser is None or not getattr(parser, "__module__", "").endswith("json_tools"):
        return None
    variants = []
    for tool in tools:
        fn = tool["function"]
        if name is not None and fn["name"] != name:
            continue
        variants.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": fn["name"]},
                    "arguments": fn.get("parameters") or {"type": "object"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    one = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema = {**one, "x-guidance": JSON_OPTIONS}  # compact JSON, as response_format's
    end = getattr(tokenizer, "tool_call_end", None) or ""
    lark = (
        f"start: {json.dumps(tokenizer.tool_call_start + chr(10))} call "
        f"{json.dumps(chr(10) + end)}\ncall: %json {json.dumps(schema)}"
    )
    return str(llguidance.LLMatcher.grammar_from_lark(lark))
