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
    from daemon.adaptation.synthetic import SynthesisReport, synthesize
    from daemon.core.models import load_model
    from daemon.store.record import BufferRecord

    if args.rows < 1:
        raise ConfigError("--rows must be at least 1")
    max_output = args.max_tokens or settings.data.max_output_length
    target_id = settings.models.target
    target, tokenizer, _, _, _ = load_model(target_id, settings)
    with ReplayBuffer(settings.paths.data_dir, settings.buffer) as buf:
        report = SynthesisReport(seen=buf.synthetic_requests(target_id))
        # a later run samples on from where the rows already stored leave off
        seed = args.seed if args.seed is not None else len(report.seen)
        limit = settings.data.max_prompt_length
        # by default like the traffic stored (measured to teach more), general without any
        like = (
            [] if args.like_traffic is False else _traffic(buf, target_id, args.rows, seed, limit)
        )
        if args.like_traffic and not like:
            raise ConfigError(
                f"--like-traffic: the buffer holds no train row of real traffic for "
                f"{target_id} of at most {limit} tokens (data.max_prompt_length)"
            )
        bar = tqdm(total=args.rows, disable=args.quiet, file=sys.stderr, unit="row")
        try:
            batches = synthesize(
                target,
                tokenizer,
                args.rows,
                max_output=max_output,
                stop_tokens=list(tokenizer.eos_token_ids or ()),
                seed=seed,
                like=like,
                report=report,
            )
            for batch in batches:
                buf.add(
                    BufferRecord.synthetic(
                        r.request, r.prompt_tokens, r.output_text, r.output_tokens, target_id
                    )
                    for r in batch
                )
                bar.update(len(batch))
        except ValueError as e:
            raise ConfigError(f"warmup with {target_id}: {e}") from e
        finally:
            bar.close()
        pending = buf.pending_failure_count()
    print(
        f"warmup: {report.rows} rows ({report.answer_tokens} answer tokens, "
        f"{report.tokens_per_s:.1f} tokens/s); {report.requests_sampled} requests sampled, "
        f"{report.dropped} dropped (unfinished, too short or repeated"
        + (f"; {report.copied} copies of the request shown)" if like else ")")
    )
    print(
        f"written after {len(like)} stored requests of real traffic"
        if like
        else "written after the chat template alone (general requests: no traffic stored)"
    )
    print(
        f"pending failures in the buffer: {pending} "
        f"(training starts at {settings.training.min_failure_cases} and "
        f"{settings.training.min_holdout_rows} held-out rows of real traffic)"
    )
    return 0


def _traffic(
    buf: ReplayBuffer, target: str, n: int, seed: int, limit: int
) -> list[tuple[list[int], list[int]]]:
    """Train rows users sent, shown to the target as an earlier turn: up to ``n`` at random
    (by ``seed``: a later run is shown others, or in another order), each at most ``limit``
    tokens whole (`data.max_prompt_length`: a longer one makes sampling slow). Never a
    holdout row, never a row no user sent."""
    return [
        (r.prompt_tokens, r.output_tokens)
        for r in buf.for_target(target).sample_replay(n, seed=seed, traffic_only=True)
        if len(r.prompt_tokens) + len(r.output_tokens) <= limit
    ]
