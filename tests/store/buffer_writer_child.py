"""Helper process for test_buffer's SIGKILL test (not a test module).

Usage: ``python tests/buffer_writer_child.py DB_PATH``. Submits records to a `BufferWriter` forever
(at most 32 in flight) and prints each record's row id on its own line, flushed, as soon as its
future resolves, i.e. once the record is committed. The parent kills it with SIGKILL.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from daemon.config import BufferSettings  # noqa: E402
from daemon.core.records import Rejection  # noqa: E402
from daemon.logging import configure_logging  # noqa: E402
from daemon.store.buffer import BufferRecord, BufferWriter  # noqa: E402


def make_record(i: int) -> BufferRecord:
    rejections = [
        Rejection(
            position=p,
            context_length=40 + p,
            draft_token=1000 + p,
            draft_prob=0.5,
            target_token=2000 + p,
            top_ids=list(range(p, p + 20)),
            top_logprobs=[-0.1 * k for k in range(20)],
        )
        for p in range(0, 120, 12)
    ]
    return BufferRecord(
        prompt_text=f"child prompt {i}",
        prompt_tokens=list(range(40)),
        output_text=f"child output {i} " * 20,
        output_tokens=list(range(i, i + 120)),
        stats={"drafted": 120, "accepted": 60, "acceptance_rate": 0.5},
        rejections=rejections,
        target_id="target",
        draft_id="draft",
    )


def main() -> None:
    configure_logging("warning", console="json")  # stdout carries only the committed ids
    writer = BufferWriter(sys.argv[1], BufferSettings(max_records=1_000_000)).start()
    in_flight = threading.Semaphore(32)

    def committed(fut) -> None:  # runs on the writer thread, after COMMIT
        in_flight.release()
        if fut.exception() is None:
            sys.stdout.write(f"{fut.result()}\n")
            sys.stdout.flush()
        else:
            print(f"error: {fut.exception()}", file=sys.stderr, flush=True)

    i = 0
    while True:
        in_flight.acquire()
        writer.submit(make_record(i)).add_done_callback(committed)
        i += 1


if __name__ == "__main__":
    main()
