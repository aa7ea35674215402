"""Continuous batching of the target alone: several requests decoded together, one token each
per step, through mlx-lm's `BatchGenerator`.

Speculation is off inside a batch (as in vLLM above its speculative batch size): on a
memory-bound device one target step over a few rows costs about one row's step, so a batch
multiplies throughput, where drafting only pays for one request at a time. Requests join and
leave between steps; a request the engine was serving speculatively joins with its state
(`daemon.core.engine.Handoff`): its target KV cache, its text so far and its grammar, so its
answer goes on exactly where it was.

What each member keeps from the speculative path: its `GenerationResult` (tokens, text, stats;
nothing drafted here, so no rejections: batched requests are never failure cases), the same
text rules (`daemon.core.output.TextStream`), `max_tokens` and the context bound, a
`Constraint` applied as a logits processor, sampling by the same `process_logits` (greedy:
the target's argmax), and the prompt cache: a member starts from the longest cached prefix of
its prompt and leaves its cache there when it ends.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator

from daemon.core.constraints import Constraint
from daemon.core.engine import (
    GenerationChunk,
    GenerationResult,
    HandoffState,
    SamplingParams,
    SpeculativeEngine,
)
from daemon.core.output import TextStream
from daemon.core.sampling import process_logits

__all__ = ["BatchDecoder"]


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


class _Sampler:
    """A sampled member's sampler: its own key when seeded, so the same seed draws the same
    tokens whatever else is in the batch."""

    def __init__(self, params: SamplingParams) -> None:
        self.temp, self.top_k, self.top_p = params.temperature, params.top_k, params.top_p
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.key = mx.random.key(seed & 0xFFFFFFFFFFFFFFFF)

    def __call__(self, logprobs: mx.array) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(
            process_logits(logprobs, self.temp, self.top_k, self.top_p), key=sub
        )


class _Processor:
    """Masks a member's logits: to the vocabulary the pair shares (what the speculative path
    samples from) and, with a constraint, to what its grammar allows next.

    mlx-lm calls it with the member's tokens so far (its cache's tokens, then each new input);
    the tokens past ``base`` are the member's output, fed to the grammar here, one step ahead
    of the responses (the batch computes the next token before returning the current one)."""

    def __init__(
        self, constraint: Constraint | None, vocab: int, width: int, base: int, eos: set[int]
    ) -> None:
        self.constraint = constraint
        self.vocab, self.width, self.base, self.eos = vocab, width, base, eos
        self._outside = None if width <= vocab else mx.arange(width) < vocab

    def __call__(self, context: mx.array, logits: mx.array) -> mx.array:
        if self.constraint is not None:
            n = context.size
            if n > self.base:
                ids = cast(list[int], context[self.base :].tolist())
                new = [t for t in ids if t not in self.eos]
                self.base = n
                if new and not self.constraint.done:
                    self.constraint.consume(new)
            mask = self.constraint.mask(self.vocab)
            if self.width > self.vocab:
                mask = np.concatenate([mask, np.zeros(self.width - self.vocab, dtype=bool)])
            return mx.where(mx.array(mask), logits, -mx.inf)
        assert self._outside is not None
        return mx.where(self._outside, logits, -mx.inf)


@dataclass
class _Member:
    result: GenerationResult
    text: TextStream
    constraint: Constraint | None
    limit: int  # tokens the answer may have in all (max_tokens and the context bound)
    t_gen: float
    prompt_tokens: int
    new_tokens: int = 0  # generated while in the batch


class BatchDecoder:
    """The engine's target, decoding its members one token per step."""

    def __init__(self, engine: SpeculativeEngine, max_batch: int) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self._gen: BatchGenerator | None = None
        self._members: dict[int, _Member] = {}

    def __len__(self) -> int:
        return len(self._members)

    @property
    def full(self) -> bool:
        return len(self._members) >= self.max_batch

    def _generator(self) -> BatchGenerator:
        if self._gen is None:
            cfg = self.engine.config
            self._gen = BatchGenerator(
                self.engine.target,
                max_tokens=1 << 30,  # each member's own limit is checked here
                completion_batch_size=self.max_batch,
                prefill_batch_size=self.max_batch,
                prefill_step_size=cfg.prefill_step_size,
                # the calling thread's stream, as the engine's: a handed-over cache and the
                # prompt cache's arrays are then all on one stream (MLX streams are per thread)
                stream=mx.default_stream(mx.default_device()),
            )
        return self._gen

    def _insert(
        self,
        seq: list[int],
        cache: list[Any] | None,
        cached: int,
        params: SamplingParams,
        member: _Member,
    ) -> int:
        """Start decoding after ``seq`` (the cache holds its first ``cached`` tokens)."""
        engine = self.engine
        width = engine._target_vocab_size()
        vocab = min(width, engine.shared_vocab())
        eos = set(engine.tokenizer.eos_token_ids or ())
        processors: list[Callable[[mx.array, mx.array], mx.array]] = []
        if member.constraint is not None or width > vocab:
            processors.append(_Processor(member.constraint, vocab, width, len(seq), eos))
        sampler = _greedy if params.temperature == 0 else _Sampler(params)
        (uid,) = self._generator().insert(
            [seq[cached:]],
            max_tokens=[max(1, member.limit - len(member.result.tokens))],
            caches=[cache] if cache is not None else None,
            all_tokens=[seq[:cached]],
            samplers=[sampler],
            logits_processors=[processors],
        )
        self._members[uid] = member
        return uid

    def add(
        self,
        prompt_tokens: Sequence[int],
        params: SamplingParams,
        result: GenerationResult,
        constraint: Constraint | None = None,
    ) -> int:
        """A new request (validated as the engine validates it); returns its id here."""
        engine = self.engine
        prompt = engine._validate(prompt_tokens, params)
        cache, cached = engine.prompt_cache.fetch("target", prompt[:-1])
        result.stats.cached_tokens = cached
        result.stats.prompt_tokens = len(prompt)
        member = _Member(
            result,
            TextStream(engine.tokenizer, params.stop, engine.tokenizer.eos_token_ids or ()),
            constraint,
            self._limit(params, len(prompt)),
            time.perf_counter(),
            len(prompt),
        )
        return self._insert(prompt, cache, cached, params, member)

    def adopt(
        self,
        state: HandoffState,
        params: SamplingParams,
        result: GenerationResult,
        constraint: Constraint | None = None,
    ) -> int:
        """A request the engine was serving, from where it stood (`Handoff`)."""
        held = state.target_cache[0].offset if state.target_cache else 0
        member = _Member(
            result,
            state.text,
            constraint,
            self._limit(params, state.prompt_tokens),
            state.t_gen,
            state.prompt_tokens,
        )
        return self._insert(state.seq, state.target_cache, held, params, member)

    def _limit(self, params: SamplingParams, prompt_tokens: int) -> int:
        ctx = self.engine.config.max_context
        room = ctx - prompt_tokens if ctx is not None else math.inf
        return int(min(params.max_tokens, room))

    def step(self) -> list[tuple[int, GenerationChunk]]:
        """One step for every member: a token each (or a prefill chunk for a new one).
        Returns the members' chunks; a chunk with ``finish_reason`` ends its member."""
        gen = self._generator()
        _, responses = gen.next()
        out: list[tuple[int, GenerationChunk]] = []
        done: list[int] = []
        for r in responses:
            m = self._members.get(r.uid)
            if m is None:
                continue
            if r.uid in done:
                continue
            if not m.result.tokens and not m.new_tokens:
                m.result.stats.prompt_time = time.perf_counter() - m.t_gen
                m.t_gen = time.perf_counter()
            m.result.tokens.append(r.token)
            m.new_tokens += 1
            finish = m.text.add(r.token)
            if finish is None and m.constraint is not None and m.constraint.done:
                finish = "stop"  # the processor fed it this token: nothing may follow
            if finish is None and len(m.result.tokens) >= m.limit:
                finish = "length"
            if finish is None:
                out.append((r.uid, GenerationChunk(text=m.text.delta(), tokens=[r.token])))
                continue
            if r.finish_reason is None:
                done.append(r.uid)
            else:  # mlx-lm ended it too (its max_tokens): the cache came with the response
                self._keep(r.all_tokens, r.prompt_cache)
            out.append((r.uid, self._final(r.uid, finish, [r.token])))
        if done:
            for cache, tokens in gen.remove(done, return_prompt_caches=True).values():
                self._keep(tokens, cache)
        return out

    def cancel(self, uid: int) -> GenerationResult:
        """End a member now (its client left, or the server stops): finish_reason
        "cancelled"; its cache still goes to the prompt cache."""
        if self._gen is not None:
            for cache, tokens in self._gen.remove([uid], return_prompt_caches=True).values():
                self._keep(tokens, cache)
        chunk = self._final(uid, "cancelled", [])
        assert chunk.result is not None
        return chunk.result

    def _final(self, uid: int, finish: str, tokens: list[int]) -> GenerationChunk:
        m = self._members.pop(uid)
        delta = m.text.finish() if finish != "cancelled" else ""
        if finish != "cancelled" and m.text.stopped_by_string:
            finish = "stop"
        result = m.result
        result.text = m.text.text
        result.finish_reason = finish
        stats = result.stats
        stats.generation_tokens = len(result.tokens)
        stats.batched_tokens += m.new_tokens
        stats.target_passes += m.new_tokens  # one step each (the prefill's pass aside)
        stats.generation_time = time.perf_counter() - m.t_gen
        if not self._members:
            self.close()
        return GenerationChunk(text=delta, tokens=tokens, finish_reason=finish, result=result)

    def _keep(self, tokens: list[int] | None, cache: list[Any] | None) -> None:
        if tokens and cache:
            held = getattr(cache[0], "offset", 0)
            if isinstance(held, int) and 0 < held <= len(tokens):
                self.engine.prompt_cache.store("target", list(tokens[:held]), cache)

    def close(self) -> None:
        """Drop the generator (its caches) once the batch is empty."""
        if self._gen is not None:
            self._gen.close()
            self._gen = None
        mx.clear_cache()
