"""Constrained decoding: output that follows a JSON schema, with llguidance.

llguidance (the grammar engine of llama.cpp, vLLM and SGLang) keeps a parser state per request
and computes, for each next position, the set of tokens the grammar allows (a bitmask over the
vocabulary, ~1 ms). The engine masks the target's *and* the draft's logits with it (``-inf``
elsewhere), so speculation stays lossless under the constraint: the target's constrained
distribution is what is verified, a draft token the grammar forbids is never proposed (a
proposal is cut before it), and greedy output is the target's own constrained greedy output.

The masks along a round's draft tokens are computed by advancing the parser through them and
rolling it back; after verification the parser consumes the tokens actually emitted.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from daemon.errors import GenerationError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

__all__ = ["Constraint", "json_schema_grammar"]

# Compact JSON with one space after ':' and ',': free whitespace would let a small model loop
# on blanks forever.
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}

_TOKENIZERS: dict[int, Any] = {}
_LOCK = threading.Lock()


def _ll_tokenizer(tokenizer: Any) -> Any:
    """llguidance's view of the HF tokenizer inside ``tokenizer`` (built once, ~0.3 s)."""
    import llguidance.hf

    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    with _LOCK:
        found = _TOKENIZERS.get(id(hf))
        if found is None or found[0] is not hf:
            eos = list(getattr(tokenizer, "eos_token_ids", None) or []) or None
            found = (hf, llguidance.hf.from_tokenizer(hf, eos_token=eos))
            _TOKENIZERS[id(hf)] = found
    return found[1]


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The llguidance grammar of a JSON schema; `GenerationError` when it cannot be used."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), overrides=JSON_OPTIONS
        )
    except (ValueError, TypeError) as e:
        raise GenerationError(f"not a usable JSON schema: {e}") from None
    error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if error:
        raise GenerationError(f"not a usable JSON schema: {'; '.join(messages)}")
    return grammar


class Constraint:
    """One request's grammar state; not shared between requests."""

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        import llguidance

        self.matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer), grammar)
        if self.matcher.is_error():
            raise GenerationError(f"grammar error: {self.matcher.get_error()}")

    @classmethod
    def json_schema(cls, tokenizer: Any, schema: dict[str, Any]) -> Constraint:
        return cls(tokenizer, json_schema_grammar(schema))

    @property
    def done(self) -> bool:
        """The grammar allows nothing more (its end, EOS included, was consumed)."""
        return bool(self.matcher.is_stopped())

    def mask(self, vocab: int) -> np.ndarray:
        """Which of the first ``vocab`` token ids may come next (bool array)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little").astype(bool)
        if allowed.size < vocab:  # a padded model vocabulary: the padding is never allowed
            allowed = np.concatenate([allowed, np.zeros(vocab - allowed.size, dtype=bool)])
        return allowed[:vocab]

    def allows(self, tokens: list[int]) -> int:
        """How many of ``tokens``, in order, the grammar accepts (the state is unchanged)."""
        return int(self.matcher.validate_tokens(list(tokens)))

    def push(self, tokens: list[int]) -> int:
        """Advance through ``tokens`` while the grammar accepts them (to compute the masks
        along a draft); returns how many it took, for `pop`."""
        n = 0
        for t in tokens:
            if self.matcher.is_stopped() or not self.allows([t]):
                break
            self.matcher.consume_token(int(t))
            n += 1
        return n

    def pop(self, n: int) -> None:
        """Undo the last `push` of ``n`` tokens."""
        if n:
            self.matcher.rollback(n)

    def consume(self, tokens: list[int]) -> None:
        """Advance through emitted tokens, which the masks made sure the grammar accepts."""
        for t in tokens:
            if self.matcher.is_stopped():
                return
            if not self.matcher.consume_token(int(t)):
                raise GenerationError(
                    f"token {t} broke the output grammar: {self.matcher.get_error()}"
                )
