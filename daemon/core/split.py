"""How a group of ranks splits the target: tensor-parallel (mlx-lm's own ``shard``:
attention heads and MLP columns split N ways, two all-reduces per layer) or by layers
(`daemon.core.pipeline`: a block of layers per rank, one hand-off per rank), chosen by
``models.split``; ``auto`` measures the link first (`link_latency`)."""

from __future__ import annotations

import time
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from daemon.core.backend import free_memory_bytes
from daemon.core.distributed import Group
from daemon.core.pipeline import (
    decoder_layers,
    layer_bytes,
    layer_counts,
    pipeline_split,
    unsplittable,
)
from daemon.errors import DistributedError

__all__ = ["TENSOR_MAX_LATENCY_S", "link_latency", "shard_target"]


def _divides(model: nn.Module, n: int) -> list[str]:
    """What in ``model``'s shape does not split ``n`` ways (tensor parallel)."""
    args = getattr(model, "args", None)
    bad = []
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value % n:
            bad.append(f"{name} {value}")
    return bad


# auto: tensor only over a link whose all-reduce of a small message takes less than this.
# A tensor round costs F/2 + 2L messages, a pipeline round F + 2 hand-offs (F: one forward on
# one machine, L: layers); for a 70B (F ~ 50 ms, L = 80) they break even near 150 us per
# message (`specd bench group`'s estimate), and a smaller model gains less from tensor's
# halved forward for the same messages. RDMA over Thunderbolt 5 is ~10 us, TCP over 10 GbE
# ~60-150 us, Wi-Fi milliseconds.
TENSOR_MAX_LATENCY_S = 100e-6


def shard_target(
    model: nn.Module, group: Group, how: str = "tensor", split_layers: list[int] | None = None
) -> str:
    """Split ``model`` (lazy, not yet evaluated) across the group, ``how``: tensor (mlx-lm's
    own ``shard``), pipeline (`daemon.core.pipeline`, ``split_layers`` per rank or by free
    memory) or auto (tensor when the shapes divide and the measured link is fast enough,
    `TENSOR_MAX_LATENCY_S`; else pipeline); returns how it was split."""
    n = group.size
    kind = type(model).__module__.rsplit(".", 1)[-1]
    why = ""
    if how == "auto":
        tensor_fits = hasattr(model, "shard") and not _divides(model, n)
        if (reason := unsplittable(model)) is not None:
            how, why = "tensor", f"; auto: by layers, {reason}"  # if tensor fails, it says why
        elif not tensor_fits:
            how, why = "pipeline", "; auto: the heads do not divide"
        else:  # both fit: the link decides (measured only then: every rank takes part)
            latency = link_latency(group)
            why = f"; auto, all-reduce {latency * 1e6:.0f} us"
            how = "tensor" if latency <= TENSOR_MAX_LATENCY_S else "pipeline"
    if how == "pipeline":
        counts = list(split_layers) if split_layers else _counts_by_memory(model, group)
        pipeline_split(model, group.handle, counts)
        return f"pipeline over {n} ranks (layers {'/'.join(map(str, counts))}{why})"
    if hasattr(model, "shard"):
        bad = _divides(model, n)
        if bad:
            raise DistributedError(
                f"the target ({kind}) cannot be split tensor-parallel across {n} ranks: "
                f"{', '.join(bad)} not divisible by {n}; use a group size that divides them "
                "or models.split: pipeline"
            )
        cast(Any, model).shard(group.handle)
        return f"tensor-parallel over {n} ranks (attention heads and MLP columns / {n}{why})"
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "pipeline"):
        inner.pipeline(group.handle)
        return f"pipeline over {n} ranks (mlx-lm's own, layers / {n})"
    raise DistributedError(
        f"mlx-lm cannot split the target ({kind}) tensor-parallel across ranks: it has no "
        "shard(); use models.split: pipeline, or serve it on one machine"
    )


def link_latency(group: Group, repeats: int = 20) -> float:
    """Seconds of one all-reduce of a small message, as rank 0 measured it (every rank gets
    rank 0's figure, so they all decide alike)."""
    x = mx.zeros((1, 256), dtype=mx.float32)
    for _ in range(3):  # warm-up: the first messages set up the connections
        mx.eval(mx.distributed.all_sum(x, group=group.handle, stream=mx.cpu))
    t0 = time.perf_counter()
    for _ in range(repeats):
        mx.eval(mx.distributed.all_sum(x, group=group.handle, stream=mx.cpu))
    mine = (time.perf_counter() - t0) / repeats if group.rank == 0 else 0.0
    agreed = mx.distributed.all_sum(mx.array([mine]), group=group.handle, stream=mx.cpu)
    return float(cast(float, agreed.item()))


def _counts_by_memory(model: nn.Module, group: Group) -> list[int]:
    """Layers per rank in proportion to each rank's free memory (all-gathered, in MB)."""
    mine = free_memory_bytes() // 2**20
    seen = mx.distributed.all_gather(
        mx.array([min(mine, 2**31 - 1)], dtype=mx.int32), group=group.handle, stream=mx.cpu
    )
    free = [int(v) * 2**20 for v in cast(list[int], seen.tolist())]
    per_layer, rest = layer_bytes(model)
    return layer_counts(len(decoder_layers(model)), free, per_layer, rest)
