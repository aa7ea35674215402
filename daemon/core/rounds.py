"""One speculative round, in named steps: choose, draft, verify, record, rewind.

`daemon.core.engine` keeps a request's state in a `RequestState` and runs rounds until the
output ends (it emits their tokens); each step here is one function of that state:

1. `choose`: a proposal copied from seen tokens (the request's `Proposer`s in order: lookup,
   then suffix), the model draft, a proposal continued by the model draft, or a plain target
   step; the cost-aware policy decides when it is on;
2. `draft`: the round's draft tokens and, when sampling, their draft log-probabilities (a
   proposal is a point mass), under the grammar's masks when constrained;
3. `verify`: one target pass over ``[last tokens, d_1 .. d_k]`` and the acceptance decision
   (greedy: the argmax; sampled: `verify_sampled`);
4. `record`: statistics, and the first rejected draft token of a model round
   (`complete_rejections` fills in its target log-probabilities later, on the host);
5. `rewind`: both caches back to the accepted prefix, the drafter told what was verified, the
   adaptive draft length moved.

Every drafter (`daemon.core.drafters`) and every proposal source (`daemon.core.drafting`) is
used the same way, so a new draft kind or source is a file there, not a branch here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import trim_prompt_cache

from daemon.core.confidence import GatedRound, confidence_of
from daemon.core.constraints import Constraint
from daemon.core.drafters import FeatureDrafter, ModelDrafter
from daemon.core.drafting import Proposal, Proposer
from daemon.core.feature_draft import FeatureDraft
from daemon.core.heads import output_head
from daemon.core.policy import CONTINUED, Choice, SpeculationPolicy
from daemon.core.records import (
    GenerationStats,
    Rejection,
    TokenLogprob,
    token_logprobs,
    top_ids,
)
from daemon.core.sampling import (
    LogitsProcessor,
    apply_processors,
    log_softmax,
    process_logits,
    round_keys,
    verify_sampled,
)

# a rejection still to complete on the host: (record, evaluated float32 target logits of its
# round, row, evaluated float32 draft logits row or None)
Pending = tuple[Rejection, mx.array, int, mx.array | None]


def as_f32(x: mx.array) -> mx.array:
    return x if x.dtype == mx.float32 else x.astype(mx.float32)


@dataclass
class RequestState:
    """What the rounds of one request share (the engine builds it, the steps move it on)."""

    target: nn.Module
    target_cache: list[Any]
    drafter: ModelDrafter | FeatureDrafter
    features: FeatureDraft | None  # a feature drafter's model: what it reads of the target
    vocab: int  # the vocabulary target and draft share
    params: Any  # SamplingParams
    cfg: Any  # SpeculativeConfig
    stats: GenerationStats
    prompt: list[int]
    tokens: list[int]  # the output so far
    seq: list[int]  # every verified token: both caches hold a prefix of it
    target_in: list[int]  # tokens the target has not read yet
    rejections: list[Rejection]
    key: mx.array
    k_cur: int
    constraint: Constraint | None = None
    proposers: list[Proposer] = field(default_factory=list)  # asked in order, first wins
    policy: SpeculationPolicy | None = None
    pending: list[Pending] = field(default_factory=list)
    rounds: int = 0
    # the request's logits processors (penalties, bias) and how many tokens they read back
    processors: list[LogitsProcessor] = field(default_factory=list)
    history: int = 0

    @property
    def greedy(self) -> bool:
        return bool(self.params.temperature == 0)

    @property
    def record(self) -> bool:
        return bool(self.cfg.record_rejections)

    def process(
        self, logits: mx.array, drafted: Sequence[mx.array] | mx.array | None, offset: int = 0
    ) -> mx.array:
        """The logits processors on rows that follow every verified token and the round's
        first ``offset + row`` draft tokens (target and draft alike: lossless)."""
        if not self.processors:
            return logits
        history = self.seq[-self.history :] if self.history else []
        return apply_processors(self.processors, history, logits, drafted, offset)


@dataclass
class Drafted:
    """A round's plan and its draft tokens."""

    plan: Choice
    keys: mx.array | None  # the round's random keys (sampling: k + 2 of them)
    tokens: mx.array  # (k,) uint32; empty when nothing is drafted
    q_lp: mx.array | None = None  # draft log-probs (sampling)
    rows: list[mx.array] = field(default_factory=list)  # raw draft logits (greedy, recorded)
    masks: list[np.ndarray] = field(default_factory=list)  # constrained: allowed tokens
    seconds: float = 0.0
    # tokens the draft model drafted, kept for verification or not (`daemon.core.confidence`)
    # and their confidences when the round was gated
    by_model: int = 0
    confidences: list[float] = field(default_factory=list)

    @property
    def k(self) -> int:
        return self.plan.k

    @property
    def model_round(self) -> bool:
        """The draft model drafted some of it (a model round, or a continued proposal)."""
        return (self.plan.source == "model" and self.plan.k > 0) or self.plan.then > 0

    @property
    def first_model(self) -> int:
        """Where the draft model's tokens start (after a continued proposal's)."""
        return len(self.plan.tokens)


@dataclass
class Verified:
    """The target's verdict on a round."""

    drafted: list[int]
    choice: list[int]  # the target's token at each of the k + 1 positions
    accepted: int
    seconds: float
    qx: mx.array | None = None  # draft probabilities of the drafted tokens (sampling)
    logits: mx.array | None = None  # float32 target logits, kept for a rejection record
    hidden: mx.array | None = None  # the target's hidden rows (a feature drafter reads them)
    logprobs: list[TokenLogprob] | None = None  # the emitted tokens', when the request asks

    @property
    def emitted(self) -> list[int]:
        return self.drafted[: self.accepted] + [self.choice[self.accepted]]


def choose(st: RequestState, remaining: int) -> Choice:
    """The round's source and length: a proposal when there is one (or the policy's pick)."""
    cfg = st.cfg
    proposal = _proposal(st, int(min(cfg.max_proposal_tokens, remaining - 1)))
    if st.policy is not None:
        continues = cfg.continue_proposals and st.drafter.continues and st.drafter.ready
        plan = st.policy.choose(proposal, int(remaining), continues)
    elif proposal is not None:
        plan = Choice(proposal.source, len(proposal.tokens), proposal.tokens, proposal.match)
    else:
        k = int(max(0, min(st.k_cur, remaining - 1))) if cfg.model_draft else 0
        plan = Choice("model" if k else "none", k)
    if plan.source == "model" and not st.drafter.ready:  # no feature to draft from yet
        plan = Choice("none", 0)
    return plan


def _proposal(st: RequestState, max_p: int) -> Proposal | None:
    """The first source's proposal (the request's own context before the target's past
    outputs); cut where the draft vocabulary or the grammar would refuse a token."""
    if max_p < 1:
        return None
    proposal = None
    for source in st.proposers:
        proposal = source.propose(max_p, st.cfg.tokens_per_match)
        if proposal is not None:
            break
    if proposal is not None and max(proposal.tokens) >= st.vocab:
        # a token the draft's vocabulary lacks cannot be verified as a draft token
        cut = next(i for i, t in enumerate(proposal.tokens) if t >= st.vocab)
        proposal = replace(proposal, tokens=proposal.tokens[:cut]) if cut else None
    if proposal is not None and st.constraint is not None:
        # only what the grammar allows is worth verifying
        cut = st.constraint.allows(proposal.tokens)
        proposal = replace(proposal, tokens=proposal.tokens[:cut]) if cut else None
    return proposal


def draft(st: RequestState, plan: Choice) -> Drafted:
    """The round's ``k`` draft tokens: the drafter's, token by token, or the proposal's."""
    keys = None
    if not st.greedy:
        st.key, keys = round_keys(st.key, plan.k)
    out = Drafted(plan, keys, mx.zeros((0,), dtype=mx.uint32))
    constraint = st.constraint
    pushed = 0  # draft tokens the grammar state advanced through, to undo
    t0 = time.perf_counter()
    if plan.tokens:  # a proposal: a point mass at each proposed token (q = 1)
        out.tokens = mx.array(plan.tokens, dtype=mx.uint32)
        if constraint is not None:
            for t in plan.tokens:
                out.masks.append(constraint.mask(st.vocab))
                pushed += constraint.push([t])
        if not st.greedy:
            onehot = mx.arange(st.vocab)[None, :] == out.tokens[:, None]
            out.q_lp = mx.where(onehot, 0.0, -mx.inf)
    if out.model_round:  # the model's tokens (after the proposal's, when it continues one)
        pushed += _draft_model(st, out)
    if constraint is not None:  # the last position's mask, then the state back
        out.masks.append(constraint.mask(st.vocab))
        constraint.pop(pushed)
    out.seconds = time.perf_counter() - t0
    return out


def _draft_model(st: RequestState, out: Drafted) -> int:
    """Draft the round's model tokens with the drafter (``mx.async_eval`` per token, so the
    next token's graph is built while this one computes), after a continued proposal's
    tokens when there are some (the drafter reads them first); returns the grammar pushes
    to undo. A gated round (`_gate`) stops early and may drop its last token: the plan's
    ``k`` becomes what is verified."""
    drafter, constraint, params = st.drafter, st.constraint, st.params
    p = out.first_model
    if p:
        drafter.read(out.plan.tokens)
    before = [out.tokens[j] for j in range(p)]  # what the processors see before the model's
    toks: list[mx.array] = []
    q_rows: list[mx.array] = []
    pushed = 0
    gate = _gate(st, out)
    for i in range(out.k - p):
        dl = (drafter.first() if i == 0 else drafter.next(toks[-1]))[: st.vocab]
        dl = st.process(dl[None], before + toks, p + i)[0]
        if i == 0 and not drafter.caught_up:  # it first read tokens it skipped
            st.stats.draft_passes += 1
        out.by_model += 1
        if constraint is not None:
            if i:  # the grammar moves past the token just drafted
                pushed += constraint.push([cast(int, toks[-1].item())])
            out.masks.append(constraint.mask(st.vocab))
            dl = mx.where(mx.array(out.masks[-1]), dl, -mx.inf)
        if st.greedy:
            dist, key = dl, None
        else:
            dist = process_logits(dl, params.temperature, params.top_k, params.top_p, params.min_p)
            assert out.keys is not None
            key = out.keys[p + i]
        tok, confidence = pick(dist, key)
        if gate is not None and not gate.offer(cast(float, confidence.item())):
            break
        if st.greedy and st.record:
            out.rows.append(as_f32(dl))
        elif not st.greedy:
            q_rows.append(dist)
        mx.async_eval(tok, *out.rows[-1:])
        toks.append(tok)
        if gate is not None and not gate.more():
            break
    st.stats.draft_passes += out.by_model
    if gate is not None:
        out.confidences = gate.confidences
        out.plan = replace(out.plan, k=p + len(toks))
    if not toks:  # the first token was not worth verifying: a plain target step
        return pushed
    if constraint is not None:  # past the last draft token too
        pushed += constraint.push([cast(int, toks[-1].item())])
    if st.policy is not None:
        mx.eval(toks[-1])  # the verify needs them anyway: time the draft alone
    model = mx.stack(toks)
    out.tokens = mx.concatenate([out.tokens, model]) if p else model
    if not st.greedy:
        q = mx.stack(q_rows)
        out.q_lp = mx.concatenate([out.q_lp, q]) if out.q_lp is not None else q
    return pushed


def pick(dist: mx.array, key: mx.array | None) -> tuple[mx.array, mx.array]:
    """A draft token (greedy, ``key`` None: the argmax; else a sample) and the draft's
    confidence there: the distribution's largest probability, whichever token is drawn. A
    gate deciding on the drawn token's own probability would verify a biased sample."""
    tok = mx.argmax(dist, axis=-1) if key is None else mx.random.categorical(dist, key=key)
    return tok, confidence_of(dist)


def _gate(st: RequestState, out: Drafted) -> GatedRound | None:
    """The round's confidence gate (`daemon.core.confidence`): a model round the policy
    planned gated (not a probe: that one measures a verified token's cost and acceptance,
    which the gate's own decisions rest on), unconstrained (a grammar's masks are laid out
    for the planned tokens)."""
    if st.policy is None or not out.plan.gated or st.constraint is not None:
        return None
    return st.policy.gated_round(out.k)


def verify(st: RequestState, d: Drafted, overlap: Callable[[], None]) -> Verified:
    """One target pass over the unread tokens and the draft, and how many drafts it accepts.
    ``overlap`` runs on the host while the device computes (the last rejection's record)."""
    k, params = d.k, st.params
    t0 = time.perf_counter()
    t_in = mx.array(st.target_in, dtype=mx.uint32)
    if k:
        t_in = mx.concatenate([t_in, d.tokens])
    hidden: mx.array | None = None
    if st.features is not None:  # the features come with the logits, at no extra cost
        hidden = st.features.target_features(t_in[None], st.target_cache)[0]
        t_logits = output_head(st.target)(st.features.final(hidden))[-(k + 1) :, :]
        hidden = hidden[-(k + 1) :]
    else:
        t_logits = st.target(t_in[None], cache=st.target_cache)[0, -(k + 1) :, :]
    tl = st.process(t_logits[:, : st.vocab], d.tokens if k else None)
    if st.constraint is not None:
        tl = mx.where(mx.array(np.stack(d.masks)), tl, -mx.inf)
    st.stats.target_passes += 1
    to_eval: list[mx.array] = []
    kept: mx.array | None = None
    if k:
        to_eval.append(d.tokens)
        if st.record and d.model_round:  # only model rounds record rejections
            kept = as_f32(t_logits)
            to_eval.append(kept)
    lp_rows = None
    if params.logprobs is not None:  # temperature 1, after the processors and the mask
        lp_rows = log_softmax(as_f32(tl))
        to_eval.append(lp_rows)
    accept = qx = None
    if st.greedy or d.keys is None:
        choice = mx.argmax(tl, axis=-1)
    else:
        lp = process_logits(tl, params.temperature, params.top_k, params.top_p, params.min_p)
        if d.q_lp is not None:  # k > 0
            # the round's last two keys: a gated round drafted with those before them
            accept, qx, choice = verify_sampled(lp, d.q_lp, d.tokens, d.keys[-2], d.keys[-1])
            to_eval += [accept, qx]
        else:
            choice = mx.random.categorical(lp, key=d.keys[-1])
    to_eval.append(choice)
    mx.async_eval(to_eval)
    overlap()
    mx.eval(to_eval)
    choice_l = cast(list[int], choice.tolist())
    drafted = cast(list[int], d.tokens.tolist()) if k else []
    n = 0
    if accept is None:
        while n < k and drafted[n] == choice_l[n]:
            n += 1
    else:
        acc = cast(list[bool], accept.tolist())
        while n < k and acc[n]:
            n += 1
    seconds = time.perf_counter() - t0
    v = Verified(drafted, choice_l, n, seconds, qx, kept, hidden)
    if lp_rows is not None:
        v.logprobs = token_logprobs(lp_rows, v.emitted, params.logprobs)
    return v


def record(st: RequestState, d: Drafted, v: Verified) -> None:
    """Statistics of a round that drafted, and the first rejected token of a model round."""
    if st.policy is not None:
        # a per-token figure only when the draft read nothing else first
        timed = d.seconds if st.drafter.caught_up and not d.plan.then else None
        st.policy.observe(d.plan, v.accepted, v.seconds, timed, d.by_model)
        if d.confidences:
            st.policy.calibration.observe(d.confidences, d.k, v.accepted)
    k, n = d.k, v.accepted
    if not k:
        return
    stats = st.stats
    stats.num_drafts += 1
    stats.drafted += k
    stats.accepted += n
    p = d.first_model
    if d.plan.then:  # a continued proposal: its tokens, then the model's, as two sources
        stats.count_source(d.plan.source, p, min(n, p))
        stats.count_source(CONTINUED, k - p, max(n - p, 0))
    else:
        stats.count_source(d.plan.source, k, n)
    while len(stats.drafted_per_position) < k:
        stats.drafted_per_position.append(0)
        stats.accepted_per_position.append(0)
    for i in range(k):
        stats.drafted_per_position[i] += 1
    for i in range(n):
        stats.accepted_per_position[i] += 1
    if st.record and d.model_round and p <= n < k:  # what the draft model got wrong
        pos = len(st.tokens) + n
        rej = Rejection(
            position=pos,
            context_length=len(st.prompt) + pos,
            draft_token=v.drafted[n],
            draft_prob=0.0 if st.greedy or v.qx is None else cast(float, v.qx[n].item()),
            target_token=v.choice[n],
        )
        st.rejections.append(rej)
        # completed on the host (numpy, already-evaluated logits) while the device runs the
        # next round, or at the end
        assert v.logits is not None
        st.pending.append((rej, v.logits, n, d.rows[n - p] if st.greedy else None))


def _logsumexp(row: np.ndarray) -> float:
    m = float(row.max())
    if not math.isfinite(m):  # a row masked everywhere (a grammar outside a pruned head)
        return m
    return m + math.log(float(np.exp(row - m).sum(dtype=np.float64)))


def complete_rejections(pending: list[Pending], n_top: int) -> None:
    """Fill in the rejection records of finished rounds on the host (numpy, from logits
    already evaluated): the target's top log-probabilities and the draft's probability."""
    for rej, t_rows, row, d_row in pending:
        if n_top:
            r = np.asarray(t_rows)[row]
            ids = top_ids(r, n_top)
            rej.top_ids = ids.tolist()
            rej.top_logprobs = (r[ids].astype(np.float64) - _logsumexp(r)).tolist()
        if d_row is not None:
            d = np.asarray(d_row)
            total = _logsumexp(d)
            rej.draft_prob = float(np.exp(d[rej.draft_token] - total)) if total > -math.inf else 0.0
    pending.clear()


def rewind(st: RequestState, d: Drafted, v: Verified) -> None:
    """Both caches back to the accepted prefix; the drafter and the lookup index read what
    was verified; the adaptive draft length moves after a full-length model round."""
    k, n, emitted = d.k, v.accepted, v.emitted
    if k - n:
        trim_prompt_cache(st.target_cache, k - n)
    # the rows that precede each emitted token: a feature drafter's next input
    feats = v.hidden[: n + 1] if v.hidden is not None else None
    if d.by_model:  # it read what it drafted, verified or not
        st.drafter.settle(d.first_model + d.by_model, n, v.drafted, emitted, feats)
    else:  # the draft did not run: it reads these tokens when it next drafts
        st.drafter.observe(emitted, feats)
    st.target_in = [emitted[-1]]
    st.seq += emitted
    for source in st.proposers:
        source.extend(emitted)
    cfg = st.cfg
    if cfg.adaptive and d.plan.source == "model" and st.policy is None and k == st.k_cur:
        if n == k:
            st.k_cur = min(st.k_cur + 2, cfg.max_draft_tokens)
        else:
            st.k_cur = max(st.k_cur - 1, cfg.min_draft_tokens)
    st.rounds += 1
    if st.rounds % 128 == 0:
        mx.clear_cache()


def run_round(st: RequestState, remaining: int, overlap: Callable[[], None]) -> Verified:
    """One round, every step; its verdict (``emitted``: accepted drafts and one target
    token, with their ``logprobs`` when the request asks)."""
    d = draft(st, choose(st, remaining))
    v = verify(st, d, overlap)
    record(st, d, v)
    rewind(st, d, v)
    return v


__all__: Sequence[str] = [
    "Drafted",
    "RequestState",
    "Verified",
    "choose",
    "draft",
    "record",
    "rewind",
    "run_round",
    "verify",
]
