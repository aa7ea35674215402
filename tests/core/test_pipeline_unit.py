"""A layer split's arithmetic and stand-ins, without a group: layers per rank by free memory,
the caches of layers held elsewhere, the stand-ins' attributes. (Serving split by layers,
on 2 and 3 ranks: tests/serving/test_distributed.py.)"""

from __future__ import annotations

import copy

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache, trim_prompt_cache

from daemon.core.pipeline import Elsewhere, layer_bytes, layer_counts, unsplittable
from daemon.errors import DistributedError
from tests.helpers import tiny_model

GB = 10**9


def test_layers_follow_free_memory_with_rank_zero_s_extra_parts() -> None:
    # a 64 GB and a 24 GB Mac: 80 layers of 0.5 GB, 2 GB of embeddings and head on rank 0
    counts = layer_counts(80, [64 * GB, 24 * GB], GB // 2, 2 * GB)
    assert sum(counts) == 80 and counts[0] > counts[1]
    assert counts[0] * GB // 2 + 2 * GB <= 64 * GB and counts[1] * GB // 2 <= 24 * GB
    assert layer_counts(30, [8 * GB, 8 * GB], 10**6, 0) == [15, 15]
    assert layer_counts(6, [GB, GB, GB], 10**6, 0) == [2, 2, 2]
    # every rank gets one at least, however little it has beside the others
    assert layer_counts(4, [100 * GB, GB, GB], 10**6, 0)[1:] == [1, 1]


def test_a_model_that_does_not_fit_is_refused_with_the_numbers() -> None:
    with pytest.raises(DistributedError, match=r"does not fit.*80 layers of 0.50 GB") as e:
        layer_counts(80, [24 * GB, 12 * GB], GB // 2, 2 * GB)
    assert "rank 0: 24.0 GB free" in str(e.value) and "rank 1: 12.0 GB free" in str(e.value)
    with pytest.raises(DistributedError, match="2 layers cannot be split across 3"):
        layer_counts(2, [GB, GB, GB], 1, 0)


def test_a_layer_held_elsewhere_passes_the_state_and_keeps_its_cache_in_step() -> None:
    model = tiny_model(40)
    layer = model.model.layers[0]
    stand_in = Elsewhere(layer)
    assert not stand_in.parameters()  # its weights are not this rank's
    assert stand_in.self_attn is layer.self_attn  # what the model's forward may read of it
    # a sliding-window cache, as a model with such layers makes it: wrapping, masks and trims
    # must match the real one's on the rank that holds the layer
    for make in (KVCache, lambda: RotatingKVCache(max_size=4)):
        kept, real = make(), make()
        for n in (6, 1, 1, 3):
            h = mx.ones((1, n, 32))
            assert stand_in(h, None, cache=kept) is h
            layer(h, real.make_mask(n, return_array=True, window_size=None), cache=real)
            assert kept.offset == real.offset
            mask, want = (c.make_mask(2, return_array=True, window_size=None) for c in (kept, real))
            assert mask.shape == want.shape and bool(mx.all(mask == want))
        assert kept.is_trimmable() == real.is_trimmable()
        if real.is_trimmable():
            assert trim_prompt_cache([kept, real], 2) == 2 and kept.offset == real.offset
        assert copy.deepcopy(kept).offset == kept.offset and kept.nbytes == 0


def test_layer_bytes_are_known_before_the_weights_are_read() -> None:
    model = tiny_model(40)
    per_layer, rest = layer_bytes(model)
    layers = model.model.layers
    assert per_layer * len(layers) + rest >= per_layer > 0 and rest > 0


def test_a_model_with_other_than_key_value_caches_is_not_split_by_layers() -> None:
    import importlib

    from tests.core.pipeline_check import CONFIG

    module = importlib.import_module("mlx_lm.models.qwen3_next")  # linear-attention layers
    config = {
        "model_type": "qwen3_next",
        **CONFIG,
        "linear_num_value_heads": 2,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "linear_conv_kernel_dim": 4,
        "full_attention_interval": 2,
        "num_experts": 0,
        "num_experts_per_tok": 0,
        "decoder_sparse_step": 1,
        "shared_expert_intermediate_size": 0,
        "moe_intermediate_size": 0,
        "mlp_only_layers": list(range(6)),
        "norm_topk_prob": True,
    }
    model = module.Model(module.ModelArgs.from_dict(config))
    assert unsplittable(model) == "keeps caches other than key/value ones (ArraysCache)"
    with pytest.raises(DistributedError, match="cannot be split by layers; use models.split"):
        layer_bytes(model)
    assert unsplittable(tiny_model(40)) is None
