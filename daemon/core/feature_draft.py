"""A draft that reads the target's own features (EAGLE's design, one decoder layer).

A layer-skip draft re-derives what the target knows from a few of its layers; this draft
starts from what the target already computed. At each position it takes the target's last
hidden state (after the final norm: the vector the output head reads) and the embedding of
the token that follows it, fuses the two with a projection, runs them through one decoder
layer (a copy of the target's last layer to start from) and the target's final norm, and
reads the result with the target's (pruned) output head. Drafting the next token feeds that
output back in as the feature: ``k`` tokens are ``k`` one-layer steps.

The final hidden state is made to tell the token the draft already knows; EAGLE-3 found the
one after it better told by lower layers too. With ``taps`` the draft also reads the outputs
of those target layers (each at unit RMS), and a projection (``fuse``, started as reading the
final features alone) folds them with the final hidden state into one feature. The draft's own
output stands in for that folded feature on a round's later tokens (`training.feature_second_step`
teaches it to).

The features cost the target nothing: every verification pass computes them on the way to
its logits (`target_hidden` returns them instead of throwing them away), and so does the
prefill. The draft shares the target's embedding table and head arrays, so it adds only its
own layer and projection to memory; those are what training changes, and an adapter version
stores them whole (`daemon.store.adapters`).

Position alignment: the draft's entry ``j`` reads ``(feature of position j - 1, token j)``
and predicts token ``j + 1``; its output stands in for the target's feature of position
``j``. Teacher forced over a token sequence (`FeatureDraft.__call__`, for training and
evaluation) the target's features are computed from the sequence itself, so the same
code paths that score a layer-skip draft score this one.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Literal, cast

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from daemon.core.heads import PLAIN_HEAD_MODULES, output_head, pruned_head
from daemon.errors import ModelLoadError

__all__ = [
    "FeatureDraft",
    "NoHiddenStates",
    "embed_scale",
    "feature_taps",
    "is_feature_draft",
    "make_feature_draft",
    "perturb",
    "resolve_taps",
    "target_hidden",
]

FEATURE_KIND = "feature"  # models.draft value that selects this draft


class NoHiddenStates(ModelLoadError):
    """The target's family does not expose its hidden states: no feature draft of it."""


def _inner(target: nn.Module) -> nn.Module:
    inner = getattr(target, "model", None)
    if type(target).__module__ not in PLAIN_HEAD_MODULES or inner is None:
        supported = ", ".join(m.rsplit(".", 1)[1] for m in PLAIN_HEAD_MODULES)
        raise NoHiddenStates(
            f"a feature draft needs the target's hidden states; {type(target).__module__} "
            f"models do not expose them here (supported: {supported})"
        )
    return cast(nn.Module, inner)


class _Tap:
    """A target layer that also hands its output to ``sink``, for the calling thread only
    (a plain forward of the same target from another thread passes straight through)."""

    def __init__(self, layer: nn.Module, sink: list[mx.array]) -> None:
        self._layer = layer
        self._sink = sink
        self._owner = threading.get_ident()

    def __getattr__(self, name: str) -> Any:  # use_sliding and the like, read by the model
        return getattr(self._layer, name)

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        out = cast(mx.array, self._layer(*args, **kwargs))
        if threading.get_ident() == self._owner:
            self._sink.append(out)
        return out


_TAP_LOCK = threading.Lock()


def _unit_rms(x: mx.array) -> mx.array:
    x32 = x.astype(mx.float32)
    return (x32 * mx.rsqrt(mx.mean(mx.square(x32), axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)


def target_hidden(
    target: nn.Module, inputs: mx.array, cache: Any = None, taps: Sequence[int] = ()
) -> mx.array:
    """The target's final hidden states ``(B, T, H)`` (after its final norm), advancing
    ``cache``; ``output_head(target)`` turns them into its logits. With ``taps`` (layer
    indices) the outputs of those layers come first, each scaled to unit RMS (a residual
    stream's magnitude grows with depth): ``(B, T, H * (len(taps) + 1))``, the final
    hidden states the last ``H`` columns."""
    inner = _inner(target)
    if not taps:
        return cast(mx.array, inner(inputs, cache=cache))
    sink: list[mx.array] = []
    with _TAP_LOCK:  # one tapped forward at a time: the layer list is swapped meanwhile
        layers = inner.layers
        n = len(layers)
        wanted = {t % n for t in taps}
        inner.layers = [_Tap(m, sink) if i in wanted else m for i, m in enumerate(layers)]
        try:
            final = cast(mx.array, inner(inputs, cache=cache))
        finally:
            inner.layers = layers
    order = sorted(wanted)
    tapped = dict(zip(order, sink, strict=True))
    return mx.concatenate([_unit_rms(tapped[t % n]) for t in taps] + [final], axis=-1)


def embed_scale(target: nn.Module) -> float:
    """How much larger the features are than the token embeddings (RMS over the whole
    table and the final norm's gain): scaled by it, neither input drowns the other."""
    inner = _inner(target)
    table = inner.embed_tokens
    if isinstance(table, nn.QuantizedEmbedding):
        rows = table(mx.arange(min(4096, table.num_embeddings)))
    else:
        rows = table.weight
    emb = mx.sqrt(mx.mean(mx.square(rows.astype(mx.float32))))
    gain = mx.sqrt(mx.mean(mx.square(inner.norm.weight.astype(mx.float32))))
    return cast(float, (gain / mx.maximum(emb, 1e-6)).item())


class FeatureDraft(nn.Module):
    """One decoder layer over (target feature, next token); see the module docstring.

    The target is held outside the module tree (``object.__setattr__``): its arrays are
    neither this draft's parameters nor saved with it.
    """

    _specd_pruned = True  # `prune_head` leaves the class alone: __call__ reads the pruned head

    def __init__(
        self,
        target: nn.Module,
        layer: nn.Module,
        norm: nn.Module,
        scale: float,
        taps: Sequence[int] = (),
    ) -> None:
        super().__init__()
        _inner(target)
        hidden = int(target.args.hidden_size)
        self.args = target.args
        self.embed_scale = float(scale)
        self.taps = tuple(int(t) for t in taps)
        if self.taps:  # the target's lower layers' features, folded into one feature
            self.fuse = nn.Linear(hidden * (len(self.taps) + 1), hidden, bias=False)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.layers = [layer]  # mlx-lm's make_prompt_cache gives each layer a KV cache
        self.norm = norm
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_pruned_head", None)

    @property
    def target(self) -> nn.Module:
        return cast(nn.Module, self._target)

    @property
    def head_source(self) -> nn.Module:
        """The model whose output head this draft reads (`daemon.core.heads.prune_head`)."""
        return self.target

    def head(self, hidden: mx.array) -> mx.array:
        pruned = pruned_head(self)
        return cast(mx.array, (pruned or output_head(self.target))(hidden))

    def target_features(self, inputs: mx.array, cache: Any = None) -> mx.array:
        """What this draft reads of the target over ``inputs`` (`target_hidden` with its
        taps), advancing the target's ``cache``."""
        return target_hidden(self.target, inputs, cache, self.taps)

    def final(self, features: mx.array) -> mx.array:
        """The target's final hidden states within ``target_features``' output (what its
        output head reads)."""
        return features[..., -self.fc.weight.shape[0] :]

    def forward(self, features: mx.array, tokens: mx.array, cache: Any = None) -> mx.array:
        """Output features ``(B, m, H)`` for entries ``(features[:, i], tokens[:, i])``,
        advancing ``cache`` (a list with one KV cache) by ``m``. ``features``: the target's
        (`target_features`, folded by ``fuse`` when tapped) or the draft's own outputs."""
        if features.shape[-1] != self.fc.weight.shape[0]:
            features = self.fuse(features.astype(self.fuse.weight.dtype))
        embed = _inner(self.target).embed_tokens(tokens) * self.embed_scale
        x = self.fc(mx.concatenate([features.astype(embed.dtype), embed], axis=-1))
        c = cache[0] if cache is not None else None
        x = self.layers[0](x, create_attention_mask(x, c), cache=c)
        return cast(mx.array, self.norm(x))

    def teacher_forced(
        self, inputs: mx.array, features: mx.array | None = None, noise: float = 0.0
    ) -> tuple[mx.array, mx.array]:
        """(output features, the target's features), both ``(B, T, H)``, for a token sequence:
        entry ``j`` reads the target's feature ``j - 1``, so its output at ``j`` is compared
        with the target's feature ``j``; position 0 has no entry and is zeros. ``features``:
        the target's, when already computed (the trainer keeps them across epochs).
        ``noise``: training only, the features read are perturbed (`perturb`)."""
        if features is None:
            features = self.target_features(inputs)
        features = mx.stop_gradient(features)
        top = self.final(features)  # what an output stands for
        pad = mx.zeros((inputs.shape[0], 1, top.shape[-1]), dtype=features.dtype)
        if inputs.shape[1] < 2:
            return pad, top
        read = perturb(features[:, :-1], noise, top.shape[-1]) if noise else features[:, :-1]
        out = self.forward(read, inputs[:, 1:])
        return mx.concatenate([pad.astype(out.dtype), out], axis=1), top

    def hidden(self, inputs: mx.array, cache: Any = None) -> mx.array:
        """Teacher-forced output features (what `daemon.adaptation.loss.model_logits` reads)."""
        return self.teacher_forced(inputs)[0]

    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array:
        """Teacher-forced logits ``(B, T, V)`` of a token sequence: row ``j`` predicts token
        ``j + 1`` as the draft would with the target's true features (row 0: uniform)."""
        return self.head(self.hidden(inputs))


def perturb(features: mx.array, amount: float, hidden: int) -> mx.array:
    """``features`` plus uniform noise U(-amount, amount) times the RMS of each ``hidden``-wide
    block (each tapped layer and the final features have their own scale): EAGLE's training
    augmentation, so the draft does not lean on digits its own output features will not have."""
    shape = features.shape
    blocks = features.astype(mx.float32).reshape(*shape[:-1], shape[-1] // hidden, hidden)
    rms = mx.sqrt(mx.mean(mx.square(blocks), axis=-1, keepdims=True))
    noise = mx.random.uniform(-amount, amount, blocks.shape) * rms
    return (blocks + noise).reshape(shape).astype(features.dtype)


def is_feature_draft(model: Any) -> bool:
    return isinstance(model, FeatureDraft)


def resolve_taps(
    setting: Literal["auto"] | Sequence[int], num_layers: int, what: str = "models.feature_layers"
) -> tuple[int, ...]:
    """The layers a feature draft reads besides the final features (`models.feature_layers`):
    ``"auto"`` is EAGLE-3's choice, a low, the middle and a high layer (2, L/2, L-3; none
    for a target of fewer than 6 layers); a list is taken as it is, each index checked."""
    if setting == "auto":
        if num_layers < 6:
            return ()
        return tuple(dict.fromkeys((2, num_layers // 2, num_layers - 3)))
    for t in setting:
        if not 0 <= t < num_layers:
            raise ModelLoadError(f"{what}: layer {t} is outside the target's {num_layers} layers")
    return tuple(int(t) for t in setting)


def feature_taps(target: nn.Module, setting: Literal["auto"] | Sequence[int]) -> tuple[int, ...]:
    """The layers a feature draft of ``target`` reads for ``models.feature_layers: setting``,
    checked without building the draft: `NoHiddenStates` when its family hides them, a
    `ModelLoadError` naming the key for a layer it lacks."""
    return resolve_taps(setting, len(_inner(target).layers))


def make_feature_draft(
    target: nn.Module, layer: int = -1, taps: Sequence[int] = ()
) -> FeatureDraft:
    """A feature draft for ``target``: its decoder layer ``layer`` (the last by default)
    copied as the draft's layer, its final norm copied, and a projection that starts as
    feature + scaled embedding (``[I | I]``)."""
    from mlx_lm.utils import dequantize_model

    from daemon.core.models import make_layer_skip_draft

    inner = _inner(target)
    n = len(inner.layers)
    if not -n <= layer < n:
        raise ModelLoadError(f"feature draft layer {layer}: the target has {n} layers")
    # a one-layer model of the target's own class: its layer and norm are own module objects
    # that share the target's arrays (training replaces them, never mutates them)
    donor = make_layer_skip_draft(target, [layer % n])
    # a quantized layer's weights cannot be trained: the draft's one layer is kept in float
    # (a version stores whole weights anyway), whatever the target's bits
    block, norm = dequantize_model(donor.model.layers[0]), donor.model.norm
    taps = resolve_taps(list(taps), n, "the feature draft's taps")
    draft = FeatureDraft(target, block, norm, embed_scale(target), taps)
    hidden = int(target.args.hidden_size)
    eye = mx.eye(hidden, dtype=inner.norm.weight.dtype)
    draft.fc.weight = mx.concatenate([eye, eye], axis=1)
    if taps:  # starts reading the final features alone, as an untapped draft does
        zeros = mx.zeros((hidden, hidden * len(taps)), dtype=eye.dtype)
        draft.fuse.weight = mx.concatenate([zeros, eye], axis=1)
    mx.eval(draft.parameters())
    draft.eval()
    return draft


def chain_matches(
    draft: FeatureDraft, prompt: Sequence[int], output: Sequence[int], vocab: int | None = None
) -> list[tuple[bool, bool]]:
    """For each output position but the last, whether the draft's first token is right and
    whether its first two are, drafting as the engine does: the first from the target's
    features, the second from its own output feature (then that entry is trimmed)."""
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    tokens = list(prompt) + list(output)
    seq = mx.array(tokens[:-1])[None]
    features = draft.target_features(seq)
    cache = make_prompt_cache(draft)
    start = len(prompt) - 1  # the position that predicts output[0]
    if start > 1:  # entries 1 .. start - 1: the prompt, read at once
        draft.forward(features[:, : start - 1], seq[:, 1:start], cache)
    width = vocab or None
    out: list[tuple[bool, bool]] = []
    for j in range(start, len(tokens) - 2):
        if j == 0:  # no entry predicts the second token of a one-token prompt
            out.append((False, False))
            continue
        entry = draft.forward(features[:, j - 1 : j], seq[:, j : j + 1], cache)
        first = cast(int, mx.argmax(draft.head(entry)[0, -1, :width]).item())
        own = draft.forward(entry, mx.array([[tokens[j + 1]]]), cache)
        second = cast(int, mx.argmax(draft.head(own)[0, -1, :width]).item())
        trim_prompt_cache(cache, 1)
        right = first == tokens[j + 1]
        out.append((right, right and second == tokens[j + 2]))
    return out
