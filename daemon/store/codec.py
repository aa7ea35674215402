"""A `BufferRecord` as one row of the buffer's ``records`` table, and back.

Token-id lists and the per-rejection arrays (positions, draft/target tokens, the target's top-k
ids and log-probs) are packed little-endian int32/float32 blobs, so a record costs one row however
long its output or top-k is. The engine's statistics are stored as JSON, with the few numbers the
buffer queries by (drafted, accepted, acceptance rate) copied into their own columns.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from array import array
from collections.abc import Iterable
from typing import Any

from daemon.config import BufferSettings
from daemon.core.records import Rejection, is_failure_case
from daemon.store.record import (
    SPLITS,
    BufferRecord,
    DraftCounts,
    assign_split,
    draft_evidence,
    stats_acceptance_rate,
)
from daemon.store.schema import COLUMNS

_I32 = next(c for c in "ilh" if array(c).itemsize == 4)
_SWAP = sys.byteorder != "little"


def _pack(code: str, values: Iterable[Any]) -> bytes:
    conv = float if code == "f" else int
    a = array(code, [conv(v) for v in values])
    if _SWAP:
        a.byteswap()
    return a.tobytes()


def _unpack(code: str, blob: bytes | None) -> list[Any]:
    a = array(code)
    if blob:
        a.frombytes(blob)
        if _SWAP:
            a.byteswap()
    return a.tolist()


def pack_ids(ids: Iterable[int]) -> bytes:
    """Token ids as a little-endian int32 blob."""
    return _pack(_I32, ids)


def unpack_ids(blob: bytes | None) -> list[int]:
    return _unpack(_I32, blob)


def _pack_floats(values: Iterable[float]) -> bytes:
    return _pack("f", values)


def _unpack_floats(blob: bytes | None) -> list[float]:
    return _unpack("f", blob)


def _json_default(obj: Any) -> Any:
    for conv in (int, float):  # numpy / mlx scalars
        try:
            value = conv(obj)
        except (TypeError, ValueError):
            continue
        if value == obj:
            return value
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def encode_record(
    record: BufferRecord, settings: BufferSettings
) -> tuple[tuple[Any, ...], str, bool]:
    """Insert parameters for ``record`` (`daemon.store.schema.INSERT`) plus its split and
    failure flag, decided here unless the record already carries them."""
    stats = dict(record.stats or {})
    counts = DraftCounts.from_stats(stats)
    rejections = list(record.rejections or ())
    split = record.split or assign_split(record.prompt_text, settings.holdout_fraction)
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'holdout', not {split!r}")
    failure = record.is_failure
    if failure is None:
        failure = is_failure_case(
            *draft_evidence(counts, len(rejections)), settings.failure_threshold
        )
    top_k: list[int] = []
    top_ids: list[int] = []
    top_lp: list[float] = []
    for r in rejections:
        ids, lps = list(r.top_ids), list(r.top_logprobs)
        if len(ids) != len(lps):
            raise ValueError(
                f"rejection at position {r.position}: {len(ids)} top ids but {len(lps)} log-probs"
            )
        top_k.append(len(ids))
        top_ids += ids
        top_lp += lps
    params = (
        float(record.created),
        str(record.target_id),
        str(record.draft_id),
        int(record.adapter_version or 0),
        str(record.prompt_text),
        pack_ids(record.prompt_tokens),
        str(record.output_text),
        pack_ids(record.output_tokens),
        json.dumps(stats, default=_json_default),
        counts.drafted,
        counts.accepted,
        stats_acceptance_rate(counts),
        len(rejections),
        split,
        int(bool(failure)),
        record.used_for_training,
        pack_ids(r.position for r in rejections),
        pack_ids(r.context_length for r in rejections),
        pack_ids(r.draft_token for r in rejections),
        _pack_floats(r.draft_prob for r in rejections),
        pack_ids(r.target_token for r in rejections),
        pack_ids(top_k),
        pack_ids(top_ids),
        _pack_floats(top_lp),
    )
    return params, split, bool(failure)


def decode_row(row: sqlite3.Row | tuple[Any, ...]) -> BufferRecord:
    """The record of a row selected with `daemon.store.schema.SELECT`."""
    r = dict(zip(COLUMNS, row, strict=True))
    positions = unpack_ids(r["rej_position"])
    contexts = unpack_ids(r["rej_context_length"])
    drafts = unpack_ids(r["rej_draft_token"])
    probs = _unpack_floats(r["rej_draft_prob"])
    targets = unpack_ids(r["rej_target_token"])
    counts = unpack_ids(r["rej_top_k"])
    top_ids = unpack_ids(r["rej_top_ids"])
    top_lp = _unpack_floats(r["rej_top_logprobs"])
    rejections = []
    start = 0
    for i, k in enumerate(counts):
        rejections.append(
            Rejection(
                position=positions[i],
                context_length=contexts[i],
                draft_token=drafts[i],
                draft_prob=probs[i],
                target_token=targets[i],
                top_ids=top_ids[start : start + k],
                top_logprobs=top_lp[start : start + k],
            )
        )
        start += k
    return BufferRecord(
        prompt_text=r["prompt_text"],
        prompt_tokens=unpack_ids(r["prompt_tokens"]),
        output_text=r["output_text"],
        output_tokens=unpack_ids(r["output_tokens"]),
        stats=json.loads(r["stats"]),
        rejections=rejections,
        target_id=r["target_id"],
        draft_id=r["draft_id"],
        adapter_version=r["adapter_version"],
        created=r["created"],
        id=r["id"],
        split=r["split"],
        is_failure=bool(r["is_failure"]),
        used_for_training=r["used_for_training"],
    )
