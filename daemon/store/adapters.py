"""The adapter format and store: numbered LoRA adapter versions of the draft, and applying one.

An adapter is a directory in mlx-lm's format, `ADAPTER_CONFIG` + `ADAPTER_WEIGHTS` (the file
names are defined here only). `save_adapter` writes one from a model's trainable (LoRA)
parameters; ``mlx_lm.load(model_dir, adapter_path=...)`` and `load_adapter_dir` (mlx-lm's
``load_adapters``) apply it, the latter fused for serving (`fuse_adapter`). A feature draft's
version (``fine_tune_type: feature``) uses the same two files for the whole draft's weights.

Layout under ``<data_dir>/adapters``::

    v0001/adapter_config.json  adapters.safetensors  manifest.json
    v0002/...
    current            the version in service ("0" = no adapter), replaced atomically

Every version keeps its manifest (parent version, metrics before/after, data counts, config
hash, sha256 of the weights, time, status ``installed`` or ``rejected``). Installing writes a
temporary directory, fsyncs it, renames it into place, then moves the ``current`` pointer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.durable import atomic_write, atomic_write_json, fsync_dir, fsync_file, sha256_file
from daemon.errors import AdapterError, AdapterNotFoundError, ModelLoadError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
_VERSION_DIR = re.compile(r"^v(\d{4,})$")


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of the settings a version was trained with."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            fsync_file(p)
    fsync_dir(path)


@dataclass
class AdapterVersion:
    version: int
    path: Path
    manifest: dict[str, Any]

    @property
    def status(self) -> str:
        return str(self.manifest.get("status", "unknown"))

    @property
    def heldout_agreement(self) -> float | None:
        """Its held-out agreement after training (the gate's figure)."""
        return (self.manifest.get("metrics_after") or {}).get("agreement")

    @property
    def expected_speedup(self) -> float | None:
        """Its expected speedup over the target (gate: speed; None where not computed)."""
        speed = (self.manifest.get("gate") or {}).get("speed") or {}
        return (speed.get("after") or {}).get("speedup")

    def summary(self) -> VersionSummary:
        m = self.manifest
        return VersionSummary(
            version=self.version,
            status=self.status,
            created=m.get("created"),
            parent=m.get("parent"),
            gate=m.get("gate"),
            heldout_agreement=self.heldout_agreement,
            expected_speedup=self.expected_speedup,
        )


@dataclass
class VersionSummary:
    """A stored version as ``specd adapters list`` and ``GET /admin/adapters`` show it."""

    version: int
    status: str
    created: float | None
    parent: int | None
    gate: dict[str, Any] | None
    heldout_agreement: float | None
    expected_speedup: float | None


@dataclass
class AdapterListing:
    """The store's versions and the one in service (0: none)."""

    current: int
    versions: list[VersionSummary]


@dataclass
class Rollback:
    """What a rollback did: the version serving before and the one serving now."""

    previous_version: int
    adapter_version: int


class AdapterStore:
    """Numbered adapter versions with an atomic ``current`` pointer."""

    def __init__(self, root: Path, keep: int = 5) -> None:
        self.root = Path(root)
        self.keep = keep

    @classmethod
    def for_data_dir(cls, data_dir: Path, keep: int = 5) -> AdapterStore:
        return cls(Path(data_dir) / "adapters", keep)

    # --- reading ---------------------------------------------------------------------------

    def versions(self) -> list[AdapterVersion]:
        """All stored versions, oldest first (a version without a readable manifest is skipped)."""
        out: list[AdapterVersion] = []
        if not self.root.is_dir():
            return out
        for p in self.root.iterdir():
            m = _VERSION_DIR.match(p.name)
            if not m or not p.is_dir():
                continue
            try:
                manifest = json.loads((p / "manifest.json").read_text())
            except (OSError, ValueError):
                continue
            out.append(AdapterVersion(int(m.group(1)), p, manifest))
        return sorted(out, key=lambda v: v.version)

    def get(self, version: int) -> AdapterVersion:
        for v in self.versions():
            if v.version == version:
                return v
        raise AdapterNotFoundError(f"no adapter version {version} in {self.root}")

    def current_version(self) -> int:
        """The version in service; 0 means the plain draft."""
        try:
            return int((self.root / "current").read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except ValueError as e:
            raise AdapterError(f"{self.root / 'current'}: not a version number") from e

    def current(self) -> AdapterVersion | None:
        v = self.current_version()
        return self.get(v) if v else None

    def verify(self, version: AdapterVersion) -> None:
        """The files exist and the weights match the manifest's checksum."""
        for name in ADAPTER_FILES:
            if not (version.path / name).is_file():
                raise AdapterError(f"adapter v{version.version}: {name} is missing")
        expected = version.manifest.get("sha256")
        actual = sha256_file(version.path / ADAPTER_WEIGHTS)
        if expected != actual:
            raise AdapterError(
                f"adapter v{version.version}: checksum mismatch for {ADAPTER_WEIGHTS} "
                f"(manifest {str(expected)[:12]}..., file {actual[:12]}...)"
            )

    # --- writing ---------------------------------------------------------------------------

    def add(
        self, adapter_dir: Path, manifest: dict[str, Any], install: bool, point: bool = True
    ) -> AdapterVersion:
        """Store the adapter in ``adapter_dir`` as the next version.

        ``install`` marks it installed and (with ``point``) moves the ``current`` pointer to
        it; otherwise it is kept as rejected. A live daemon passes ``point=False`` and moves
        the pointer once the swap has succeeded, so ``current`` never names a draft that is
        not serving.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        for name in ADAPTER_FILES:
            if not (Path(adapter_dir) / name).is_file():
                raise AdapterError(f"{adapter_dir}: {name} is missing; not an mlx-lm adapter")
        existing = [v.version for v in self.versions()]
        number = max([*existing, self.current_version(), 0]) + 1
        tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root))
        try:
            for name in ADAPTER_FILES:
                shutil.copy2(Path(adapter_dir) / name, tmp / name)
            manifest = {
                **manifest,
                "version": number,
                "parent": self.current_version(),
                "sha256": sha256_file(tmp / ADAPTER_WEIGHTS),
                "created": time.time(),
                "status": "installed" if install else "rejected",
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
            _fsync_tree(tmp)
            final = self.root / f"v{number:04d}"
            os.rename(tmp, final)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        version = AdapterVersion(number, final, manifest)
        if install and point:
            self.set_current(number)
        self.prune()
        return version

    def set_current(self, version: int) -> None:
        """Point ``current`` at ``version`` (0 = no adapter), atomically."""
        if version:
            self.verify(self.get(version))
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / ".current.tmp"
        with tmp.open("w") as f:
            f.write(f"{version}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / "current")
        fsync_dir(self.root)

    def prune(self) -> list[int]:
        """Keep the newest ``keep`` versions (and always the current one)."""
        current = self.current_version()
        versions = self.versions()
        removed = []
        for v in versions[: max(0, len(versions) - self.keep)]:
            if v.version != current:
                shutil.rmtree(v.path, ignore_errors=True)
                removed.append(v.version)
        return removed

    def rollback_target(self, version: int | None) -> int:
        """The version a rollback goes to: ``version`` if given, else the installed version
        before the current one (0 when there is none)."""
        if version is not None:
            if version:
                v = self.get(version)
                if v.status != "installed":
                    raise AdapterError(
                        f"adapter v{version} was {v.status}; only installed "
                        "versions can be put back in service"
                    )
            return version
        current = self.current_version()
        older = [
            v.version for v in self.versions() if v.status == "installed" and v.version < current
        ]
        return older[-1] if older else 0


def apply_adapter(draft_factory: Any, version: AdapterVersion | None) -> Any:
    """A fresh draft (from ``draft_factory()``) with ``version``'s weights applied, fused
    (`load_adapter_dir`).

    Shapes and names are checked by mlx-lm's ``load_adapters``; a mismatch raises
    `AdapterError` and the caller keeps the draft in service.
    """
    if version is None:
        return draft_factory()
    return load_adapter_dir(draft_factory, version.path, f"adapter v{version.version}")


def adapter_head(path: str | os.PathLike[str]) -> list[int] | None:
    """The token ids of the pruned draft head an adapter was trained with (kept in its config
    as ``specd.head_tokens``), or None when it was trained with the full head."""
    config = read_adapter_config(path)
    meta = config.get("specd")
    ids = meta.get("head_tokens") if isinstance(meta, dict) else None
    if ids is None:
        return None
    if not isinstance(ids, list) or not ids or not all(type(t) is int and t >= 0 for t in ids):
        raise AdapterError(
            f"{Path(path) / ADAPTER_CONFIG}: specd.head_tokens must be a non-empty list of "
            "token ids"
        )
    return ids


def load_adapter_dir(
    draft_factory: Any, path: Path, name: str | None = None, fuse: bool = True
) -> Any:
    """A fresh draft (from ``draft_factory()``) with the mlx-lm adapter in ``path`` applied;
    `AdapterError` (naming ``name`` or the path) when it is missing or does not fit. An
    adapter trained with a pruned head gets that head (``draft_factory(head=ids)``).

    With ``fuse`` (the default; what is served) every LoRA layer is merged into a plain layer
    (`fuse_adapter`), so the draft costs per token what the bare draft does; ``fuse=False``
    keeps mlx-lm's LoRA modules. The adapter files are untouched either way."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters

    label = name or f"adapter {path}"
    try:
        head = adapter_head(path)
    except AdapterError as e:
        raise AdapterError(f"{label} does not fit the draft: {e}") from e
    # a feature version holds a whole draft of its own kind (`daemon.core.feature_draft`)
    config = read_adapter_config(path)
    feature = is_feature_adapter(config)
    # a version made before taps existed read the final features alone
    kind = {"features": True, "taps": _taps_of(config, label)} if feature else {}
    try:
        draft = draft_factory(**kind) if head is None else draft_factory(head=head, **kind)
    except ModelLoadError as e:
        raise AdapterError(f"{label} does not fit this target's draft: {e}") from e
    try:
        if feature:
            load_feature_weights(draft, path)
        else:
            load_adapters(draft, str(path))
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise AdapterError(f"{name or f'adapter {path}'} does not fit the draft: {e}") from e
    if fuse and not feature:
        fuse_adapter(draft)
    draft.eval()
    mx.eval(draft.parameters())
    return draft


def _is_adapter_layer(module: Any) -> bool:
    """An mlx-lm adapter layer (LoRA/DoRA linear, switch linear or embedding): the classes
    that define ``fuse`` (looked up on the class: a child module named ``fuse`` is no match)."""
    return callable(getattr(type(module), "fuse", None))


def fuse_adapter(model: Any) -> int:
    """Replace each adapter layer of ``model`` by the plain layer it computes (mlx-lm's
    ``fuse``, as ``mlx_lm.fuse`` does), in place; returns how many were fused.

    Quantized layers stay quantized (re-quantized with their own group size and bits, so
    their output moves by up to one quantization step); float layers match the unfused
    output up to rounding. The fused weights are new arrays (``W + scale * B^T A^T``): the
    arrays the bare draft shares with the target are neither modified nor aliased, apart from
    a layer's unchanged bias, which is shared as before."""
    from mlx.utils import tree_unflatten

    fused = [
        (n, m.fuse(dequantize=False)) for n, m in model.named_modules() if _is_adapter_layer(m)
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    left = [n for n, m in model.named_modules() if _is_adapter_layer(m)]
    if left:  # a LoRA layer inside another one: cannot happen with mlx-lm's conversion
        raise AdapterError(f"adapter layers left unfused: {', '.join(left)}")
    return len(fused)


def read_adapter_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mlx-lm adapter config (``fine_tune_type``, ``num_layers``, ``lora_parameters``) of
    the adapter directory ``path``; `AdapterError` when it is missing or unreadable."""
    file = Path(path) / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{file}: cannot read the adapter config: {e}") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{file}: not an adapter config")
    return config


def save_adapter(
    model: Any,
    out_dir: str | os.PathLike[str],
    config: dict[str, Any],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save ``model``'s trainable (LoRA) parameters, or all of a feature draft's (some may
    have been frozen in training), and ``config`` (the mlx-lm adapter config, with
    ``metadata`` under ``"specd"``) as an adapter directory in mlx-lm's format.

    Each file is replaced atomically; the weights are written first, so a reader that finds the
    config finds the weights too.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    whole = config.get("fine_tune_type") == FEATURE_ADAPTER
    weights = dict(tree_flatten(model.parameters() if whole else model.trainable_parameters()))
    atomic_write(out / ADAPTER_WEIGHTS, lambda p: mx.save_safetensors(str(p), weights))
    atomic_write_json(out / ADAPTER_CONFIG, {**config, **({"specd": metadata} if metadata else {})})
    return out


FEATURE_ADAPTER = "feature"  # fine_tune_type of a feature draft's version (whole weights)


def feature_adapter_config(draft: Any) -> dict[str, Any]:
    """The config a feature draft's version carries: its kind and shape; the weights file
    holds the whole draft (projection, layer, norm), not a low-rank update."""
    return {
        "fine_tune_type": FEATURE_ADAPTER,
        "num_layers": len(draft.layers),
        "embed_scale": draft.embed_scale,
        "taps": list(draft.taps),
    }


def _taps_of(config: dict[str, Any], label: str) -> list[int]:
    taps = config.get("taps", [])
    if not isinstance(taps, list) or not all(isinstance(t, int) for t in taps):
        raise AdapterError(f"{label}: adapter_config.json taps must be a list of layer indices")
    return taps


def is_feature_adapter(config: dict[str, Any]) -> bool:
    return config.get("fine_tune_type") == FEATURE_ADAPTER


def load_feature_weights(draft: Any, path: Path) -> None:
    """Put a feature version's weights into a fresh feature draft; every array must be there
    with its shape (`ValueError` otherwise)."""
    import mlx.core as mx

    weights = mx.load(str(Path(path) / ADAPTER_WEIGHTS))
    if not isinstance(weights, dict):
        raise ValueError(f"{ADAPTER_WEIGHTS} holds no named arrays")
    draft.load_weights(list(weights.items()), strict=True)
    config = read_adapter_config(path)
    if "embed_scale" in config:
        draft.embed_scale = float(config["embed_scale"])
