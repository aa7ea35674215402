"""LoRA layers on the draft, with mlx-lm's own conversion (``linear_to_lora_layers``).

`apply_lora` freezes the draft and adds LoRA to ``training.lora.num_layers`` blocks (or loads an
initial adapter's layers and weights, to continue it), and returns the mlx-lm adapter config the
saved adapter carries (`daemon.store.adapters.save_adapter` writes it). Only the draft is
adapted: a layer-skip draft owns its module objects (`make_layer_skip_draft`), so the LoRA layers
put into it never reach the target, and the frozen weight arrays they share are never updated.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx.utils import tree_flatten

from daemon.config import LoraSettings
from daemon.errors import AdapterError, TrainingError
from daemon.logging import get_logger
from daemon.store.adapters import read_adapter_config

log = get_logger("training")


def lora_config(lora: LoraSettings) -> dict[str, Any]:
    """mlx-lm's ``lora_parameters`` from the settings."""
    return {
        "rank": lora.rank,
        "scale": lora.scale,
        "dropout": lora.dropout,
        "keys": list(lora.keys) if lora.keys is not None else None,
    }


def _lora_keys(model: nn.Module) -> list[str]:
    """Module keys that carry LoRA, for the saved config: relative to a layer inside the
    blocks, full paths outside them (``model.embed_tokens``), as `linear_to_lora_layers`
    matches them."""
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear

    def is_lora(module: nn.Module) -> bool:
        return isinstance(module, LoRALinear | LoRAEmbedding)

    keys = {name for layer in model.layers for name, m in layer.named_modules() if is_lora(m)}
    in_blocks = {id(m) for layer in model.layers for _, m in layer.named_modules()}
    keys |= {name for name, m in model.named_modules() if is_lora(m) and id(m) not in in_blocks}
    return sorted(keys)


def apply_lora(
    model: nn.Module, lora: LoraSettings, init_adapter: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Freeze ``model`` and add LoRA layers (or those of ``init_adapter``, with its weights).

    Returns the adapter config (mlx-lm format) the saved adapter will carry.
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters

    model.freeze()
    n_layers = len(model.layers)
    if init_adapter is not None:
        path = Path(init_adapter)
        try:
            config = read_adapter_config(path)
            load_adapters(model, str(path))
            params = dict(config["lora_parameters"])
            num_layers = int(config["num_layers"])
        except (AdapterError, OSError, ValueError, KeyError, TypeError) as e:
            raise TrainingError(f"cannot load initial adapter {path}: {e}") from e
        wanted = lora_config(lora)
        if any(params.get(k) != wanted[k] for k in ("rank", "scale")):
            log.warning(
                "init_adapter_config_differs",
                adapter=str(path),
                adapter_lora=params,
                settings_lora=wanted,
                note="training continues with the adapter's LoRA shape",
            )
    else:
        params = lora_config(lora)
        num_layers = n_layers if lora.num_layers < 0 else min(lora.num_layers, n_layers)
        linear_to_lora_layers(model, num_layers, params)
    trainable = tree_flatten(model.trainable_parameters())
    if not trainable:
        raise TrainingError("LoRA found no layers to adapt (check training.lora.keys)")
    params["keys"] = _lora_keys(model)
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}
