"""The tokenizer of a GGUF file as Hugging Face files: ``tokenizer.json`` (byte-level BPE, or
sentencepiece BPE as Llama 2's spells it, with the pre-tokenizer llama.cpp uses for the file's
``tokenizer.ggml.pre``), ``tokenizer_config.json`` and ``generation_config.json``
(`daemon.core.gguf` writes them beside the weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.errors import GGUFImportError
from daemon.logging import get_logger

log = get_logger("gguf")

# Token types in tokenizer.ggml.token_type.
_TOKEN_UNKNOWN = 2
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Pre-tokenizer regexes, by tokenizer.ggml.pre, as llama.cpp's llama-vocab.cpp splits text.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# "gpt2": ByteLevel's own GPT-2 regex; "digits": the same after splitting digits one by one.
_GPT2_PRE = {
    "default",
    "gpt-2",
    "gpt2",
    "phi-2",
    "roberta-bpe",
    "olmo",
    "jina-es",
    "jina-de",
    "jina-v1-en",
    "jina-v2-es",
    "jina-v2-de",
    "jina-v2-code",
    "gigachat",
}
_DIGITS_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_REGEX_PRE = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "megrez": _QWEN2_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    "gpt-4o": _GPT4O_SPLIT,
    "llama4": _GPT4O_SPLIT,
}
# llama.cpp uses whole-word lookups before merging (ignore_merges) and adds BOS for these.
_LLAMA3_PRE = {"llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx"}


def _token_name(tokens: list[str], token_id: Any) -> str | None:
    if isinstance(token_id, int) and 0 <= token_id < len(tokens):
        return tokens[token_id]
    return None


def _build_tokenizer(src: Path, meta: dict[str, Any]):
    """A ``tokenizers.Tokenizer`` equivalent to llama.cpp's, and the add_bos/add_eos flags."""
    from tokenizers import AddedToken, processors

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    if meta["tokenizer.ggml.model"] == "gpt2":
        tokenizer, add_bos = _byte_level_bpe(src, meta, tokens)
    else:
        tokenizer, add_bos = _sentencepiece_bpe(src, meta, tokens)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))

    # Control tokens (<|im_start|> ...) must never be split; user-defined ones match whole too.
    special = [
        t for t, k in zip(tokens, types, strict=False) if k in (_TOKEN_UNKNOWN, _TOKEN_CONTROL)
    ]
    user = [t for t, k in zip(tokens, types, strict=False) if k == _TOKEN_USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    # llama.cpp adds BOS/EOS itself; a tokenizer.json does it with a template post-processor.
    ends = {}
    for key, wanted in (("bos", add_bos), ("eos", add_eos)):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if wanted and token_id is not None and _token_name(tokens, token_id) is not None:
            ends[key] = (tokens[token_id], token_id)
    steps: list[Any] = []  # tokenizers' post-processors
    if meta["tokenizer.ggml.model"] == "gpt2":
        steps.append(processors.ByteLevel(trim_offsets=False))
    if ends:
        first = [ends["bos"][0]] if "bos" in ends else []
        last = [ends["eos"][0]] if "eos" in ends else []
        single = [*first, "$A", *last]
        pair = single + [f"{t}:1" for t in (*first, "$B", *last)]
        steps.append(
            processors.TemplateProcessing(
                single=" ".join(single), pair=" ".join(pair), special_tokens=list(ends.values())
            )
        )
    if steps:
        tokenizer.post_processor = processors.Sequence(steps)
    return tokenizer, add_bos, add_eos


def _byte_level_bpe(src: Path, meta: dict[str, Any], tokens: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = []
    for merge in meta.get("tokenizer.ggml.merges") or []:
        pair = tuple(merge.split(" "))
        if len(pair) != 2:
            raise GGUFImportError(src, f"malformed BPE merge {merge!r}")
        merges.append(pair)
    if not merges:
        raise GGUFImportError(src, "byte-level BPE tokenizer without merges")

    pre = meta.get("tokenizer.ggml.pre", "default")
    vocab = {t: i for i, t in enumerate(tokens)}
    model = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3_PRE)
    tokenizer = Tokenizer(model)
    if pre in _DIGITS_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in _REGEX_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_REGEX_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        if pre not in _GPT2_PRE:
            log.warning("gguf_unknown_pre_tokenizer", source=str(src), pre=pre, using="gpt2")
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, pre in _LLAMA3_PRE


def _sentencepiece_bpe(src: Path, meta: dict[str, Any], tokens: list[str]):
    """Sentencepiece BPE (llama.cpp's 'llama' model), as Llama 2's tokenizer.json spells it."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = meta.get("tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
        raise GGUFImportError(src, "sentencepiece tokenizer without one score per token")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = meta.get("tokenizer.ggml.merges")
    if merges:
        merges = [tuple(m.split(" ", 1)) for m in merges]
    else:
        merges = _merges_from_scores(tokens, scores, vocab)
    unk = _token_name(tokens, meta.get("tokenizer.ggml.unknown_token_id", 0))
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    replace = normalizers.Replace(" ", "\u2581")
    decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace])
        decode.append(decoders.Strip(" ", 1, 0))
    else:
        tokenizer.normalizer = replace
    tokenizer.decoder = decoders.Sequence(decode)
    return tokenizer, True


def _merges_from_scores(
    tokens: list[str], scores: list[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: a higher-scored result merges first."""
    ranked = []
    for token, score in zip(tokens, scores, strict=True):
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def tokenizer_files(src: Path, meta: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """tokenizer.json text, tokenizer_config.json and generation_config.json contents."""
    tokenizer, add_bos, add_eos = _build_tokenizer(src, meta)
    tokens = meta["tokenizer.ggml.tokens"]
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("llama.context_length", 2048)),
    }
    gen_config: dict[str, Any] = {}
    for name, key in (
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("pad", "padding_token_id"),
        ("unk", "unknown_token_id"),
    ):
        token = _token_name(tokens, meta.get(f"tokenizer.ggml.{key}"))
        if token is not None:
            tok_config[f"{name}_token"] = token
            if name != "unk":
                gen_config[f"{name}_token_id"] = int(meta[f"tokenizer.ggml.{key}"])
    if isinstance(meta.get("tokenizer.chat_template"), str):
        tok_config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer.to_str(pretty=True), tok_config, gen_config
