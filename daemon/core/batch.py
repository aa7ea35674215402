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
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from daemon.core.constraints import Constraint
from daemon.core.engine import (
    GenerationChunk,
    GenerationResult,
    HandoffState,
    SamplingParams,
    SpeculativeEngine,
)
from daemon.core.heads import last_logits
from daemon.core.output import TextStream
from daemon.core.records import TokenLogprob, token_logprobs
from daemon.core.rounds import as_f32
from daemon.core.sampling import apply_processors, logits_processors, process_logits

__all__ = ["BatchDecoder", "Joining"]

_READ = object()  # the end of a joining prompt's chunks


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


class _Sampler:
    """A sampled member's sampler: its own key when seeded, so the same seed draws the same
    tokens whatever else is in the batch."""

    def __init__(self, params: SamplingParams) -> None:
        self.temp, self.top_k, self.top_p = params.temperature, params.top_k, params.top_p
        self.min_p = params.min_p
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.key = mx.random.key(seed & 0xFFFFFFFFFFFFFFFF)

    def __call__(self, logprobs: mx.array) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(
            process_logits(logprobs, self.temp, self.top_k, self.top_p, self.min_p), key=sub
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

    def mask(self, logits: mx.array) -> mx.array:
        """The mask alone (the first token, drawn before the member joins the batch)."""
        return self(mx.zeros((self.base,), dtype=mx.uint32), logits)

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
    logprobs: int | None = None  # the request's SamplingParams.logprobs


@dataclass(eq=False)
class Joining:
    """A request whose prompt is being read before it joins (`BatchDecoder.join`): one chunk
    per `BatchDecoder.read`, so the members step between chunks and a request cancelled
    meanwhile stops at the next one instead of after the whole prompt."""

    prompt: list[int]
    params: SamplingParams
    constraint: Constraint | None
    member: _Member
    cache: list[Any]
    tail: mx.array  # the prompt's last chunk: its last row gives the first token's logits
    chunks: Generator[None, None, None]  # the chunks before it, one per `read`


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

    def _masking(self, constraint: Constraint | None, base: int) -> list[Any]:
        """The member's mask (see `_Processor`); none when nothing is masked."""
        engine = self.engine
        width = engine._target_vocab_size()
        vocab = min(width, engine.shared_vocab())
        if constraint is None and width <= vocab:
            return []
        eos = set(engine.tokenizer.eos_token_ids or ())
        return [_Processor(constraint, vocab, width, base, eos)]

    def _processors(
        self, params: SamplingParams, constraint: Constraint | None, base: int
    ) -> list[Any]:
        """The member's logits processors: the request's (penalties, bias; mlx-lm's, which the
        batch calls with every token so far, as the engine's rounds do), then its mask."""
        return [*logits_processors(params), *self._masking(constraint, base)]

    def _insert(
        self,
        seq: list[int],
        cache: list[Any],
        cached: int,
        sampler: Callable[[mx.array], mx.array],
        member: _Member,
        processors: list[Any],
    ) -> int:
        """Decode on after ``seq`` (the cache holds its first ``cached`` tokens)."""
        (uid,) = self._generator().insert(
            [seq[cached:]],
            max_tokens=[max(1, member.limit - len(member.result.tokens))],
            caches=[cache],
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
    ) -> tuple[int | None, GenerationChunk]:
        """A new request read whole and admitted at once (`join`, `read` until done, `admit`).
        Returns its id here (None when its first token already ended it) and its first
        chunk."""
        joining = self.join(prompt_tokens, params, result, constraint)
        while not self.read(joining):
            pass
        return self.admit(joining)

    def join(
        self,
        prompt_tokens: Sequence[int],
        params: SamplingParams,
        result: GenerationResult,
        constraint: Constraint | None = None,
    ) -> Joining:
        """Start reading a new request's prompt (validated as the engine validates it), from
        the longest cached prefix; `read` it a chunk at a time, then `admit` it."""
        engine = self.engine
        t0 = time.perf_counter()
        prompt = engine._validate(prompt_tokens, params)
        cache, cached = engine.prompt_cache.fetch("target", prompt[:-1])
        cache = cache if cache is not None else make_prompt_cache(engine.target)
        result.stats.cached_tokens = cached
        result.stats.prompt_tokens = len(prompt)
        member = _Member(
            result,
            TextStream(engine.tokenizer, params.stop, engine.tokenizer.eos_token_ids or ()),
            constraint,
            self._limit(params, len(prompt)),
            t0,
            len(prompt),
            logprobs=params.logprobs,
        )
        # the prompt in chunks; its last chunk's last row gives the first token's logits
        rest = mx.array(prompt[cached:], dtype=mx.uint32)
        last = min(rest.size, engine.config.prefill_step_size)
        chunks = engine._prefill_steps(engine.target, cache, rest[:-last], clear=False)
        return Joining(prompt, params, constraint, member, cache, rest[-last:], chunks)

    def read(self, joining: Joining) -> bool:
        """Read the joining prompt's next chunk; True once all but its last are read."""
        return next(joining.chunks, _READ) is _READ

    def drop(self, joining: Joining) -> GenerationResult:
        """End a joining request before it joined (its client left): finish_reason
        "cancelled", nothing generated; the part of the prompt it read is not kept."""
        joining.chunks.close()
        m = joining.member
        m.result.finish_reason = "cancelled"
        m.result.stats.prompt_time = time.perf_counter() - m.t_gen
        return m.result

    def admit(self, joining: Joining) -> tuple[int | None, GenerationChunk]:
        """Draw a read request's first token (the last chunk's pass) and add it to the batch:
        its id (None when that token ended it) and its first chunk."""
        engine = self.engine
        prompt, params, constraint = joining.prompt, joining.params, joining.constraint
        member, cache, result = joining.member, joining.cache, joining.member.result
        t0 = member.t_gen
        logits = last_logits(engine.target, joining.tail[None], cache)[None]
        request_processors = logits_processors(params)
        logits = apply_processors(request_processors, prompt, logits)
        masking = self._masking(constraint, len(prompt) + 1)
        for p in masking:
            logits = p.mask(logits)
        processors = [*request_processors, *masking]
        sampler = _greedy if params.temperature == 0 else _Sampler(params)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = cast(int, sampler(logprobs).item())
        result.stats.target_passes += 1
        result.stats.prompt_time = time.perf_counter() - t0
        member.t_gen = time.perf_counter()
        if constraint is not None and token not in (engine.tokenizer.eos_token_ids or ()):
            constraint.consume([token])  # mlx-lm's processor takes over from the next one
        chunk = self._advance(member, token, logprobs[0])
        if chunk.result is not None:  # that token ended it
            self._keep(prompt, cache)
            return None, chunk
        # mlx-lm's processor sees the cache's tokens, then each input: the first token is the
        # first input, so the output it feeds to the grammar starts after it
        uid = self._insert(prompt + [token], cache, len(prompt), sampler, member, processors)
        return uid, chunk

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
            logprobs=params.logprobs,
        )
        processors = self._processors(params, constraint, len(state.seq))
        sampler = _greedy if params.temperature == 0 else _Sampler(params)
        return self._insert(state.seq, state.target_cache, held, sampler, member, processors)

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
            if m is None or r.uid in done:
                continue
            chunk = self._advance(m, r.token, r.logprobs)
            if chunk.result is not None:
                del self._members[r.uid]
                if r.finish_reason is None:
                    done.append(r.uid)
                else:  # mlx-lm ended it too (its max_tokens): the cache came with it
                    self._keep(r.all_tokens, r.prompt_cache)
            out.append((r.uid, chunk))
        if done:
            for cache, tokens in gen.remove(done, return_prompt_caches=True).values():
                self._keep(tokens, cache)
        if not self._members:
            self.close()
        return out

    def _advance(self, m: _Member, token: int, logprobs: mx.array) -> GenerationChunk:
        """``token`` is ``m``'s next (its grammar already fed it; ``logprobs`` its row after
        the processors): its chunk, final (``result`` set) if it ends the answer."""
        lps = []
        if m.logprobs is not None:
            lps = token_logprobs(as_f32(logprobs)[None], [token], m.logprobs)
            m.result.logprobs += lps
        m.result.tokens.append(token)
        m.new_tokens += 1
        finish = m.text.add(token)
        if finish is None and m.constraint is not None and m.constraint.done:
            finish = "stop"  # the grammar is complete: nothing may follow
        if finish is None and len(m.result.tokens) >= m.limit:
            finish = "length"
        if finish is None:
            return GenerationChunk(text=m.text.delta(), tokens=[token], logprobs=lps)
        return self._final(m, finish, [token], lps)

    def releasable(self, uid: int, params: SamplingParams) -> bool:
        """Whether the member can go back to the speculative path: it is decoding (not reading
        its prompt) and its draws do not follow a seed (the engine would start the seed's
        key sequence over)."""
        m = self._members.get(uid)
        seeded = params.temperature > 0 and params.seed is not None
        return m is not None and m.new_tokens > 0 and not seeded

    def release(self, uid: int) -> HandoffState:
        """Take a member out of the batch with its state, for `SpeculativeEngine.resume`.
        The token the batch already drew for it ahead of time is dropped (drawn again there)."""
        m = self._members.pop(uid)
        assert self._gen is not None
        ((cache, tokens),) = self._gen.remove([uid], return_prompt_caches=True).values()
        seq = list(tokens)
        if not self._members:
            self.close()
        # the cache holds every returned token, the last included: the engine scores that one
        trim_prompt_cache(cache, cache[0].offset - (len(seq) - 1))
        m.result.stats.batched_tokens += m.new_tokens
        m.result.stats.target_passes += m.new_tokens
        return HandoffState(seq, cache, m.text, m.t_gen, m.prompt_tokens)

    def cancel(self, uid: int) -> GenerationResult:
        """End a member now (its client left, or the server stops): finish_reason
        "cancelled"; its cache still goes to the prompt cache."""
        if self._gen is not None:
            for cache, tokens in self._gen.remove([uid], return_prompt_caches=True).values():
                self._keep(tokens, cache)
        chunk = self._final(self._members.pop(uid), "cancelled", [])
        if not self._members:
            self.close()
        assert chunk.result is not None
        return chunk.result

    def _final(
        self,
        m: _Member,
        finish: str,
        tokens: list[int],
        logprobs: list[TokenLogprob] | None = None,
    ) -> GenerationChunk:
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
        return GenerationChunk(
            text=delta,
            tokens=tokens,
            finish_reason=finish,
            result=result,
            logprobs=logprobs or [],
        )

    def _keep(self, tokens: list[int] | None, cache: list[Any] | None) -> None:
        if tokens and cache:
            self.engine.prompt_cache.keep("target", list(tokens), cache)

    def close(self) -> None:
        """Drop the generator (its caches) once the batch is empty."""
        if self._gen is not None:
            self._gen.close()
            self._gen = None
        mx.clear_cache()
