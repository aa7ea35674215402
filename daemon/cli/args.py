"""What ``specd``'s commands share on the command line: the common options, the prompt-file
options of the benchmarks, and the argument types that check a value as it is parsed."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.config import TRAINING_LOSSES

if TYPE_CHECKING:
    # what `add_subparsers` returns: each command module adds its parsers to it
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

DRAFT_HELP = (
    "auto (the default: a feature draft where the target allows one), feature, layer-skip, "
    "or a draft model's directory or HF repo id"
)


def common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common options")
    g.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="main config file (default: $SPECD_CONFIG or the platform config dir); "
        "drop-ins are read from conf.d/ next to it",
    )
    g.add_argument(
        "--data-dir",
        type=Path,
        metavar="PATH",
        help="where the daemon keeps its buffer, adapters, imported models and logs",
    )


def loss_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in TRAINING_LOSSES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown loss {', '.join(bad) or repr(text)}; expected some of "
            f"{', '.join(TRAINING_LOSSES)}"
        )
    return names


def _counts(text: str, what: str) -> list[int]:
    try:
        counts = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}")
    return counts


def rank_list(text: str) -> list[int]:
    return _counts(text, "rank counts like 1,2")


def row_counts(text: str) -> list[int]:
    return sorted(set(_counts(text, "failure-case counts like 50,100")))


def split_list(text: str) -> list[str]:
    splits = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in splits if t not in ("auto", "tensor", "pipeline")]
    if not splits or bad:
        raise argparse.ArgumentTypeError(
            f"expected splits among auto, tensor, pipeline (like tensor,pipeline); got {text!r}"
        )
    return splits


def size_list(text: str) -> list[int]:
    return _counts(text, "record counts like 1000,10000")


def repetitions(text: str) -> int:
    what = "a number of repetitions, at least 1"
    counts = _counts(text, what)
    if len(counts) != 1:
        raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}")
    return counts[0]


def parse_date(text: str) -> float:
    import datetime as dt

    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid date {text!r}: use ISO format, e.g. 2026-11-01 or 2026-11-01T12:00"
        ) from None
    return when.timestamp()


def prompt_args(
    p: argparse.ArgumentParser, limit: int, max_tokens: int, required: bool = True
) -> None:
    p.add_argument(
        "--prompts",
        type=Path,
        required=required,
        metavar="FILE.jsonl",
        help="JSON Lines, one object per line with 'prompt' or 'messages'",
    )
    p.add_argument("--limit", type=int, default=limit, help=f"prompts to use (default {limit})")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=max_tokens,
        help=f"new tokens per prompt (default {max_tokens})",
    )
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
