"""Shared test fixtures: a tiny byte-level BPE tokenizer and tiny random llama models.

Fixtures (session scoped, float32, evaluated):
    tiny_tokenizer  mlx-lm TokenizerWrapper around a byte-level BPE PreTrainedTokenizerFast
                    (GPT-2 style, like SmolLM2), BPEStreamingDetokenizer, eos "<|endoftext|>",
                    a minimal chat template.
    tiny_target     random llama, vocab_size == len(tiny_tokenizer), lm_head scaled up so the
                    logits have clear margins (greedy speculative == greedy target exactly).
    tiny_draft      a perturbed copy of tiny_target (same shapes): partial acceptance.

Helpers ``make_tiny_llama`` and ``perturbed_copy`` (in ``tests/helpers.py``) build variants
(other vocab sizes, padded draft vocabularies).
"""

from __future__ import annotations

import mlx.nn as nn
import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper

from tests.helpers import build_tiny_tokenizer, make_tiny_llama, perturbed_copy


@pytest.fixture(scope="session")
def tiny_tokenizer() -> TokenizerWrapper:
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_target(tiny_tokenizer: TokenizerWrapper) -> nn.Module:
    return make_tiny_llama(len(tiny_tokenizer), seed=0)


@pytest.fixture(scope="session")
def tiny_draft(tiny_target: nn.Module) -> nn.Module:
    return perturbed_copy(tiny_target, seed=1, noise=0.3)


@pytest.fixture(scope="session")
def smollm_pair(tmp_path_factory: pytest.TempPathFactory):
    """The embedded default pair (SmolLM2-135M target + default layer-skip draft), loaded once."""
    from daemon.config import load_settings
    from daemon.core.models import load_pair

    data_dir = tmp_path_factory.mktemp("smollm-data")
    settings, _ = load_settings(None, {"paths.data_dir": str(data_dir)})
    return load_pair(settings)
