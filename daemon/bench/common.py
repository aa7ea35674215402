"""What the benchmarks share: mlx-lm generation as the reference, timing, one decode step."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import mlx.nn as nn
from mlx_lm import stream_generate
from mlx_lm.tokenizer_utils import TokenizerWrapper


def mlx_lm_run(
    target: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: list[int],
    max_tokens: int,
    draft: nn.Module | None = None,
    num_draft_tokens: int = 0,
) -> tuple[list[int], list[bool]]:
    kwargs: dict[str, Any] = {}
    if draft is not None:
        kwargs.update(draft_model=draft, num_draft_tokens=num_draft_tokens)
    toks: list[int] = []
    flags: list[bool] = []
    for r in stream_generate(target, tokenizer, prompt, max_tokens=max_tokens, **kwargs):
        toks.append(int(r.token))
        flags.append(bool(r.from_draft))
    return toks, flags


T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def strip_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def decode_step_seconds(model: nn.Module, context: int = 256, steps: int = 32) -> float:
    """Seconds per single-token forward pass with a KV cache of ``context`` tokens."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.ones((1, context), dtype=mx.uint32), cache=cache))
    token = mx.array([[1]], dtype=mx.uint32)
    for _ in range(4):  # warm-up
        mx.eval(model(token, cache=cache))
    t0 = time.perf_counter()
    for _ in range(steps):
        mx.eval(model(token, cache=cache))
    return (time.perf_counter() - t0) / steps
