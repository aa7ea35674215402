"""Cost-aware speculation: each round's drafting source and length, chosen by measurement.

Drafting pays only when the tokens it gains outweigh what it costs, and on a CPU both sides
cost: a layer-skip draft token is ~0.23 of a target step here, and verifying ``k + 1`` rows in
one target pass costs clearly more than one row, unlike on a memory-bound GPU. So the engine
measures as it runs and, per round, maximises the expected tokens per second

    E(k) / (verify(k + 1) + draft(k)),    E(k) = 1 + sum_{i<=k} a_1 a_2 ... a_i

over the model draft (k = 0 .. max), the proposal at hand (its first k tokens; no draft cost),
the whole proposal continued by ``m`` model-draft tokens when the drafter can (its ``E`` adds
the model's expected tokens times the chance the whole proposal is accepted; its cost adds the
draft's ``m`` tokens and one pass to read the proposal) and plain target decoding (k = 0,
E = 1). ``a_i`` is the acceptance of position ``i`` given the ones before were accepted,
per source (for a proposal's first token, per matched n-gram length too, the frequency-based
confidence: 1, 2, 3-4, 5-8, 9-16, longer), as an exponential moving average with a neutral
prior; ``verify(rows)`` and the model's per-token cost are moving averages of measured times (a row
count's figure rescaled by how the one-row time has moved since it was measured, so a spell of
CPU contention, such as a training run, does not leave stale costs behind). When
the model draft is not worth running it is still tried with one token every
``PROBE_EVERY`` rounds, or more rarely where a probe costs more (``PROBE_SHARE``), so a draft
that improves is noticed; a new draft (adapter swap) resets its estimates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from daemon.core.confidence import Calibration, GatedRound, gated_rate
from daemon.core.drafting import Proposal

EMA = 0.1  # weight of a new observation
PRIOR_ACCEPT = 0.5
# A copied continuation that starts right tends to stay right (it is a repeat), so a
# proposal's later positions start optimistic; otherwise long proposals would never be tried
# and their estimates never leave the prior.
PRIOR_CONTINUE = 0.8
PROBE_EVERY = 16
# ... and no more often than keeps what probes cost beyond plain decoding under this share of
# the time: where verifying two rows costs twice one (quantized targets on a GPU) a probe
# every 16 rounds alone would cost ~7% of the speed
PROBE_SHARE = 0.02
MAX_POSITIONS = 32
MIN_EVIDENCE = 8  # rounds before an estimate is reported as evidence about the draft
# The model draft's tokens after a whole accepted proposal, tracked apart from its own
# rounds: after copied text it drafts from another kind of context.
CONTINUED = "continued"


def evidence_key(source: str, match: int) -> str:
    """Acceptance is tracked per source and, for proposals, per matched n-gram length: a
    long match predicts its continuation far better than a one-token match."""
    if match <= 0:
        return source
    bucket = next(b for b in (1, 2, 4, 8, 16, 1 << 30) if match <= b)
    return f"{source}/{bucket}"


@dataclass
class Choice:
    """One round's plan: ``source`` is "model", "lookup", "suffix" or "none" (k = 0); a
    proposal's source with ``then`` > 0 is that proposal continued by the model draft."""

    source: str
    k: int  # tokens drafted in all (a continued proposal's and the model's)
    tokens: list[int] = field(default_factory=list)  # the proposal's tokens, for proposals
    match: int = 0  # the proposal's matched n-gram length
    then: int = 0  # model-draft tokens after the proposal's (a continued proposal)
    gated: bool = False  # a model round its draft's confidence cuts short (confident policy)


@dataclass
class SourceStats:
    """Conditional acceptance per draft position, as moving averages."""

    accept: list[float] = field(default_factory=lambda: [PRIOR_ACCEPT] * MAX_POSITIONS)
    rounds: int = 0  # rounds observed: below MIN_EVIDENCE the figures are mostly the prior

    def expected(self, k: int, first: float | None = None) -> float:
        """Expected tokens emitted by a round that drafts ``k`` (the target's own included);
        ``first`` replaces the first position's acceptance."""
        total, p = 1.0, 1.0
        for i in range(k):
            p *= self._at(i, first)
            total += p
        return total

    def reach(self, k: int, first: float | None = None) -> float:
        """The chance that all of ``k`` drafted tokens are accepted."""
        p = 1.0
        for i in range(k):
            p *= self._at(i, first)
        return p

    def _at(self, i: int, first: float | None) -> float:
        return first if i == 0 and first is not None else self.accept[min(i, MAX_POSITIONS - 1)]

    def observe(self, k: int, accepted: int) -> None:
        self.rounds += 1
        for i in range(min(k, accepted + 1, MAX_POSITIONS)):
            hit = 1.0 if i < accepted else 0.0
            self.accept[i] += EMA * (hit - self.accept[i])


@dataclass
class Measured:
    """What the policy has measured so far: the costs and acceptances every round's choice
    rests on (``/status`` shows it under ``speculation``; `bench speed` keeps it per row).

    ``verify_s``: seconds of a target pass per row count actually measured (rescaled as the
    policy uses them); ``draft_token_s``: one model-draft token; ``acceptance``: per source
    (and matched n-gram bucket, ``lookup/4``...), the conditional acceptance of each draft
    position up to the deepest one observed, and the rounds behind it; ``confidence``:
    with confidence-gated model rounds, the acceptance and share of draft tokens per
    confidence bucket (`daemon.core.confidence`)."""

    verify_s: dict[int, float]
    draft_token_s: float | None
    acceptance: dict[str, list[float]]
    rounds: dict[str, int]
    confidence: Calibration | None = None

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "verify_s": {str(r): round(v, 6) for r, v in sorted(self.verify_s.items())},
            "draft_token_s": None if self.draft_token_s is None else round(self.draft_token_s, 6),
            "acceptance": {s: [round(a, 4) for a in v] for s, v in self.acceptance.items()},
            "rounds": dict(self.rounds),
        }
        if self.confidence is not None:
            out["confidence"] = self.confidence.to_dict()
        return out


class SpeculationPolicy:
    """Chooses rounds for one engine; lives across requests (measurements carry over)."""

    def __init__(
        self, max_model_tokens: int, max_proposal_tokens: int, confident: bool = False
    ) -> None:
        self.max_model_tokens = max_model_tokens
        self.max_proposal_tokens = max_proposal_tokens
        # model rounds gated by the draft's confidence (`daemon.core.confidence`)
        self.confident = confident
        self.calibration = Calibration()
        self.sources: dict[str, SourceStats] = {}
        self.verify_s: dict[int, float] = {}  # rows -> seconds of one target pass
        # rows -> the one-row time when verify_s[rows] was last measured: a row count seen
        # rarely keeps an old figure, taken maybe while a training run shared the CPU; it is
        # rescaled by how much the (often measured) one-row time has moved since
        self._one_row_at: dict[int, float] = {}
        self.draft_token_s: float | None = None
        self._since_model = 0
        self._since_model_s = 0.0  # seconds of rounds since the model last drafted
        self._draft_serial: int | None = None

    # --- estimates -------------------------------------------------------------------------

    def stats(self, source: str) -> SourceStats:
        found = self.sources.get(source)
        if found is None:
            found = self.sources[source] = SourceStats()
            if not source.startswith(("model", "none", CONTINUED)):
                found.accept[1:] = [PRIOR_CONTINUE] * (MAX_POSITIONS - 1)
        return found

    def verify_cost(self, rows: int) -> float:
        """Seconds of a ``rows``-row target pass: measured, else interpolated, else a prior
        (one row measured, or the cheapest pass measured, or 1.0; +25% per extra row)."""
        one = self.verify_s.get(1)
        known = {
            r: v * (one / self._one_row_at[r] if one and self._one_row_at.get(r) else 1.0)
            for r, v in self.verify_s.items()
        }
        if rows in known:
            return known[rows]
        below = [r for r in known if r < rows]
        above = [r for r in known if r > rows]
        if below and above:
            lo, hi = max(below), min(above)
            w = (rows - lo) / (hi - lo)
            return known[lo] + w * (known[hi] - known[lo])
        # before a one-row pass is timed, it costs no more than the cheapest pass that was:
        # a prior of 1 s beside passes timed in milliseconds would make every round look
        # cheaper than plain decoding, which then is never chosen and never timed
        base = known.get(1, min(known.values(), default=1.0))
        if below:
            lo = max(below)
            per_row = (known[lo] - base) / (lo - 1) if lo > 1 else 0.25 * base
            return known[lo] + max(per_row, 0.05 * base) * (rows - lo)
        return base * (1 + 0.25 * (rows - 1))

    def draft_cost(self, k: int) -> float:
        per = self.draft_token_s if self.draft_token_s is not None else 0.25 * self.verify_cost(1)
        return per * k

    def measured(self, positions: int = 8) -> Measured:
        """A copy of the measurements (the first ``positions`` draft positions of each
        source observed at least once)."""
        # dict() copies in one step under the GIL: another thread (/status) may call this
        # while the worker thread adds a source or a row count
        observed = {s: st for s, st in sorted(dict(self.sources).items()) if st.rounds}
        return Measured(
            verify_s={r: self.verify_cost(r) for r in sorted(dict(self.verify_s))},
            draft_token_s=self.draft_token_s,
            acceptance={s: list(st.accept[:positions]) for s, st in observed.items()},
            rounds={s: st.rounds for s, st in observed.items()},
            confidence=self.calibration.copy() if self.confident else None,
        )

    def draft_acceptance(self) -> float | None:
        """The model draft's estimated first-position acceptance, once measured enough."""
        model = self.sources.get("model")
        return model.accept[0] if model is not None and model.rounds >= MIN_EVIDENCE else None

    def rate(self, source: str, k: int, match: int = 0) -> float:
        cost = self.verify_cost(k + 1) + (self.draft_cost(k) if source == "model" else 0.0)
        return self.stats(source).expected(k, self._first(source, match)) / cost

    def _first(self, source: str, match: int) -> float | None:
        # Whether a proposal starts right depends on its match length; once it does, how far
        # it stays right is much the same for all of them: the source's later positions.
        return self.stats(evidence_key(source, match)).accept[0] if match else None

    def rate_continued(self, source: str, k: int, match: int, then: int) -> float:
        """A ``k``-token proposal continued by ``then`` model tokens; reading the proposal
        costs the draft about one more pass."""
        cost = self.verify_cost(k + then + 1) + self.draft_cost(then + 1)
        first = self._first(source, match)
        copied = self.stats(source)
        model = self.stats(CONTINUED)
        if model.rounds < MIN_EVIDENCE:  # until measured after copies, as in its own rounds
            model = self.stats("model")
        gained = copied.reach(k, first) * (model.expected(then) - 1.0)
        return (copied.expected(k, first) + gained) / cost

    # --- choosing ----------------------------------------------------------------------------

    def new_request(self, draft_serial: int) -> None:
        """Called at each request; a different draft (adapter swap, `draft_serial`) starts
        from the prior."""
        if draft_serial != self._draft_serial:
            self._draft_serial = draft_serial
            self.sources.pop("model", None)
            self.sources.pop(CONTINUED, None)
            self.draft_token_s = None
            self.calibration = Calibration()

    def gated_round(self, limit: int) -> GatedRound:
        """A model round's keep-or-stop decisions, at most ``limit`` tokens verified."""
        return GatedRound(self.calibration, self.verify_cost, self.draft_cost, limit)

    def choose(self, proposal: Proposal | None, remaining: int, continues: bool = False) -> Choice:
        """The round with the best expected tokens per second; ``remaining`` bounds k;
        ``continues``: the drafter may continue a proposal that runs out."""
        limit = max(remaining - 1, 0)
        best = Choice("none", 0)
        best_rate = self.rate("none", 0)
        top = min(self.max_model_tokens, limit)
        for k in range(1, top + 1):
            r = self.rate("model", k)
            if r > best_rate:
                best, best_rate = Choice("model", k), r
        if self.confident and top:
            # its confidence stops the round where more would not pay: plan the most
            r = max(best_rate, gated_rate(self.calibration, self.verify_cost, self.draft_cost))
            if best.source == "model" or r > best_rate:
                best, best_rate = Choice("model", top, gated=True), r
        if proposal is not None:
            p = proposal
            for k in range(1, min(len(p.tokens), self.max_proposal_tokens, limit) + 1):
                r = self.rate(p.source, k, p.match)
                if r > best_rate:
                    best, best_rate = Choice(p.source, k, p.tokens[:k], p.match), r
            whole = len(p.tokens)
            if continues and whole < min(self.max_proposal_tokens, limit):  # it ran out
                for m in range(1, min(self.max_model_tokens, limit - whole) + 1):
                    r = self.rate_continued(p.source, whole, p.match, m)
                    if r > best_rate:
                        best = Choice(p.source, whole + m, list(p.tokens), p.match, then=m)
                        best_rate = r
        if best.source == "model":
            self._since_model, self._since_model_s = 0, 0.0
        else:
            self._since_model += 1
            probe = self.max_model_tokens > 0 and limit >= 1 and best.source == "none"
            if probe and self._probe_due():
                self._since_model, self._since_model_s = 0, 0.0
                return Choice("model", 1)  # keep measuring the draft
        return best

    def _probe_due(self) -> bool:
        """A probe (one model token) when ``PROBE_EVERY`` rounds have passed without one and
        what it costs beyond a plain step is under ``PROBE_SHARE`` of the time since."""
        extra = self.verify_cost(2) + self.draft_cost(1) - self.verify_cost(1)
        return self._since_model >= PROBE_EVERY and self._since_model_s * PROBE_SHARE >= extra

    # --- measuring ---------------------------------------------------------------------------

    def observe(
        self,
        choice: Choice,
        accepted: int,
        verify_s: float,
        draft_s: float | None,
        drafted: int | None = None,
    ) -> None:
        """Record a round: acceptance of its source, the pass's time, the draft's time per
        token (None when it includes catching up on earlier tokens, which is no per-token
        figure) over the ``drafted`` model tokens (default: the choice's; a gated round
        may draft one more than it verifies)."""
        rows = choice.k + 1
        self._since_model_s += verify_s + (draft_s or 0.0)
        prev = self.verify_s.get(rows)
        self.verify_s[rows] = verify_s if prev is None else prev + EMA * (verify_s - prev)
        if rows > 1 and 1 in self.verify_s:
            self._one_row_at[rows] = self.verify_s[1]
        copied = choice.k - choice.then  # a continued proposal's own tokens
        if copied:
            got = min(accepted, copied)
            self.stats(choice.source).observe(copied, got)
            if choice.match:
                self.stats(evidence_key(choice.source, choice.match)).observe(copied, got)
        if choice.then and accepted >= copied:  # the model's tokens were reached
            self.stats(CONTINUED).observe(choice.then, accepted - copied)
        drafted = choice.k if drafted is None else drafted
        if choice.source == "model" and drafted and draft_s is not None:
            per = draft_s / drafted
            prev_d = self.draft_token_s
            self.draft_token_s = per if prev_d is None else prev_d + EMA * (per - prev_d)
