"""Import a GGUF file (llama.cpp's format) into a standard MLX model directory.

The directory holds what ``mlx_lm.load`` expects: ``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json``. Quantized tensors
(Q4_0, Q4_1, Q8_0, which MLX reads as affine 4/8-bit with group size 32) stay quantized.

Only the ``llama`` architecture is supported. llama.cpp permutes the q/k projections so that
RoPE rotates interleaved pairs, so the config says ``rope_traditional: true`` rather than
permuting the weights back.

Imports are atomic: everything is written to a temporary directory next to the target, a marker
file goes in last, and the directory is renamed into place. A directory without the marker is
never trusted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import numpy as np

from daemon.core.gguf_tokenizer import tokenizer_files
from daemon.durable import fsync_dir, fsync_file, sha256_file
from daemon.errors import GGUFImportError
from daemon.logging import get_logger

log = get_logger("gguf")

MARKER_NAME = ".specd-import-complete"
# Bump when the output layout changes, so older imports are redone.
IMPORT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
# The names an import writes; a marker-less directory holding anything else is not ours.
_OUTPUT_NAMES = {
    "config.json",
    WEIGHTS_NAME,
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    MARKER_NAME,
}

# MLX reads GGUF's Q4_0, Q4_1 and Q8_0 blocks as affine quantization over 32 weights.
GGUF_GROUP_SIZE = 32

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_SUFFIXES = ("weight", "scales", "biases", "bias")


def import_gguf(gguf_path: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Import ``gguf_path`` into the MLX model directory ``out_dir`` and return its path.

    A complete import of the same, unchanged file is reused as is. An incomplete directory (no
    marker), or a stale import of the same path, is removed and redone. A complete import of a
    different file is only replaced with ``overwrite=True``.

    Raises:
        GGUFImportError: the file is unreadable or not a supported llama model, or ``out_dir``
            holds something that is not safe to replace.
    """
    src = Path(gguf_path).expanduser().resolve()
    out = Path(out_dir).expanduser().absolute()
    try:
        stat = src.stat()
    except OSError as e:
        raise GGUFImportError(src, f"cannot read the file ({e.strerror or e})") from e
    if not src.is_file():
        raise GGUFImportError(src, "not a regular file")

    out.parent.mkdir(parents=True, exist_ok=True)
    with _import_lock(out):
        marker = _read_marker(out) if is_complete_import(out) else None
        if marker is not None and not overwrite and _same_source(marker, src, stat):
            return out
        _check_replaceable(src, out, marker, overwrite)
        _remove_leftovers(out)
        tmp = _sibling(out, "importing")
        tmp.mkdir()
        try:
            _write_import(src, stat, tmp)
            _move_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("gguf_imported", source=str(src), out=str(out))
    return out


def is_complete_import(out_dir: str | Path, *, check_hash: bool = False) -> bool:
    """Whether ``out_dir`` holds a finished import: the marker is there and every file it lists
    has the recorded size (and, with ``check_hash``, the weights have the recorded sha256)."""
    out = Path(out_dir)
    marker = _read_marker(out)
    if marker is None or marker.get("version") != IMPORT_VERSION:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or WEIGHTS_NAME not in files:
        return False
    for name, size in files.items():
        try:
            if (out / name).stat().st_size != size:
                return False
        except OSError:
            return False
    if check_hash and sha256_file(out / WEIGHTS_NAME) != marker.get("weights_sha256"):
        return False
    return True


# --- reading the GGUF file -------------------------------------------------------------------


def _load_gguf(src: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    try:
        with open(src, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise GGUFImportError(src, f"cannot read the file ({e.strerror or e})") from e
    if magic != b"GGUF":
        raise GGUFImportError(src, f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        # with return_metadata, mx.load returns (tensors, metadata); its stub types the union
        weights, metadata = cast(
            tuple[dict[str, mx.array], dict[str, Any]],
            mx.load(str(src), format="gguf", return_metadata=True),
        )
    except Exception as e:
        raise GGUFImportError(src, f"MLX could not read it ({e})") from e
    return weights, {k: _plain(v) for k, v in metadata.items()}


def _plain(value: Any) -> Any:
    """GGUF metadata as plain Python values (MLX hands back numbers as mx.array)."""
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _require(src: Path, meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise GGUFImportError(src, f"metadata key {key!r} is missing")
    return meta[key]


def _check_supported(src: Path, meta: dict[str, Any]) -> None:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFImportError(
            src, f"unsupported architecture {arch!r} (only 'llama' can be imported)"
        )
    if meta.get("llama.expert_count", 0):
        raise GGUFImportError(src, "mixture-of-experts llama models are not supported")
    model = meta.get("tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise GGUFImportError(
            src,
            f"unsupported tokenizer model {model!r} (supported: 'gpt2' byte-level BPE, "
            "'llama' sentencepiece BPE)",
        )
    if "tokenizer.ggml.tokens" not in meta:
        raise GGUFImportError(src, "the file carries no tokenizer vocabulary")


# --- model config and weights ----------------------------------------------------------------


def _mlx_name(src: Path, name: str) -> str:
    """The mlx-lm llama parameter name for a GGUF tensor name."""
    module, _, suffix = name.rpartition(".")
    if suffix not in _SUFFIXES:
        raise GGUFImportError(src, f"unexpected tensor {name!r}")
    if module in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[module]}.{suffix}"
    parts = module.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    raise GGUFImportError(src, f"unexpected tensor {name!r} for a llama model")


def _convert_weights(
    src: Path, weights: dict[str, mx.array]
) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Rename tensors to mlx-lm names and work out each module's quantization."""
    out = {_mlx_name(src, name): w for name, w in weights.items()}
    per_module: dict[str, Any] = {}
    for name, w in out.items():
        module, _, suffix = name.rpartition(".")
        if suffix == "scales":
            packed = out.get(f"{module}.weight")
            if packed is None or packed.dtype != mx.uint32:
                raise GGUFImportError(src, f"{module} has scales but no packed weight")
            in_dims = w.shape[-1] * GGUF_GROUP_SIZE
            bits, rem = divmod(packed.shape[-1] * 32, in_dims)
            if rem or bits not in (2, 3, 4, 5, 6, 8):
                raise GGUFImportError(src, f"cannot infer the quantization of {module}")
            per_module[module] = {"group_size": GGUF_GROUP_SIZE, "bits": bits}
        elif suffix == "weight" and w.ndim == 2 and f"{module}.scales" not in out:
            # Say so explicitly: a float matrix in an otherwise quantized file stays float.
            per_module[module] = False
    bits_used = Counter(q["bits"] for q in per_module.values() if q)
    if not bits_used:
        return out, {}
    quantization: dict[str, Any] = {
        "group_size": GGUF_GROUP_SIZE,
        "bits": bits_used.most_common(1)[0][0],
    }
    # Natural order (layers.2 before layers.10) keeps config.json readable.
    for module in sorted(per_module, key=_natural_key):
        quantization[module] = per_module[module]
    return out, quantization


def _natural_key(name: str) -> list[Any]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]


def _rows(weights: dict[str, mx.array], name: str) -> int | None:
    w = weights.get(name)
    return None if w is None else int(w.shape[0])


def _model_config(src: Path, meta: dict[str, Any], weights: dict[str, mx.array]) -> dict[str, Any]:
    """config.json for mlx-lm's llama model."""
    p = "llama."
    hidden = int(_require(src, meta, p + "embedding_length"))
    n_layers = int(_require(src, meta, p + "block_count"))
    n_heads = int(_require(src, meta, p + "attention.head_count"))
    n_kv_heads = meta.get(p + "attention.head_count_kv", n_heads)
    if isinstance(n_kv_heads, list):
        # Some converters write one value per layer; mlx-lm's llama needs a single one.
        if len(set(n_kv_heads)) != 1:
            raise GGUFImportError(src, "per-layer key/value head counts are not supported")
        n_kv_heads = n_kv_heads[0]
    intermediate = meta.get(p + "feed_forward_length") or _rows(weights, "blk.0.ffn_gate.weight")
    vocab = _rows(weights, "token_embd.weight")
    if vocab is None or intermediate is None:
        raise GGUFImportError(src, "token_embd.weight or blk.0.ffn_gate.weight is missing")

    # head_dim: the q projection has n_heads * head_dim rows (rows are never packed).
    q_rows = _rows(weights, "blk.0.attn_q.weight")
    head_dim = meta.get(p + "attention.key_length") or (q_rows // n_heads if q_rows else None)
    head_dim = int(head_dim or hidden // n_heads)
    rope_dims = int(meta.get(p + "rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise GGUFImportError(
            src, f"partial RoPE ({rope_dims} of {head_dim} dims) is not supported for llama"
        )

    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(intermediate),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv_heads),
        "rms_norm_eps": float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get(p + "rope.freq_base", 10000.0)),
        # llama.cpp permuted q/k for interleaved ("traditional") RoPE.
        "rope_traditional": True,
        "max_position_embeddings": int(meta.get(p + "context_length", 2048)),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in weights,
        "attention_bias": "blk.0.attn_q.bias" in weights,
        "mlp_bias": "blk.0.ffn_up.bias" in weights,
    }
    if p + "attention.key_length" in meta or head_dim != hidden // n_heads:
        config["head_dim"] = head_dim
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in meta:
            config[key] = int(meta[f"tokenizer.ggml.{key}"])

    scaling = _rope_scaling(src, meta, weights.get("rope_freqs.weight"), config)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _rope_scaling(
    src: Path, meta: dict[str, Any], rope_freqs: mx.array | None, config: dict[str, Any]
) -> dict[str, Any] | None:
    kind = meta.get("llama.rope.scaling.type", "none")
    if rope_freqs is not None:
        return _llama3_scaling(src, meta, np.array(rope_freqs, dtype=np.float64), config)
    if kind == "none":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(meta["llama.rope.scaling.factor"])}
    raise GGUFImportError(src, f"unsupported RoPE scaling {kind!r}")


def _llama3_scaling(
    src: Path, meta: dict[str, Any], factors: np.ndarray, config: dict[str, Any]
) -> dict[str, Any]:
    """Recover Llama 3's rope_scaling from the per-frequency factors llama.cpp stores.

    llama.cpp keeps only the computed factors (rope_freqs.weight), not the parameters that
    mlx-lm's Llama3RoPE wants, so try the published settings and keep the one that matches.
    """
    dims = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    base = config["rope_theta"]
    wavelens = 2 * np.pi * base ** (np.arange(0, dims, 2) / dims)
    factor = float(factors.max())
    old_ctx = int(meta.get("llama.rope.scaling.original_context_length", 8192))
    for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
        smooth = (old_ctx / wavelens - low) / (high - low)
        expected = np.where(
            wavelens < old_ctx / high,
            1.0,
            np.where(wavelens > old_ctx / low, factor, 1 / ((1 - smooth) / factor + smooth)),
        )
        if expected.shape == factors.shape and np.allclose(expected, factors, rtol=1e-3):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": old_ctx,
            }
    raise GGUFImportError(src, "rope_freqs.weight does not match Llama 3 RoPE scaling")


# --- writing the directory -------------------------------------------------------------------


def _write_import(src: Path, stat: os.stat_result, tmp: Path) -> None:
    weights, meta = _load_gguf(src)
    _check_supported(src, meta)
    config = _model_config(src, meta, weights)
    weights.pop("rope_freqs.weight", None)  # folded into config["rope_scaling"]
    weights, quantization = _convert_weights(src, weights)
    if quantization:
        config["quantization"] = quantization
    tokenizer_json, tok_config, gen_config = tokenizer_files(src, meta)

    mx.save_safetensors(str(tmp / WEIGHTS_NAME), weights, metadata={"format": "mlx"})
    fsync_file(tmp / WEIGHTS_NAME)
    del weights
    _write_text(tmp / "config.json", json.dumps(config, indent=2))
    _write_text(tmp / "tokenizer.json", tokenizer_json)
    _write_text(tmp / "tokenizer_config.json", json.dumps(tok_config, indent=2))
    _write_text(tmp / "generation_config.json", json.dumps(gen_config, indent=2))
    _check_loads(src, tmp)

    marker = {
        "version": IMPORT_VERSION,
        "source": str(src),
        "source_size": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
        "weights_sha256": sha256_file(tmp / WEIGHTS_NAME),
        "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())},
    }
    # The marker goes last: a directory without it is never trusted.
    _write_text(tmp / MARKER_NAME, json.dumps(marker, indent=2))
    fsync_dir(tmp)


def _check_loads(src: Path, tmp: Path) -> None:
    """Build the mlx-lm model from the new directory, so a mismatch fails the import."""
    from mlx_lm.utils import load_model

    try:
        load_model(tmp, lazy=True)
    except Exception as e:
        raise GGUFImportError(src, f"the converted model does not load in mlx-lm ({e})") from e


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _read_marker(out: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((out / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _same_source(marker: dict[str, Any], src: Path, stat: os.stat_result) -> bool:
    return (
        marker.get("source") == str(src)
        and marker.get("source_size") == stat.st_size
        and marker.get("source_mtime_ns") == stat.st_mtime_ns
    )


def _check_replaceable(
    src: Path, out: Path, marker: dict[str, Any] | None, overwrite: bool
) -> None:
    """Refuse to delete anything that is not an import of ours."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise GGUFImportError(src, f"output path {out} exists and is not a directory")
    if marker is not None:
        if not overwrite and marker.get("source") != str(src):
            raise GGUFImportError(
                src,
                f"{out} already holds an import of {marker.get('source')}; "
                "pass overwrite=True to replace it",
            )
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _OUTPUT_NAMES or p.is_dir())
    if foreign:
        raise GGUFImportError(
            src,
            f"{out} exists, is not a complete import and holds files an import does not "
            f"write ({', '.join(foreign[:5])}); refusing to delete it",
        )


def _sibling(out: Path, kind: str) -> Path:
    """A hidden, unique path next to ``out`` (same filesystem, so renames are atomic)."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _remove_leftovers(out: Path) -> None:
    """Temp directories of imports that died; safe because we hold the import lock."""
    prefixes = (f".{out.name}.importing-", f".{out.name}.old-")
    for leftover in out.parent.iterdir():
        if leftover.name.startswith(prefixes) and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        # A directory cannot be renamed over a non-empty one; move the old one aside first.
        old = _sibling(out, "old")
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _import_lock(out: Path) -> Iterator[None]:
    """Serialize imports into the same directory across threads and processes."""
    lock_path = out.parent / f".{out.name}.lock"
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
