"""The draft models behind one interface: what the engine asks of a drafter in a round.

A round of `daemon.core.engine` drafts ``k`` tokens one at a time (`Drafter.first` gives the
logits of the first, `Drafter.next` those after a drafted token), the target verifies them, and
the drafter is told what happened (`Drafter.settle`: the round's draft was its own) or what it
missed (`Drafter.observe`: a proposal round or a plain target step). Sampling, grammar masks,
acceptance and statistics stay in the engine, the same for every drafter.

- `ModelDrafter`: a draft model with its own KV cache over the token sequence (the layer-skip
  draft and a separate draft model). Tokens it did not draft itself it reads at its next round.
- `FeatureDrafter`: the `FeatureDraft`, fed the target's hidden states, which the verification
  pass (and the prefill) return with their logits (``needs_features``).

Both keep their caches equal to a prefix of the verified sequence between rounds: drafted
entries beyond what the target accepted are trimmed in `settle`.

A drafter that ``continues`` can draft after a copied proposal in the same round (`read`
the proposal's tokens, then `first`): a model over tokens reads them like any others. A
feature draft cannot: it has no target features for tokens the target has not verified, and
reading them from its own features would cost a pass per token and drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import trim_prompt_cache

from daemon.core.feature_draft import FeatureDraft, is_feature_draft
from daemon.core.heads import last_logits

__all__ = ["Drafter", "FeatureDrafter", "ModelDrafter", "make_drafter"]


class Drafter(Protocol):
    needs_features: bool  # observe/settle want the target's hidden states of the tokens
    caught_up: bool  # the last `first` read only the last token or two (a per-token timing)
    continues: bool  # can draft after a proposal's unverified tokens (`read`)

    @property
    def ready(self) -> bool:
        """Whether a model round can start now (a feature draft needs a feature first)."""
        ...

    def first(self) -> mx.array:
        """Logits (1-D) of the first draft token of a round."""
        ...

    def next(self, token: mx.array) -> mx.array:
        """Logits of the draft token after ``token`` (the one just drafted)."""
        ...

    def read(self, tokens: Sequence[int]) -> None:
        """A proposal's tokens, to draft after at the next `first` (``continues`` only);
        `settle` then counts them among the round's drafted tokens."""
        ...

    def settle(
        self, k: int, n: int, drafted: Sequence[int], emitted: Sequence[int], features: Any
    ) -> None:
        """After a model round: ``n`` of the ``k`` drafted tokens were accepted and
        ``emitted`` follow; ``features``: the target's hidden rows of ``emitted``'s
        predecessors (``needs_features`` only)."""
        ...

    def observe(self, emitted: Sequence[int], features: Any) -> None:
        """Tokens verified in a round this drafter did not draft (or the prompt)."""
        ...


class ModelDrafter:
    """A draft model over tokens (layer-skip or separate model)."""

    needs_features = False
    continues = True

    def __init__(
        self, model: nn.Module, cache: list[Any], pending: Sequence[int], prefill: Any
    ) -> None:
        self.model = model
        self._cache = cache
        self.pending = list(pending)  # verified tokens the draft has not read yet
        self._prefill = prefill  # (model, cache, tokens) -> None, in chunks
        self.caught_up = True

    @property
    def ready(self) -> bool:
        return bool(self.pending)

    def first(self) -> mx.array:
        pending = self.pending
        self.caught_up = len(pending) <= 2
        if not self.caught_up:  # in chunks, its cache only: no output head computed
            self._prefill(self.model, self._cache, mx.array(pending[:-1]))
            pending = pending[-1:]
        return last_logits(self.model, mx.array(pending, dtype=mx.uint32)[None], self._cache)

    def next(self, token: mx.array) -> mx.array:
        return last_logits(self.model, token.reshape(1, 1), self._cache)

    def read(self, tokens: Sequence[int]) -> None:
        self.pending = self.pending + list(tokens)

    def settle(
        self, k: int, n: int, drafted: Sequence[int], emitted: Sequence[int], features: Any
    ) -> None:
        if n < k:
            if k - n - 1:  # d_{n+1} .. d_{k-1} were read; d_k never was
                trim_prompt_cache(self._cache, k - n - 1)
            self.pending = [emitted[-1]]
        else:
            self.pending = [drafted[-1], emitted[-1]]

    def observe(self, emitted: Sequence[int], features: Any) -> None:
        self.pending = self.pending + list(emitted)


class FeatureDrafter:
    """The `FeatureDraft` over the target's hidden states; its cache holds one entry per
    verified position from where it started (a request whose prefix came from the prompt
    cache starts there: attention is relative, the draft just sees less context)."""

    needs_features = True
    continues = False

    def __init__(self, model: FeatureDraft, cache: list[Any], chunk: int = 512) -> None:
        self.model = model
        self._cache = cache
        self.chunk = chunk
        self._features: list[mx.array] = []  # (m, H) rows not read yet
        self._tokens: list[int] = []  # the token after each of those rows
        self._hidden: mx.array | None = None  # the last output feature, (1, 1, H)
        self._drafted = 0  # entries read from its own features this round (trimmed after)
        self.caught_up = True

    @property
    def ready(self) -> bool:
        return bool(self._tokens)

    def _step(self, features: mx.array, tokens: mx.array) -> mx.array:
        out = self.model.forward(features, tokens, self._cache)[:, -1:]
        self._hidden = out
        return self.model.head(out)[0, -1]

    def first(self) -> mx.array:
        parts = self._features
        feats = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)
        toks = mx.array(self._tokens, dtype=mx.uint32)
        self._features, self._tokens = [], []
        self.caught_up = toks.size <= 2
        read, step = 0, self.chunk
        while toks.size - read > step:  # a long prompt in chunks, the cache only
            self.model.forward(
                feats[None, read : read + step], toks[None, read : read + step], self._cache
            )
            mx.eval([c.state for c in self._cache])
            read += step
        return self._step(feats[None, read:], toks[None, read:])

    def read(self, tokens: Sequence[int]) -> None:
        raise NotImplementedError("a feature draft does not continue proposals")

    def next(self, token: mx.array) -> mx.array:
        assert self._hidden is not None
        self._drafted += 1
        return self._step(self._hidden, token.reshape(1, 1))

    def settle(
        self, k: int, n: int, drafted: Sequence[int], emitted: Sequence[int], features: Any
    ) -> None:
        # the entries read from its own features stand for tokens the target has not
        # confirmed with its features: all go, the verified ones come back with the target's
        if self._drafted:
            trim_prompt_cache(self._cache, self._drafted)
            self._drafted = 0
        self.observe(emitted, features)

    def observe(self, emitted: Sequence[int], features: Any) -> None:
        if features is None or not len(emitted):
            return
        self._features.append(features)
        self._tokens += list(emitted)


def make_drafter(
    model: nn.Module, cache: list[Any], pending: Sequence[int], prefill: Any, chunk: int = 512
) -> ModelDrafter | FeatureDrafter:
    """The drafter for ``model`` with its cache; ``pending``: tokens a model draft has not
    read (a feature draft reads only what it is shown with features)."""
    if is_feature_draft(model):
        assert isinstance(model, FeatureDraft)
        return FeatureDrafter(model, cache, chunk)
    return ModelDrafter(model, cache, pending, prefill)
