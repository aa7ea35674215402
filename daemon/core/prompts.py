"""Prompt files: JSON Lines, one object per line with ``"prompt"`` or ``"messages"``.

A ``"prompt"`` string is sent as a single user message through the chat template; other keys
(``domain``, ``source``...) are kept as metadata and otherwise ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.errors import PromptFileError

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper


@dataclass
class PromptItem:
    """One prompt as chat messages, plus whatever else its line carried."""

    messages: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """What holdout hashing and reports key on (`prompt_text`)."""
        return prompt_text(self.messages)


def prompt_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The one rule for the text a conversation is keyed on (its train/holdout split, reports).

    Its *first* user message, whoever sent the request (HTTP, ``specd collect``, benchmarks),
    so a conversation lands in the same split by every entry point, and every turn of it in
    the split of its first: a later turn's prompt holds the earlier answers, which a train
    row must not carry out of the holdout, and a follow-up many conversations share ("Now
    write tests for it.") must not send all of them one way. A conversation without a user
    message is keyed on all its messages' contents joined by newlines.
    """
    users = [str(m.get("content") or "") for m in messages if m.get("role") == "user"]
    if users:
        return users[0]
    return "\n".join(str(m.get("content") or "") for m in messages)


def _messages(obj: dict[str, Any], where: str) -> list[dict[str, str]]:
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise PromptFileError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("content"), str)
                or m.get("role") not in ("system", "user", "assistant")
            ):
                raise PromptFileError(
                    f"{where}: messages[{i}] must be an object with role "
                    "(system|user|assistant) and string content"
                )
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptFileError(f"{where}: needs a non-empty string 'prompt' or a 'messages' list")
    return [{"role": "user", "content": prompt}]


def _json_objects(path: Path, what: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each non-blank line of a JSON Lines file as an object, with where it stands
    (``file:line``); `PromptFileError` naming the file, or the line that is not an object."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"{path}: cannot read {what}: {e}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{where}: invalid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise PromptFileError(f"{where}: each line must be a JSON object")
        yield where, obj


def read_prompts(path: str | Path, limit: int | None = None) -> list[PromptItem]:
    """Read a JSONL prompt file; blank lines are skipped, a bad line raises with its number."""
    path = Path(path)
    items: list[PromptItem] = []
    for where, obj in _json_objects(path, "prompt file"):
        msgs = _messages(obj, where)
        meta = {k: v for k, v in obj.items() if k not in ("prompt", "messages")}
        items.append(PromptItem(messages=msgs, meta=meta))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise PromptFileError(f"{path}: no prompts in file")
    return items


def read_conversations(path: str | Path, limit: int | None = None) -> list[list[str]]:
    """A multi-turn prompt file: ``{"turns": [user message, ...]}`` per line, each turn sent
    with the conversation so far (the target's own answers between); blank lines skipped.
    `PromptFileError` (a ValueError) naming the file and the bad line."""
    path = Path(path)
    out: list[list[str]] = []
    for where, obj in _json_objects(path, "conversations file"):
        turns = obj.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise PromptFileError(f"{where}: 'turns' must be a non-empty list of strings")
        out.append(turns)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise PromptFileError(f"{path}: no conversations")
    return out


def encode_prompt(
    tokenizer: TokenizerWrapper,
    prompt: str | list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Token ids of a prompt with the chat template applied (a string is one user message),
    ``tools`` rendered by it when given, ``template_kwargs`` passed to it (e.g.
    ``enable_thinking``, which mlx-lm maps onto the template's own name for it).

    Without a chat template the plain text (or the messages' contents joined) is encoded.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "has_chat_template", False):
        extra = {**(template_kwargs or {}), **({"tools": tools} if tools else {})}
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, **extra
        )
        if isinstance(ids, dict):  # some transformers versions return a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    text = "\n".join(str(m.get("content", "")) for m in messages)
    return [int(t) for t in tokenizer.encode(text)]


# --------------------------------------------------------------------------------------------
# Fill-in-the-middle: the code before and after a cursor, in the model's own FIM tokens

# (prefix, suffix, middle) markers of the code models' formats, all prefix-suffix-middle
FIM_STYLES = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, StarCoder2, SantaCoder
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
    ("<PRE>", "<SUF>", "<MID>"),  # CodeLlama
)


def fim_tokens(tokenizer: Any) -> tuple[int, int, int] | None:
    """The ids of the model's fill-in-the-middle markers (None: it has none)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for style in FIM_STYLES:
        ids = [vocab.get(marker) for marker in style]
        if all(i is not None for i in ids):
            return ids[0], ids[1], ids[2]  # type: ignore[return-value]
    return None


def encode_fim(tokenizer: Any, prefix: str, suffix: str) -> list[int]:
    """``<prefix marker> prefix <suffix marker> suffix <middle marker>``: the model writes
    what goes between (the code at the cursor). Raises ValueError without FIM markers."""
    markers = fim_tokens(tokenizer)
    if markers is None:
        raise ValueError("the model has no fill-in-the-middle tokens")
    pre, suf, mid = markers

    def enc(text: str) -> list[int]:
        return [int(t) for t in tokenizer.encode(text, add_special_tokens=False)] if text else []

    bos = getattr(tokenizer, "bos_token_id", None)
    starts = [bos] if bos is not None and tokenizer.encode("x")[:1] == [bos] else []
    return [*starts, pre, *enc(prefix), suf, *enc(suffix), mid]
