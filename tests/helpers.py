"""Helpers shared by the tests: tiny tokenizers and models, model directories, a daemon
process and its log. Fixtures live in ``conftest.py``; test modules import these, never each
other."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.models.llama import Model, ModelArgs
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
from mlx_lm.utils import save_config, save_model

from daemon.core.backend import REEXEC_MARKER

if TYPE_CHECKING:
    from daemon.config import ConfigSources, Settings
    from daemon.core.models import ModelPair
    from daemon.server import Server

# A guard against a hang, not a speed requirement: tests poll for the state they wait for and
# give up only after this long, so no test depends on how fast the machine is.
HANG_GUARD_S = 600.0


def wait_until(
    cond: Callable[[], object], what: str, timeout: float = HANG_GUARD_S, interval: float = 0.01
) -> None:
    """Poll ``cond`` until it is true; fail naming ``what`` if it never becomes true."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what} after {timeout:.0f} s"
        time.sleep(interval)


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


def tiny_args(vocab: int = 40, layers: int = 6, hidden: int = 32) -> ModelArgs:
    return ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=vocab,
        tie_word_embeddings=False,
        rope_traditional=True,
    )


def tiny_model(
    vocab: int = 40, layers: int = 6, seed: int = 0, lm_head_scale: float = 1.0, hidden: int = 32
) -> Model:
    mx.random.seed(seed)
    model = Model(tiny_args(vocab, layers, hidden))
    model.set_dtype(mx.float32)
    if lm_head_scale != 1.0:  # sharper next-token distributions: clear argmax margins
        model.lm_head.weight = model.lm_head.weight * lm_head_scale
    mx.eval(model.parameters())
    return model


def write_model_dir(
    path: Path,
    words: list[str],
    vocab_size: int,
    seed: int,
    lm_head_scale: float = 1.0,
    hidden: int = 32,
    chat_template: str | None = None,
) -> Path:
    """A loadable MLX model directory with a word-level tokenizer over ``words`` (and
    ``chat_template``, if given)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    if chat_template is not None:
        hf.chat_template = chat_template
    model = tiny_model(vocab_size, seed=seed, lm_head_scale=lm_head_scale, hidden=hidden)
    path.mkdir(parents=True)
    save_model(path, model)
    config = {k: v for k, v in vars(model.args).items() if v is not None}
    save_config(config, path / "config.json")
    hf.save_pretrained(path)
    return path


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free right now."""
    from daemon.core.distributed import loopback_ports

    return loopback_ports(n)


def write_hostfile(path: Path, ranks: int) -> Path:
    """A ring hostfile for ``ranks`` processes on loopback, as mlx.launch writes one."""
    from daemon.core.distributed import loopback_hostfile

    return loopback_hostfile(path, ranks)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without specd's settings, a launcher's rank variables or the
    re-exec marker, plus ``extra``; children import this checkout first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPECD_", "MLX_"))}
    env.pop(REEXEC_MARKER, None)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    return {**env, **extra}


def read_log(path: Path) -> list[dict]:
    """The log's complete records: a live daemon may be half-way through writing the
    last line, so text after the final newline is left for the next read."""
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def wait_for_event(
    path: Path, event: str, proc: subprocess.Popen, timeout: float = HANG_GUARD_S
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rec in read_log(path):
            if rec.get("event") == event:
                return rec
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited early: {proc.returncode}\n{proc.stderr.read()}")
        time.sleep(0.2)
    raise AssertionError(f"no {event!r} in {path} within {timeout}s")


def serve_command(cfg: Path, data_dir: Path) -> list[str]:
    """``specd serve`` with this interpreter, a config file and a data dir."""
    return [
        sys.executable,
        "-m",
        "daemon",
        "serve",
        "--config",
        str(cfg),
        "--data-dir",
        str(data_dir),
    ]


def start_daemon(tmp_path: Path, config: dict, env_extra: dict | None = None) -> subprocess.Popen:
    cfg = tmp_path / "config.yaml"
    config = {**config, "server": {"port": 0, **config.get("server", {})}}  # never 8765
    cfg.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECD_")}
    env.pop("LD_PRELOAD", None)  # the entry point must find OpenBLAS by itself
    env.pop(REEXEC_MARKER, None)
    env.update(env_extra or {})
    return subprocess.Popen(
        serve_command(cfg, tmp_path / "data"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def make_adapter(tmp: Path, target, layers: list[int], seed: int, rank: int = 4) -> Path:
    """A LoRA adapter for the layer-skip draft, with non-zero (random) B matrices."""
    from daemon.adaptation.lora import apply_lora
    from daemon.config import LoraSettings
    from daemon.core.models import make_layer_skip_draft
    from daemon.store.adapters import save_adapter

    draft = make_layer_skip_draft(target, layers)
    mx.random.seed(seed)
    config = apply_lora(draft, LoraSettings(rank=rank, dropout=0.0))
    params = [
        (k, mx.random.normal(v.shape) * 0.5) for k, v in tree_flatten(draft.trainable_parameters())
    ]
    draft.update(tree_unflatten(params))
    return save_adapter(draft, tmp, config)


def start_server(data_dir: Path, pair: ModelPair, **server: Any) -> tuple[Server, threading.Thread]:
    """An in-process `Server` on a free port with ``pair``, in a thread, until ready."""
    from daemon.config import load_settings

    data_dir.mkdir(parents=True, exist_ok=True)
    cfg = data_dir / "config.yaml"
    cfg.write_text("{}\n")
    # No adaptation loop here: tests/test_adaptation.py covers it.
    overrides = {"paths.data_dir": str(data_dir), "server.port": 0, "training.enabled": False}
    overrides.update({f"server.{k}": v for k, v in server.items()})
    settings, sources = load_settings(cfg, overrides)
    return run_server(settings, sources, pair)


def run_server(
    settings: Settings, sources: ConfigSources, pair: ModelPair | None = None
) -> tuple[Server, threading.Thread]:
    """An in-process `Server` on ``settings`` (``pair``, or the configured models), in a
    thread, until ready."""
    from daemon.server import Server

    srv = Server(settings, sources, pair)
    thread = threading.Thread(target=srv.run, name="test-server", daemon=True)
    thread.start()
    wait_until(lambda: srv.ready.is_set() or not thread.is_alive(), "server start-up")
    assert thread.is_alive(), "server thread died during start-up"
    return srv, thread


def stop_server(srv: Server, thread: threading.Thread) -> None:
    srv.handle_exit(signal.SIGTERM, None)
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive()


def stop_daemon(proc: subprocess.Popen) -> None:
    """SIGTERM a daemon subprocess and wait for it (killed if it hangs)."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tiny_pair(target: nn.Module, draft: nn.Module, tokenizer: Any, target_id: str) -> ModelPair:
    """A `ModelPair` around tiny in-memory models (a separate draft)."""
    from daemon.core.models import ModelPair

    return ModelPair(
        target=target,
        draft=draft,
        tokenizer=tokenizer,
        target_id=target_id,
        draft_id="tiny-draft",
        target_path="",
        draft_kind="model",
        dtype="float32",
        dequantized=False,
    )


def pair_from_dir(path: Path, target_id: str, **model: Any) -> ModelPair:
    """A tiny llama saved next to the tokenizer already in ``path`` (sized to its vocabulary,
    ``model`` passed to `make_tiny_llama`), loaded back through mlx-lm's tokenizer (which
    infers tool and thinking markers from it), as a `ModelPair` with a perturbed draft."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from daemon.core.models import ModelPair

    tok = load_tokenizer(Path(path))
    target = make_tiny_llama(len(tok._tokenizer), seed=0, **model)
    save_model(path, target)
    save_config({k: v for k, v in vars(target.args).items() if v is not None}, path / "config.json")
    return ModelPair(
        target=target,
        draft=perturbed_copy(target, seed=1, noise=0.2),
        tokenizer=tok,
        target_id=target_id,
        draft_id="tiny-draft",
        target_path=str(path),
        draft_kind="model",
        dtype="float32",
        dequantized=False,
    )
