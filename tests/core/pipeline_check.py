"""Run by tests/core/test_pipeline_models.py under ``mlx.launch``: tiny models of several
mlx-lm families split by layers across the group give the logits the whole model gives, over
a prefill, single steps, a verify step, a trim and a step past the trim.

Every rank builds the same model (same seed); rank 0 also keeps an unsplit copy and prints
``OK <type>`` or ``MISMATCH <type> <gap>`` per family.
"""

from __future__ import annotations

import importlib
import sys

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from daemon.core.pipeline import pipeline_split

TYPES = [
    "llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "starcoder2",
    "olmo2", "cohere", "internlm3",
]  # fmt: skip
CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 6,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "rms_norm_eps": 1e-5,
    "norm_eps": 1e-5,
    "vocab_size": 64,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "max_position_embeddings": 256,
    "query_pre_attn_scalar": 8,
    "sliding_window": 4,  # shorter than the sequence: sliding layers' caches wrap
    "sliding_window_pattern": 2,
    "max_window_layers": 2,
    "use_sliding_window": False,
    "partial_rotary_factor": 1.0,
}
STEPS = [[3, 5, 7, 9, 11, 13], [2], [4], [6], [8, 10, 12], ("trim", 2), [14, 15], [16]]


def build(kind: str) -> object:
    module = importlib.import_module(f"mlx_lm.models.{kind}")
    mx.random.seed(7)
    model = module.Model(module.ModelArgs.from_dict({"model_type": kind, **CONFIG}))
    mx.eval(model.parameters())
    return model


def run(model: object) -> list[mx.array]:
    cache = make_prompt_cache(model)  # type: ignore[arg-type]
    out = []
    for step in STEPS:
        if isinstance(step, tuple):
            trim_prompt_cache(cache, step[1])
            continue
        logits = model(mx.array([step]), cache=cache)  # type: ignore[operator]
        mx.eval(logits)
        out.append(logits)
    return out


def main() -> int:
    group = mx.distributed.init(strict=True)
    counts = [int(c) for c in sys.argv[1].split(",")]
    for kind in TYPES:
        split = build(kind)
        pipeline_split(split, group, counts)  # type: ignore[arg-type]
        got = run(split)
        if group.rank() != 0:
            continue
        want = run(build(kind))
        gap = max(float(mx.abs(a - b).max()) for a, b in zip(got, want, strict=True))
        print(("OK" if gap < 1e-4 else "MISMATCH"), kind, f"{gap:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
