"""``specd buffer stats|export|purge``: the replay buffer, read and trimmed by a person."""

from __future__ import annotations

import argparse
import json

from daemon.config import ConfigSources, Settings
from daemon.errors import ConfigError
from daemon.ops.status import format_time
from daemon.store.buffer import ReplayBuffer, buffer_path


def open_buffer(settings: Settings) -> ReplayBuffer:
    """The data dir's existing buffer, opened; a `ConfigError` when there is none yet."""
    path = buffer_path(settings.paths.data_dir)
    if not path.exists():
        raise ConfigError(f"{path}: no replay buffer yet (serve or collect some requests first)")
    return ReplayBuffer(path, settings.buffer, create=False).open()


def run_stats(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd buffer stats [--json]``."""
    with open_buffer(settings) as buf:
        st = buf.stats()
    if args.json:
        print(json.dumps(st.to_dict(), indent=2))
        return 0
    print(f"buffer: {st.path} ({st.size_bytes / 1e6:.2f} MB, schema v{st.schema_version})")
    print(
        f"records: {st.records} / {st.max_records}  (train {st.train}, "
        f"holdout {st.holdout})  from {format_time(st.oldest)} to {format_time(st.newest)}"
    )
    print(
        f"failure cases: {st.failures}  (train {st.train_failures}, "
        f"holdout {st.holdout_failures})  used for training: {st.used_for_training}"
    )
    print(
        f"pending failures: {st.pending_failures}  "
        f"(training starts at {settings.training.min_failure_cases})"
    )
    if st.acceptance_trend:
        print("acceptance trend (oldest -> newest):")
        for b in st.acceptance_trend:
            rate = b.token_acceptance
            rate_s = "-" if rate is None else f"{rate:.3f}"
            print(f"  {format_time(b.start)}  {b.records:>5} requests  acceptance {rate_s}")
    for a in st.acceptance_by_adapter:
        m = a.mean_acceptance
        print(
            f"adapter v{a.adapter_version}: {a.records} requests, mean acceptance "
            f"{'-' if m is None else f'{m:.3f}'}"
        )
    return 0


def run_export(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd buffer export --jsonl OUT``: every record, with the text decoded."""
    from daemon.core.models import load_tokenizer  # MLX: only this action needs it

    tokenizer = load_tokenizer(settings.models.target, settings.models_dir)
    with open_buffer(settings) as buf:
        n = buf.export_jsonl(args.jsonl, decode=tokenizer.decode)
    print(f"exported {n} records to {args.jsonl}")
    return 0


def run_purge(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd buffer purge --before DATE | --all``."""
    with open_buffer(settings) as buf:
        n = buf.purge(None if args.all else args.before)
    print(
        f"purged {n} records" + ("" if args.all else f" created before {format_time(args.before)}")
    )
    return 0
