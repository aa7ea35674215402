"""``specd warmup``: the target writes requests and answers them, and the buffer keeps both as
train rows for the draft to learn from (`daemon.adaptation.synthetic`).

It writes straight to the data dir's buffer (SQLite: safe beside a running daemon, whose loop
finds the rows pending at its next check). It loads its own copy of the target.
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from daemon.config import ConfigSources, Settings
from daemon.errors import ConfigError
from daemon.store.buffer import ReplayBuffer


def run(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    from daemon.adaptation.synthetic import write_rows
    from daemon.core.models import load_model

    if args.rows < 1:
        raise ConfigError("--rows must be at least 1")
    target_id = settings.models.target
    target, tokenizer, _, _, _ = load_model(target_id, settings)
    with ReplayBuffer(settings.paths.data_dir, settings.buffer) as buf:
        bar = tqdm(total=args.rows, disable=args.quiet, file=sys.stderr, unit="row")
        try:
            # like the traffic stored by default (measured to teach more), general without
            report = write_rows(
                buf,
                target,
                tokenizer,
                target_id,
                args.rows,
                max_output=args.max_tokens or settings.data.max_output_length,
                max_prompt=settings.data.max_prompt_length,
                like_traffic=args.like_traffic,
                seed=args.seed,
                on_batch=bar.update,
            )
        except ValueError as e:
            raise ConfigError(f"warmup with {target_id}: {e}") from e
        finally:
            bar.close()
        pending = buf.pending_failure_count()
    print(
        f"warmup: {report.rows} rows ({report.answer_tokens} answer tokens, "
        f"{report.tokens_per_s:.1f} tokens/s); {report.requests_sampled} requests sampled, "
        f"{report.dropped} dropped (unfinished, too short or repeated"
        + (f"; {report.copied} copies of the request shown)" if report.shown else ")")
    )
    print(
        f"written after {report.shown} stored requests of real traffic, answers up to "
        f"{report.max_output} tokens (the longest answer shown)"
        if report.shown
        else "written after the chat template alone (general requests: no traffic stored)"
    )
    print(
        f"pending failures in the buffer: {pending} "
        f"(training starts at {settings.training.min_failure_cases} and "
        f"{settings.training.min_holdout_rows} held-out rows of real traffic)"
    )
    return 0
