"""A target split by layers across ranks (pipeline), for any mlx-lm model with a list of
decoder layers.

Rank r holds a contiguous block of layers; rank 0 holds the first block, the embeddings, the
final norm and the output head. A forward runs the ranks in turn: rank 0 embeds and runs its
block, hands the hidden state to rank 1 (``mx.distributed.send``), which runs its block and
hands it on, and the last rank hands it back to rank 0, which applies the norm and the head.
One hand-off per rank per forward, whatever the model's head counts (a tensor split needs
them to divide and makes two all-reduces per layer).

The model's own forward is kept (its masks, embedding scale, per-layer arguments): only the
entries of its ``layers`` list change. A layer another rank holds becomes `Elsewhere` (the
hidden state passes through untouched, its cache only advances); the first layer of
a follower's block receives the hidden state first (`Received`), the last layer of every
block sends it on (`Sent`), and rank 0's entry for the very last layer receives the result
(`Returned`, which depends on what rank 0 sent, so one evaluation runs both). Every rank
keeps a cache of the model's own kind for every layer; those of layers held elsewhere take
keys of width 0, so offsets, masks (sliding windows included) and trims agree on every rank
and follow rank 0's trims as a tensor split's do.

Layer counts: ``models.split_layers`` or, by default, proportional to each rank's free memory
(all-gathered at start; rank 0's share less what its embeddings and head take).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from daemon.errors import DistributedError

__all__ = [
    "Elsewhere",
    "layer_counts",
    "pipeline_split",
    "pipelined",
]


# the caches a stand-in can advance with keys of width 0 (mlx-lm's attention caches)
KV_CACHES = ("KVCache", "RotatingKVCache", "ConcatenateKVCache", "ChunkedKVCache")


def _cache_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # mlx-lm's layers take (x, mask, cache) positionally or cache=...
    return kwargs.get("cache", args[1] if len(args) > 1 else None)


class _Standin(nn.Module):
    """In place of a decoder layer: the model's forward may read the layer's attributes
    (``use_sliding``, ``layer_idx``...), so those not found here are the layer's."""

    def __init__(self, layer: nn.Module, wraps: bool = False) -> None:
        super().__init__()
        if wraps:
            self.layer = layer  # a child: this rank holds it
        object.__setattr__(self, "_like", layer)  # last: attributes set before are not its

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            like = self.__dict__.get("_like")
            if like is None:
                raise
            return getattr(like, name)


class Elsewhere(_Standin):
    """A layer another rank holds: the hidden state passes through. Its cache (of the kind
    the model makes for that layer) takes keys and values of width 0 for the positions, so
    its offset, wrap-around and masks are those of the real one on the rank that holds it,
    at no memory."""

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        cache = _cache_arg(args, kwargs)
        if cache is not None:
            empty = mx.zeros((x.shape[0], 1, x.shape[1], 0), dtype=x.dtype)
            cache.update_and_fetch(empty, empty)
        return x


class _Hop:
    """Where a hand-off goes: the group and the peer."""

    def __init__(self, group: Any, peer: int) -> None:
        self.group = group
        self.peer = peer


class Received(_Standin):
    """A follower's first layer: its input is the hidden state the previous rank sent (the
    embedding computed here is never evaluated)."""

    def __init__(self, layer: nn.Module, group: Any, src: int) -> None:
        super().__init__(layer, wraps=True)
        object.__setattr__(self, "_hop", _Hop(group, src))

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        hop = cast(_Hop, self._hop)
        h = mx.distributed.recv(x.shape, x.dtype, hop.peer, group=hop.group, stream=mx.cpu)
        return cast(mx.array, self.layer(h, *args, **kwargs))


class Sent(_Standin):
    """The last layer of a block: its output goes on to the next rank."""

    def __init__(self, layer: nn.Module, group: Any, dst: int) -> None:
        super().__init__(layer, wraps=True)
        object.__setattr__(self, "_hop", _Hop(group, dst))

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        hop = cast(_Hop, self._hop)
        h = self.layer(x, *args, **kwargs)
        return mx.distributed.send(h, hop.peer, group=hop.group, stream=mx.cpu)


class Returned(Elsewhere):
    """Rank 0's entry for the last layer: the result the last rank sends back, after (and
    depending on) what rank 0 sent, so one evaluation of rank 0's output runs the pipeline."""

    def __init__(self, layer: nn.Module, group: Any, src: int) -> None:
        super().__init__(layer)
        object.__setattr__(self, "_hop", _Hop(group, src))

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        sent = super().__call__(x, *args, **kwargs)
        hop = cast(_Hop, self._hop)
        h = mx.distributed.recv(x.shape, x.dtype, hop.peer, group=hop.group, stream=mx.cpu)
        return mx.depends(h, sent)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's list of decoder layers (``model.model.layers``), or an error naming why
    it cannot be split by layers."""
    why = unsplittable(model)
    if why is not None:
        raise DistributedError(
            f"the target ({type(model).__module__}) {why}: it cannot be split by layers; "
            "use models.split: tensor"
        )
    return cast(list[nn.Module], cast(Any, model).model.layers)


def unsplittable(model: nn.Module) -> str | None:
    """Why ``model`` cannot be split by layers (None: it can): it needs a list of decoder
    layers whose caches take keys and values (a stand-in advances them with empty ones)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, list) or not layers:
        return "has no list of decoder layers (model.layers)"
    kinds = {type(c).__name__ for c in make_prompt_cache(model)}
    others = sorted(k for k in kinds if k not in KV_CACHES)
    if others:
        return f"keeps caches other than key/value ones ({', '.join(others)})"
    return None


def layer_counts(
    n_layers: int, free: Sequence[int], layer_bytes: int, rank0_bytes: int
) -> list[int]:
    """Layers per rank, proportional to each rank's ``free`` memory (rank 0's less the
    ``rank0_bytes`` of embeddings, norm and head it holds besides), at least one each;
    refused with the numbers when the model does not fit."""
    size = len(free)
    if n_layers < size:
        raise DistributedError(f"{n_layers} layers cannot be split across {size} ranks")
    room = [max(0, f - (rank0_bytes if r == 0 else 0)) for r, f in enumerate(free)]
    fits = [r // layer_bytes if layer_bytes else n_layers for r in room]
    if sum(fits) < n_layers or min(fits) < 1:
        gb = ", ".join(f"rank {r}: {f / 1e9:.1f} GB free" for r, f in enumerate(free))
        raise DistributedError(
            f"the target does not fit the group: {n_layers} layers of {layer_bytes / 1e9:.2f} GB "
            f"and {rank0_bytes / 1e9:.2f} GB of embeddings and head on rank 0 ({gb}); every "
            "rank needs room for at least one layer"
        )
    total = sum(room) or 1
    want = [n_layers * r / total for r in room]
    counts = [max(1, min(fits[r], math.floor(w))) for r, w in enumerate(want)]
    # hand out what rounding left, to the ranks furthest below their share that have room
    while sum(counts) < n_layers:
        r = max((r for r in range(size) if counts[r] < fits[r]), key=lambda r: want[r] - counts[r])
        counts[r] += 1
    while sum(counts) > n_layers:
        r = max((r for r in range(size) if counts[r] > 1), key=lambda r: counts[r] - want[r])
        counts[r] -= 1
    return counts


def pipeline_split(model: nn.Module, group: Any, counts: Sequence[int]) -> None:
    """Keep this rank's block of ``model``'s layers (``counts`` per rank, in rank order) and
    put the hand-offs in place (module docstring); its caches from then on are this rank's."""
    layers = decoder_layers(model)
    size, rank = group.size(), group.rank()
    if len(counts) != size or sum(counts) != len(layers) or min(counts) < 1:
        raise DistributedError(
            f"models.split_layers {list(counts)}: needs {size} positive counts summing to the "
            f"target's {len(layers)} layers"
        )
    start = sum(counts[:rank])
    end = start + counts[rank]
    mine = set(range(start, end))
    split: list[nn.Module] = []
    for i, layer in enumerate(layers):
        if i in mine:
            held = layer
            if i == start and rank > 0:
                held = Received(held, group, rank - 1)
            if i == end - 1:
                held = Sent(held, group, (rank + 1) % size)
            split.append(held)
        elif rank == 0 and i == len(layers) - 1:
            split.append(Returned(layer, group, size - 1))
        else:
            split.append(Elsewhere(layer))
    cast(Any, model).model.layers = split
    object.__setattr__(model, "pipeline_block", (start, end))


def pipelined(model: nn.Module) -> tuple[int, int] | None:
    """This rank's block of layers ``(start, end)`` when ``model`` is split by layers."""
    return cast(tuple[int, int] | None, getattr(model, "pipeline_block", None))


def held_parameters(model: nn.Module) -> list[Any]:
    """What this rank of a layer split evaluates of the target: its block, and on rank 0
    the rest (embeddings, norm, head); a follower never reads the embeddings or head."""
    block = pipelined(model)
    if block is None or block[0] == 0:
        return [model.parameters()]
    inner = cast(Any, model).model
    held = [inner.layers[i].parameters() for i in range(*block)]
    norm = getattr(inner, "norm", None)
    return held + ([norm.parameters()] if norm is not None else [])


def flat_nbytes(module: nn.Module) -> int:
    arrays = cast(list[tuple[str, mx.array]], tree_flatten(module.parameters()))
    return sum(int(a.nbytes) for _, a in arrays)


def layer_bytes(model: nn.Module) -> tuple[int, int]:
    """Bytes of one decoder layer (the largest) and of everything else (lazy arrays: their
    sizes are known before they are read)."""
    sizes = [flat_nbytes(layer) for layer in decoder_layers(model)]
    return max(sizes), flat_nbytes(model) - sum(sizes)
