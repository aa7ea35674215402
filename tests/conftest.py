"""Shared test fixtures: a tiny byte-level BPE tokenizer and tiny random llama models.

Fixtures (session scoped, float32, evaluated):
    tiny_tokenizer  mlx-lm TokenizerWrapper around a byte-level BPE PreTrainedTokenizerFast
                    (GPT-2 style, like SmolLM2), BPEStreamingDetokenizer, eos "<|endoftext|>",
                    a minimal chat template.
    tiny_target     random llama, vocab_size == len(tiny_tokenizer), lm_head scaled up so the
                    logits have clear margins (greedy speculative == greedy target exactly).
    tiny_draft      a perturbed copy of tiny_target (same shapes): partial acceptance.

Helpers ``make_tiny_llama`` and ``perturbed_copy`` build variants (other vocab sizes, padded
draft vocabularies).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.models.llama import Model, ModelArgs
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding drafts tokens with a small model and verifies them with a large one.",
    "Hello world! This is a tiny tokenizer for tests.",
    "def main():\n    print('hello')\n    return 0\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "the cat sat on the mat and the dog sat on the log",
]
EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int = 320) -> TokenizerWrapper:
    """A byte-level BPE tokenizer (all 256 bytes + a few merges + special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token="<|pad|>")
    hf.chat_template = CHAT_TEMPLATE
    return TokenizerWrapper(hf, detokenizer_class=BPEStreamingDetokenizer)


def make_tiny_llama(
    vocab_size: int,
    seed: int = 0,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    intermediate_size: int = 128,
    lm_head_scale: float = 8.0,
    max_position_embeddings: int = 512,
) -> nn.Module:
    """A random float32 llama; ``lm_head_scale`` sharpens its next-token distributions."""
    mx.random.seed(seed)
    args = ModelArgs(
        model_type="llama",
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        intermediate_size=intermediate_size,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=vocab_size,
        tie_word_embeddings=False,
        max_position_embeddings=max_position_embeddings,
    )
    model = Model(args)
    model.lm_head.weight = model.lm_head.weight * lm_head_scale
    mx.eval(model.parameters())
    return model


def perturbed_copy(
    model: nn.Module, seed: int = 1, noise: float = 0.3, extra_vocab: int = 0
) -> nn.Module:
    """Copy of a tiny llama with relative Gaussian noise on every weight.

    ``extra_vocab`` > 0 pads the vocabulary (embedding and lm_head rows) like a padded
    checkpoint; the extra lm_head rows are random.
    """
    args = ModelArgs.from_dict(
        {**vars(model.args), "vocab_size": model.args.vocab_size + extra_vocab}
    )
    copy = Model(args)
    mx.random.seed(seed)

    def noisy(w: mx.array) -> mx.array:
        return w + noise * mx.std(w) * mx.random.normal(w.shape)

    params = dict(tree_flatten(tree_map(noisy, model.parameters())))
    if extra_vocab:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            w = params[name]
            pad = mx.std(w) * mx.random.normal((extra_vocab, w.shape[1]))
            params[name] = mx.concatenate([w, pad], axis=0)
    copy.update(tree_unflatten(list(params.items())))
    mx.eval(copy.parameters())
    return copy


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
    from daemon.models import load_pair

    data_dir = tmp_path_factory.mktemp("smollm-data")
    settings, _ = load_settings(None, {"paths.data_dir": str(data_dir)})
    return load_pair(settings)
