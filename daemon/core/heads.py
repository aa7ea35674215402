"""A draft's output head cut to a subset of the vocabulary (FR-Spec).

A small draft spends a large share of each step in its vocabulary-sized output head (on the
embedded pair 0.1 of a target step out of the draft's 0.23). Most output uses few tokens, so
the draft's head is restricted to ``N`` of them: `prune_head` gives the draft a `PrunedHead`
that computes logits for the subset only and returns full-vocabulary logits with ``-inf``
elsewhere. The engine needs no change and stays lossless: the target still verifies over the
full vocabulary, a greedy draft simply never proposes a token outside the subset, and a
sampled draft's ``q`` is 0 there, which rejection sampling handles exactly.

The subset belongs to an adapter version (`daemon.store.adapters` keeps it in the adapter's
config, training takes the draft's loss over it); before any adapter the draft uses
`default_head_tokens`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from daemon.errors import ModelLoadError

__all__ = [
    "PLAIN_HEAD_MODULES",
    "PrunedHead",
    "default_head_tokens",
    "frequent_tokens",
    "last_logits",
    "output_head",
    "prune_head",
    "pruned_head",
]

# Architectures whose ``Model.__call__`` is exactly ``head(self.model(inputs))`` with the head
# ``lm_head`` or the tied ``embed_tokens.as_linear``: their head can be replaced or computed
# on chosen positions only.
PLAIN_HEAD_MODULES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")


class PrunedHead:
    """Logits for ``ids`` only, from the matching rows of the model's output head.

    Not an ``nn.Module`` and stored under an underscore name, so its arrays are no parameters:
    nothing of it is trained, saved in an adapter or counted.
    """

    def __init__(self, weight: mx.array, ids: mx.array, vocab: int) -> None:
        self.weight = weight  # (N, hidden), the head rows of ``ids``
        self.ids = ids  # (N,) uint32, ascending
        self.vocab = vocab  # the model's full output width
        # full vocabulary id -> position in the subset, -1 outside it (training maps labels)
        index = mx.full((vocab,), -1, dtype=mx.int32)
        index[ids] = mx.arange(ids.size, dtype=mx.int32)
        self.index = index

    @property
    def size(self) -> int:
        return int(self.ids.size)

    def token_ids(self) -> list[int]:
        return cast(list[int], self.ids.tolist())

    def subset_logits(self, hidden: mx.array) -> mx.array:
        """``(..., N)`` logits over the subset (training uses these directly)."""
        return hidden @ self.weight.T

    def __call__(self, hidden: mx.array) -> mx.array:
        sub = self.subset_logits(hidden)
        full = mx.full((*sub.shape[:-1], self.vocab), -mx.inf, dtype=sub.dtype)
        full[..., self.ids] = sub
        return full


def _check_plain(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if type(model).__module__ not in PLAIN_HEAD_MODULES or inner is None:
        raise ModelLoadError(
            f"cannot prune the output head of a {type(model).__module__} model; "
            f"supported: {', '.join(m.rsplit('.', 1)[1] for m in PLAIN_HEAD_MODULES)} "
            "(set models.draft_head_tokens: 0)"
        )
    return inner


def output_head(model: nn.Module) -> Any:
    """The function from final hidden states to logits of a `PLAIN_HEAD_MODULES` model: its
    pruned head, ``lm_head`` or the tied embeddings."""
    head = pruned_head(model)
    if head is not None:
        return head
    inner = _check_plain(model)
    if getattr(model.args, "tie_word_embeddings", False):
        return inner.embed_tokens.as_linear
    return model.lm_head


def last_logits(model: nn.Module, tokens: mx.array, cache: Any) -> mx.array:
    """Logits of the last of ``tokens`` (``(1, n)``), advancing ``cache`` over all of them.

    ``model(tokens)[0, -1]`` would compute the head on every row and keep one; for
    `PLAIN_HEAD_MODULES` the head runs on the last hidden state only (a draft catching up on
    tokens it did not draft reads several at once)."""
    inner = getattr(model, "model", None)
    if tokens.shape[-1] > 1 and inner is not None and type(model).__module__ in PLAIN_HEAD_MODULES:
        hidden = inner(tokens, cache=cache)[:, -1:]
        return cast(mx.array, output_head(model)(hidden)[0, -1])
    return cast(mx.array, model(tokens, cache=cache)[0, -1])


def pruned_head(model: nn.Module) -> PrunedHead | None:
    """``model``'s `PrunedHead`, or None when its head is the full one."""
    return cast(PrunedHead | None, getattr(model, "_pruned_head", None))


def _head_rows(model: nn.Module, ids: mx.array) -> mx.array:
    inner = _check_plain(model)
    if getattr(model.args, "tie_word_embeddings", False):
        return cast(mx.array, inner.embed_tokens(ids))  # embedding rows, dequantized if needed
    head = model.lm_head
    if "bias" in head:
        raise ModelLoadError("cannot prune an output head with a bias")
    if isinstance(head, nn.QuantizedLinear):
        biases = head.get("biases")
        return mx.dequantize(
            head.weight[ids],
            head.scales[ids],
            None if biases is None else biases[ids],
            group_size=head.group_size,
            bits=head.bits,
            mode=head.mode,
        )
    return cast(mx.array, head.weight[ids])


_PRUNED_CLASSES: dict[type, type] = {}


def _pruned_class(cls: type) -> type:
    """``cls`` with ``__call__`` = the pruned head over ``self.model`` (a special method is
    looked up on the type, so the instance's class is swapped, not the attribute)."""
    if getattr(cls, "_specd_pruned", False):
        return cls
    if cls not in _PRUNED_CLASSES:

        def __call__(self: Any, inputs: mx.array, cache: Any = None, **kwargs: Any) -> mx.array:
            return cast(mx.array, self._pruned_head(self.model(inputs, cache=cache, **kwargs)))

        _PRUNED_CLASSES[cls] = type(
            cls.__name__,
            (cls,),
            {"__call__": __call__, "_specd_pruned": True, "__module__": cls.__module__},
        )
    return _PRUNED_CLASSES[cls]


def prune_head(model: nn.Module, token_ids: Sequence[int], vocab: int | None = None) -> None:
    """Give ``model`` (a draft) a head over ``token_ids`` only; ``vocab`` is its output width
    (the logits stay that wide). Replaces an earlier pruned head."""
    # a feature draft reads the target's head: its rows come from there
    source = cast(nn.Module, getattr(model, "head_source", model))
    _check_plain(source)
    ids = sorted({int(t) for t in token_ids})
    if not ids:
        raise ModelLoadError("a pruned draft head needs at least one token")
    width = vocab if vocab is not None else int(source.args.vocab_size)
    if ids[0] < 0 or ids[-1] >= width:
        raise ModelLoadError(f"pruned head token ids must be in [0, {width})")
    arr = mx.array(ids, dtype=mx.uint32)
    object.__setattr__(model, "_pruned_head", None)  # the old head's rows are not needed
    weight = _head_rows(source, arr)
    mx.eval(weight)
    head = PrunedHead(weight, arr, width)
    mx.eval(head.index)
    # not nn.Module.__setattr__: arrays set there would become parameters
    object.__setattr__(model, "_pruned_head", head)
    model.__class__ = _pruned_class(type(model))


def default_head_tokens(n: int, vocab: int, special: Iterable[int] = ()) -> list[int]:
    """The subset before any traffic: the special tokens (EOS must be proposable) and the
    lowest ids, which byte-level BPE assigns to its earliest, most frequent merges."""
    keep = {int(t) for t in special if 0 <= int(t) < vocab}
    t = 0
    while len(keep) < n and t < vocab:
        keep.add(t)
        t += 1
    return sorted(keep)


def frequent_tokens(
    outputs: Iterable[Sequence[int]], n: int, vocab: int, special: Iterable[int] = ()
) -> list[int]:
    """The ``n`` tokens most frequent in ``outputs`` (the target's recorded answers), the
    special tokens always included and the rest filled from `default_head_tokens`."""
    counts: Counter[int] = Counter()
    for out in outputs:
        counts.update(t for t in out if 0 <= t < vocab)
    keep = {int(t) for t in special if 0 <= int(t) < vocab}
    for t, _ in counts.most_common():
        if len(keep) >= n:
            break
        keep.add(t)
    for t in default_head_tokens(n, vocab):
        if len(keep) >= n:
            break
        keep.add(t)
    return sorted(keep)
