"""``specd models ...``: the models a daemon serves, and model files a person manages."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from daemon.config import (
    ConfigError,
    ConfigSources,
    Settings,
    default_config_file,
    drop_in_dir,
    load_settings,
)
from daemon.durable import atomic_write
from daemon.errors import DaemonError
from daemon.ops.client import DaemonClient

# `specd models add` writes one drop-in per model; a running daemon picks it up live
DROP_IN_PREFIX = "60-model-"


def run_list(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd models list``: the served models (models.target first) as configured, and, when
    the daemon runs, whether each is loaded and its adapter version."""
    live: dict[str, dict[str, Any]] = {}
    client = DaemonClient.find(settings)
    if client is not None:
        try:
            live = {m["id"]: m for m in client.request("GET", "/v1/models", timeout=10)["data"]}
        except (DaemonError, KeyError, TypeError) as e:
            print(f"(the daemon did not list its models: {e})")
    from daemon.core.models import discover_models

    settings = settings.with_models(discover_models(settings))  # as the daemon serves them
    rows = [("name", "target", "loaded", "adapter")]
    for name in settings.models.names():
        m, state = settings.models.entry(name), live.get(name)
        loaded = "-" if state is None else ("yes" if state.get("loaded") else "no")
        adapter = "-" if state is None else f"v{state.get('adapter_version') or 0}"
        rows.append((name, m.target, loaded, adapter))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    if client is None:
        print("(no daemon running for this data dir: loaded and adapter unknown)")
    return 0


def run_import_gguf(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd models import-gguf GGUF OUTDIR [--overwrite]``."""
    from daemon.core.gguf import import_gguf

    out = import_gguf(args.gguf, args.outdir, overwrite=args.overwrite)
    print(f"imported {args.gguf} -> {out}")
    return 0


def model_drop_in(sources: ConfigSources, name: str) -> Path:
    """The drop-in ``specd models add NAME`` writes (``conf.d/60-model-NAME.yaml``)."""
    main = sources.main_file or default_config_file()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"
    return drop_in_dir(main) / f"{DROP_IN_PREFIX}{slug}.yaml"


def _indices(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{text!r}: not a comma-separated list of layer indices") from None


def run_add(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd models add NAME PATH_OR_REPO [--draft D] [--draft-layers L] [--feature-layers L]``:
    a drop-in that serves the model by NAME; a running daemon adds it live, the others
    untouched."""
    name = args.name.strip()
    if name in settings.models.names():
        raise ConfigError(f"models: {name!r} is served already")
    entry: dict[str, Any] = {"target": args.target}
    if args.draft is not None:  # layer-skip is the config's null
        entry["draft"] = None if args.draft == "layer-skip" else args.draft
    if args.draft_layers is not None:
        entry["draft_layers"] = _indices(args.draft_layers)
    if args.feature_layers is not None:
        entry["feature_layers"] = _indices(args.feature_layers)
    path = model_drop_in(sources, name)
    if path.exists():
        raise ConfigError(f"{path} exists already; `specd models remove {name}` first")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"models": {"targets": {name: entry}}}, indent=2) + "\n"  # JSON is YAML
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    try:  # the files as a daemon would read them: a bad entry is removed, with the reason
        load_settings(sources.main_file, {"paths.data_dir": str(settings.paths.data_dir)})
    except ConfigError:
        path.unlink(missing_ok=True)
        raise
    print(f"{name}: {args.target} (wrote {path}; a running daemon serves it now)")
    return 0


def run_remove(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd models remove NAME``: delete the drop-in ``models add`` wrote for it."""
    name = args.name
    if name == settings.models.target:
        raise ConfigError(f"{name!r} is models.target: change models.target instead")
    path = model_drop_in(sources, name)
    if not path.exists():
        where = sources.origin.get(f"models.targets.{name}.target")
        if name in settings.models.targets:
            raise ConfigError(
                f"{name!r} was not added by `specd models add`; "
                f"it is set in {where or 'the config'}: edit it there"
            )
        raise ConfigError(f"no model {name!r}; served: {', '.join(settings.models.names())}")
    path.unlink()
    print(f"{name}: removed {path} (a running daemon stops serving it now)")
    return 0


def run_pull(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd models pull REPO [--name NAME]``: download an MLX model from Hugging Face
    (mlx-lm's download; a local directory is taken as it is), then `run_add` it."""
    from mlx_lm.utils import _download

    local = Path(args.repo).expanduser()
    if local.is_dir():
        target = str(local.resolve())
    else:
        print(f"downloading {args.repo} ...")
        _download(args.repo)  # into the Hugging Face cache, where mlx_lm.load finds it
        target = args.repo
    args.name = args.name or Path(args.repo.rstrip("/")).name
    args.target = target
    return run_add(args, settings, sources)
