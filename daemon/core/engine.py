"""specd's speculative decoding engine.

One request = fresh KV caches for the target and the draft, a chunked prefill of the prompt
(all but its last token) by the target, then *rounds* (the draft reads the prompt, in chunks
too, at its first model round, so a request served from proposals alone never runs it):

1. the draft proposes ``k`` tokens autoregressively (``mx.async_eval`` per token, so the
   graph for the next token is built while the previous one computes);
2. the target scores ``[last token, d_1 .. d_k]`` in one forward pass (``k + 1`` rows);
3. one ``mx.eval`` per round brings the accept/reject decision to the host, the caches are
   trimmed back to the accepted prefix and the accepted tokens plus one target token
   (correction or bonus) are emitted.

Acceptance
    * temperature 0: draft token ``d_i`` is accepted iff it equals the target argmax at
      position ``i``; the first mismatch is replaced by the target argmax.  Output is token
      for token the target's own greedy decoding.
    * temperature > 0: lossless speculative sampling (Leviathan et al. / Chen et al.):
      accept ``d_i`` with probability ``min(1, p(d_i) / q(d_i))``; on the first rejection emit
      a sample of ``normalize(max(0, p - q))``; if all ``k`` are accepted emit a bonus sample
      of ``p`` at position ``k``.  ``p`` and ``q`` are the *processed* distributions
      (temperature, top-k, top-p; see :mod:`daemon.core.sampling`) of target and draft, over the
      shared vocabulary ``min(target_vocab, draft_vocab)`` (padded vocabularies differ).

Drafters
    The draft model sits behind `daemon.core.drafters.Drafter`: a model over tokens (layer-skip
    or a separate model, with its own KV cache and prompt-cache entries) or the feature draft
    (`daemon.core.feature_draft`), which reads the target's hidden states. For the latter the
    verification pass and the prefill compute the target's hidden states and its logits from
    them (`FeatureDraft.target_features`, `output_head`): the same forward, the features kept
    (the final ones, and those of the layers the draft taps).

Adaptive draft length (``SpeculativeConfig.adaptive``, the default)
    The Hugging Face "heuristic" schedule: start at ``num_draft_tokens`` (clamped into
    ``[min_draft_tokens, max_draft_tokens]``); after a round that drafted the full current
    length, grow it by 2 if every draft token was accepted, otherwise shrink it by 1, always
    within the bounds.  It settles where a full acceptance happens about one round in three,
    i.e. a longer draft for a draft that agrees more with the target.

Drafting sources (``lookup``, ``suffix``, ``cost_aware``; off unless configured)
    Besides the draft model, a round can verify a *proposal* copied from tokens already seen
    (:mod:`daemon.core.drafting`): the request's own context (lookup) or the target's past
    outputs (suffix index). A proposal costs no draft pass; at temperature > 0 it is verified
    as a point mass (q = 1 on the proposed token: accepted with probability p(d), on
    rejection a sample of p without d), which keeps sampling exact. With ``cost_aware`` the
    :class:`~daemon.core.policy.SpeculationPolicy` picks each round's source and length (zero
    included: a plain target step) by measured tokens per second; without it a proposal is
    used when there is one and the model draft otherwise; a proposal that runs out may be
    continued by the model draft in the same round (``continue_proposals``, a drafter that
    reads tokens only). The draft model's cache catches up on tokens it did not draft the
    next time it drafts. Only the model's tokens record rejections (they are what the draft
    is trained on). A request with a ``seed`` drafts only from the
    model and its own context, never from the suffix index or the policy, so the same seed
    gives the same sample.

Statistics
    ``target_passes`` counts target forward passes: every verification round is one pass and
    the prefill counts as one pass in total (however many chunks), and only when the prompt
    has more than one token (the last prompt token is always scored by the first round).
    ``drafted``/``accepted``/``num_drafts`` count verification outcomes of rounds that
    drafted at least one token, even when EOS, a stop string or ``max_tokens`` later cut
    the emitted output short, and ``drafted_by_source``/``accepted_by_source`` split them by
    source.

Rejections
    For each round with a rejection, its first rejected draft token is recorded (later draft
    tokens are never verified) with the target's raw (temperature 1) top-k log-probabilities
    at that position, taken from the verification logits already computed (no extra forward
    pass, no extra ``mx.eval``): the round's logits are evaluated anyway, and the rejected
    row is reduced on the host with numpy (zero-copy view) while the device already runs the
    next round (between its ``mx.async_eval`` and ``mx.eval``), or when the request ends.
    Records whose position lies beyond the final output (cut by EOS / stop) are dropped.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from daemon.core.constraints import Constraint
from daemon.core.drafters import FeatureDrafter, make_drafter
from daemon.core.drafting import ContextIndex, Proposer, SuffixIndex, SuffixProposer
from daemon.core.feature_draft import FeatureDraft, is_feature_draft
from daemon.core.models import output_vocab
from daemon.core.output import TextStream
from daemon.core.params import SamplingParams, SpeculativeConfig
from daemon.core.policy import Measured, SpeculationPolicy
from daemon.core.prompt_cache import PromptCache
from daemon.core.records import (
    GenerationChunk,
    GenerationResult,
    GenerationStats,
    Rejection,
    TokenLogprob,
)
from daemon.core.rounds import RequestState, Verified, complete_rejections, run_round
from daemon.core.sampling import history_size, logits_processors
from daemon.errors import GenerationError

__all__ = [
    "Handoff",
    "HandoffState",
    "GenerationChunk",
    "GenerationError",
    "GenerationResult",
    "GenerationStats",
    "Rejection",
    "SamplingParams",
    "SpeculativeConfig",
    "SpeculativeEngine",
    "TokenLogprob",
]


class Handoff(Exception):  # noqa: N818 (a signal thrown into the generator, not an error)
    """Thrown into a running generation (``gen.throw(Handoff())``) between two chunks: the
    generator ends without a final chunk and leaves its state in ``engine.handed_off`` for
    another decoder to continue (`daemon.core.batch`)."""


@dataclass
class HandoffState:
    """Where a handed-off generation stands: ``target_cache`` holds a prefix of ``seq`` (the
    prompt and every token emitted so far; its ``offset`` says how long), ``text`` what was
    detokenized and sent, ``t_gen`` when its generation phase started."""

    seq: list[int]
    target_cache: list[Any]
    text: TextStream
    t_gen: float
    prompt_tokens: int


def _emit(
    v: Verified,
    out: TextStream,
    constraint: Any,
    result: GenerationResult,
    new_tokens: list[int],
    new_lps: list[TokenLogprob],
) -> str | None:
    """Add a round's tokens to ``result`` (and this chunk's lists) one at a time, until one
    ends the request: EOS or a stop token (``out``), or a grammar that is complete (nothing
    may follow). The finish reason, or None."""
    for i, t in enumerate(v.emitted):
        result.tokens.append(t)
        new_tokens.append(t)
        if v.logprobs is not None:
            new_lps.append(v.logprobs[i])
            result.logprobs.append(v.logprobs[i])
        finish = out.add(t)
        if finish is not None:
            return finish
        if constraint is not None:
            constraint.consume([t])
            if constraint.done:
                return "stop"
    return None


class SpeculativeEngine:
    """Speculative decoding of ``target`` with proposals from ``draft``.

    ``engine.draft`` may be replaced between requests (e.g. a LoRA hot-swap); nothing
    draft-specific is kept across requests.  Requests are not meant to run concurrently on
    one engine (MLX evaluation is serialised anyway).
    """

    def __init__(
        self,
        target: nn.Module,
        draft: nn.Module,
        tokenizer: TokenizerWrapper,
        config: SpeculativeConfig | None = None,
        suffix: SuffixIndex | None = None,
        prompt_cache: PromptCache | None = None,
    ) -> None:
        self.target = target
        self.draft_serial = 0  # which draft this is: bumped by every assignment (a swap)
        self.draft = draft
        self.tokenizer = tokenizer
        self.config = config or SpeculativeConfig()
        self.config.validate()
        self.suffix = suffix  # past outputs to draft from (shared with the buffer's commits)
        self._policy: tuple[SpeculativeConfig, SpeculationPolicy] | None = None
        self._target_vocab: tuple[nn.Module, int] | None = None
        # KV caches kept across requests; off unless given one with entries
        self.prompt_cache = prompt_cache if prompt_cache is not None else PromptCache(0, 0)
        self.handed_off: HandoffState | None = None  # see Handoff

    @property
    def draft(self) -> nn.Module:
        return self._draft

    @draft.setter
    def draft(self, draft: nn.Module) -> None:
        # a serial, not id(draft): ids are reused once a swapped-out draft is collected, and
        # the prompt cache and the policy must never take a new draft for the one they knew
        self._draft = draft
        self.draft_serial += 1

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        prompt_tokens: Sequence[int],
        params: SamplingParams,
        result: GenerationResult | None = None,
        constraint: Constraint | None = None,
    ) -> Generator[GenerationChunk, None, None]:
        """Validate the request and return a generator of :class:`GenerationChunk`.

        With ``constraint`` (`daemon.core.constraints`) the output follows its grammar: the
        target's and the draft's logits are masked to what it allows at each position.

        Validation happens here, eagerly: a :class:`GenerationError` is raised by this call,
        before any cache exists.  ``result`` (or a new :class:`GenerationResult`, attached
        to the final chunk) is filled while the generator runs; stats and rejections are
        final once the generator is exhausted or closed.  Closing the generator stops
        generation at the current round.
        """
        prompt = self._validate(prompt_tokens, params)
        target, draft = self.target, self.draft
        self.prompt_cache.use_draft(self.draft_serial)
        # the longest cached prefix of the prompt (all but its last token, which the first
        # round scores), else fresh caches
        target_cache, t_cached = self.prompt_cache.fetch("target", prompt[:-1])
        draft_cache, d_cached = None, 0
        if not is_feature_draft(draft):  # a feature draft's cache is not keyed by tokens alone
            draft_cache, d_cached = self.prompt_cache.fetch("draft", prompt[:-1])
        target_cache = target_cache if target_cache is not None else make_prompt_cache(target)
        draft_cache = draft_cache if draft_cache is not None else make_prompt_cache(draft)
        for name, cache in (("target", target_cache), ("draft", draft_cache)):
            if not can_trim_prompt_cache(cache):
                raise GenerationError(
                    f"speculative decoding needs a trimmable KV cache; the {name} model's "
                    f"cache ({sorted({type(c).__name__ for c in cache})}) is not"
                )
        result = result if result is not None else GenerationResult()
        result.stats.cached_tokens = t_cached
        st = self._request_state(
            draft, target_cache, draft_cache, prompt, params, result, d_cached, constraint
        )
        return self._generate(st, draft_cache, result)

    def resume(
        self,
        state: HandoffState,
        params: SamplingParams,
        result: GenerationResult,
        constraint: Constraint | None = None,
    ) -> Generator[GenerationChunk, None, None]:
        """Go on speculatively with a generation the batch decoder hands back
        (`daemon.core.batch.BatchDecoder.release`): ``state.target_cache`` holds all of
        ``state.seq`` but at least its last token, ``result`` has its output so far. The draft
        starts from a fresh cache (it reads the sequence at its first model round)."""
        if not state.target_cache or state.target_cache[0].offset >= len(state.seq):
            raise ValueError("a resumed generation needs its last token outside the cache")
        draft = self.draft
        self.prompt_cache.use_draft(self.draft_serial)
        prompt = state.seq[: state.prompt_tokens]
        draft_cache = make_prompt_cache(draft)
        st = self._request_state(
            draft, state.target_cache, draft_cache, prompt, params, result, 0, constraint, state
        )
        return self._generate(st, draft_cache, result, resume=state)

    def run(
        self,
        prompt_tokens: Sequence[int],
        params: SamplingParams,
        constraint: Constraint | None = None,
    ) -> GenerationResult:
        """Non-streaming convenience: generate to completion and return the result."""
        result = GenerationResult()
        for _ in self.generate(prompt_tokens, params, result, constraint):
            pass
        return result

    # ------------------------------------------------------------------ internals

    def measured(self) -> Measured | None:
        """What the round policy has measured (`SpeculationPolicy.measured`); None before the
        first request. Safe from another thread: it only reads."""
        held = self._policy
        return held[1].measured() if held is not None else None

    @property
    def policy(self) -> SpeculationPolicy:
        """The cost-aware policy; measurements carry across requests (rebuilt when the
        configuration is replaced, e.g. by a live reload)."""
        cfg = self.config
        if self._policy is None or self._policy[0] is not cfg:
            model_tokens = cfg.max_draft_tokens if cfg.model_draft else 0
            policy = SpeculationPolicy(model_tokens, cfg.max_proposal_tokens, cfg.draft_confidence)
            self._policy = (cfg, policy)
        return self._policy[1]

    def shared_vocab(self) -> int:
        """The vocabulary the target and the draft share: what every path samples from."""
        return min(self._target_vocab_size(), output_vocab(self.draft))

    def _target_vocab_size(self) -> int:
        cached = self._target_vocab
        if cached is None or cached[0] is not self.target:
            cached = (self.target, output_vocab(self.target))
            self._target_vocab = cached
        return cached[1]

    def _validate(self, prompt_tokens: Sequence[int], params: SamplingParams) -> list[int]:
        if not isinstance(params, SamplingParams):
            raise GenerationError("params must be a SamplingParams")
        params.validate(self.config.max_context)
        if isinstance(prompt_tokens, mx.array):
            prompt_tokens = prompt_tokens.tolist()
        try:
            prompt = [int(t) for t in prompt_tokens]
        except (TypeError, ValueError) as e:
            raise GenerationError(f"prompt must be a sequence of token ids: {e}") from None
        if not prompt:
            raise GenerationError("prompt is empty")
        vocab = self._target_vocab_size()
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise GenerationError(f"prompt contains token ids outside [0, {vocab})")
        max_context = self.config.max_context
        if max_context is not None and len(prompt) >= max_context:
            raise GenerationError(
                f"prompt has {len(prompt)} tokens; the model context is {max_context} "
                "(at least one token must remain for generation)"
            )
        return prompt

    def _prefill(
        self, model: nn.Module, cache: list[Any], tokens: mx.array, clear: bool = True
    ) -> None:
        """Run ``tokens`` through ``model`` in chunks, filling ``cache`` (only the cache is
        evaluated, so the lazy graph never computes the output head)."""
        for _ in self._prefill_steps(model, cache, tokens, clear):
            pass

    def _prefill_steps(
        self,
        model: nn.Module,
        cache: list[Any],
        tokens: mx.array,
        clear: bool = True,
        features: tuple[FeatureDraft, Callable[[int, mx.array], None]] | None = None,
    ) -> Generator[None, None, None]:
        """`_prefill`, yielding between chunks (where a closed request stops). ``features``:
        a feature draft and a sink: the draft's features of each chunk (``target_features``)
        go to the sink with the chunk's start."""
        step = self.config.prefill_step_size
        for start in range(0, tokens.size, step):
            if start:
                yield
            chunk = tokens[start : start + step][None]
            if features is None:
                model(chunk, cache=cache)
                mx.eval([c.state for c in cache])
            else:
                reader, sink = features
                hidden = reader.target_features(chunk, cache)[0]
                mx.eval([c.state for c in cache], hidden)
                sink(start, hidden)
        if tokens.size and clear:
            mx.clear_cache()

    def _generate(
        self,
        st: RequestState,
        draft_cache: list[Any],
        result: GenerationResult,
        resume: HandoffState | None = None,
    ) -> Generator[GenerationChunk, None, None]:
        cfg = self.config
        target_cache, prompt, params = st.target_cache, st.prompt, st.params
        constraint = st.constraint
        stats = result.stats
        stats.prompt_tokens = len(prompt)
        ctx_limit = cfg.max_context if cfg.max_context is not None else math.inf
        if resume is not None:  # where the batch left it
            out = resume.text
        else:
            out = TextStream(self.tokenizer, params.stop, self.tokenizer.eos_token_ids or ())
        seq, drafter = st.seq, st.drafter
        n_top = cfg.top_logprobs

        def materialize() -> None:
            complete_rejections(st.pending, n_top)

        finish: str | None = None
        tokens = result.tokens
        new_tokens: list[int] = []
        new_lps: list[TokenLogprob] = []
        t_start = time.perf_counter()
        t_gen = resume.t_gen if resume is not None else t_start
        try:
            if resume is None:
                yield from self._prefill_prompt(st, stats)
                t_gen = time.perf_counter()
                stats.prompt_time = t_gen - t_start
            if st.policy is not None:
                st.policy.new_request(self.draft_serial)
            while True:
                new_tokens, new_lps = [], []
                remaining = min(
                    params.max_tokens - len(tokens), ctx_limit - len(prompt) - len(tokens)
                )
                if remaining <= 0:
                    finish = "length"
                    break
                v = run_round(st, int(remaining), materialize)
                finish = _emit(v, out, constraint, result, new_tokens, new_lps)
                if finish is not None:
                    break
                delta = out.delta()
                result.text = out.text
                yield GenerationChunk(text=delta, tokens=new_tokens, logprobs=new_lps)

            # ---- finish: flush the detokenizer, apply stop strings, final chunk
            delta = out.finish()
            if out.stopped_by_string:
                finish = "stop"
            result.text = out.text
            result.finish_reason = finish
            if st.policy is not None:
                stats.draft_acceptance_estimate = st.policy.draft_acceptance()
            self._finalize(result, st.pending, materialize, t_gen)
            yield GenerationChunk(
                text=delta,
                tokens=new_tokens,
                finish_reason=finish,
                result=result,
                logprobs=new_lps,
            )
        except Handoff:  # between rounds: both caches hold a prefix of seq
            self.handed_off = HandoffState(seq, target_cache, out, t_gen, len(prompt))
        except GeneratorExit:
            result.finish_reason = result.finish_reason or "cancelled"
            raise
        except BaseException:
            result.finish_reason = result.finish_reason or "error"
            raise
        finally:
            self._finalize(result, st.pending, materialize, t_gen)
            if self.handed_off is not None and self.handed_off.seq is seq:
                pass  # the caches go on with the request, not into the prompt cache
            elif result.finish_reason != "error":
                # finished, or closed between rounds: the caches hold a prefix of seq either way
                keep_draft = not isinstance(drafter, FeatureDrafter)
                self._keep_caches(seq, target_cache, draft_cache if keep_draft else None)

    def _prefill_prompt(
        self, st: RequestState, stats: GenerationStats
    ) -> Generator[GenerationChunk, None, None]:
        """Prefill the prompt past its cached prefix (all but its last token, which the first
        round reads), feeding a feature drafter the target's features as they come. A long
        prompt yields empty chunks between its prefill chunks: a client that hangs up stops
        the request there, not after the whole prefill."""
        prompt, drafter, t_cached = st.prompt, st.drafter, stats.cached_tokens
        if len(prompt) - 1 <= t_cached:
            return

        def drafter_features(start: int, hidden: mx.array) -> None:
            # prefill row i is position t_cached + i: it precedes token t_cached + i + 1
            first = t_cached + start + 1
            drafter.observe(prompt[first : first + hidden.shape[0]], hidden)

        steps = self._prefill_steps(
            st.target,
            st.target_cache,
            mx.array(prompt[t_cached:-1], dtype=mx.uint32),
            features=None if st.features is None else (st.features, drafter_features),
        )
        for _ in steps:
            yield GenerationChunk(text="", tokens=[])
        stats.target_passes += 1

    def _request_state(
        self,
        draft: nn.Module,
        target_cache: list[Any],
        draft_cache: list[Any],
        prompt: list[int],
        params: SamplingParams,
        result: GenerationResult,
        draft_cached: int,
        constraint: Constraint | None,
        resume: HandoffState | None = None,
    ) -> RequestState:
        """What a request's rounds share: its drafter, copy sources, key and draft length."""
        cfg = self.config
        greedy = params.temperature == 0
        if greedy:
            key = mx.random.key(0)  # never split: greedy rounds draw nothing
        else:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            key = mx.random.key(seed & 0xFFFFFFFFFFFFFFFF)
        if cfg.adaptive:
            k_cur = min(max(cfg.num_draft_tokens, cfg.min_draft_tokens), cfg.max_draft_tokens)
        else:
            k_cur = cfg.num_draft_tokens
        seq = list(resume.seq) if resume is not None else list(prompt)
        # a model draft reads what it has not read yet at its first model round (a request
        # served from proposals never pays its prefill; after a hand-over it reads it all);
        # a feature draft reads the prompt's features as the target's prefill makes them
        drafter = make_drafter(
            draft,
            draft_cache,
            prompt[draft_cached:] if resume is None else seq,
            lambda m, c, t: self._prefill(m, c, t, clear=False),
            cfg.prefill_step_size,
        )
        # A seeded sample is reproducible: its rounds must not depend on other traffic
        # (the suffix index) or on measured timings (the policy), only on its own input.
        seeded = not greedy and params.seed is not None
        return RequestState(
            target=self.target,
            target_cache=target_cache,
            drafter=drafter,
            features=drafter.model if isinstance(drafter, FeatureDrafter) else None,
            vocab=min(self._target_vocab_size(), output_vocab(draft)),
            params=params,
            cfg=cfg,
            stats=result.stats,
            prompt=prompt,
            tokens=result.tokens,
            seq=seq,
            target_in=[prompt[-1]] if resume is None else seq[target_cache[0].offset :],
            rejections=result.rejections,
            key=key,
            k_cur=k_cur,
            constraint=constraint,
            proposers=self._proposers(seq, seeded),
            policy=self.policy if cfg.cost_aware and not seeded else None,
            processors=logits_processors(params),
            history=history_size(params),
        )

    def _proposers(self, seq: list[int], seeded: bool) -> list[Proposer]:
        """The request's copy sources, in the order they are asked."""
        sources: list[Proposer] = []
        if self.config.lookup:
            sources.append(ContextIndex(seq))
        if self.suffix is not None and not seeded:
            sources.append(SuffixProposer(self.suffix, seq))
        return sources

    def _keep_caches(
        self, seq: list[int], target_cache: list[Any], draft_cache: list[Any] | None
    ) -> None:
        """Hand the finished request's caches to the prompt cache, keyed by what they hold
        (a feature draft's is not: it holds positions from where it started)."""
        if not self.prompt_cache.enabled:
            return
        self.prompt_cache.keep("target", seq, target_cache)
        if draft_cache is not None:
            self.prompt_cache.keep("draft", seq, draft_cache)

    @staticmethod
    def _finalize(result: GenerationResult, pending: list, materialize: Any, t_gen: float) -> None:
        """Complete stats and rejection records (idempotent)."""
        if pending:
            materialize()
        stats = result.stats
        if not stats.generation_time:
            stats.generation_time = time.perf_counter() - t_gen
        stats.generation_tokens = len(result.tokens)
        n_out = len(result.tokens)
        if any(r.position >= n_out for r in result.rejections):
            result.rejections[:] = [r for r in result.rejections if r.position < n_out]
