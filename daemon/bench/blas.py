"""``specd bench blas``: MLX's bundled BLAS against the system OpenBLAS, in two processes."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import mlx.nn as nn

from daemon.bench.common import decode_step_seconds
from daemon.bench.report import print_table, write_json
from daemon.config import ConfigSources, Settings
from daemon.core.models import load_pair


def blas_probe(target: nn.Module, prompt_tokens: int = 256, decode_steps: int = 32) -> dict:
    """Prefill and decode timings of ``target`` in this process (whatever BLAS it has)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from daemon.core.backend import loaded_blas

    tokens = mx.array([[(7 * i) % 1000 + 100 for i in range(prompt_tokens)]])
    mx.eval(target(tokens[:, :16]))  # warm-up
    cache = make_prompt_cache(target)
    t0 = time.perf_counter()
    mx.eval(target(tokens, cache=cache))
    prefill = time.perf_counter() - t0
    step = decode_step_seconds(target, context=prompt_tokens, steps=decode_steps)
    return {
        "blas": loaded_blas(),
        "prefill_tokens_per_s": prompt_tokens / prefill,
        "decode_tokens_per_s": 1.0 / step,
    }


def bench_blas(argv_base: list[str]) -> dict[str, Any]:
    """The same probe in two child processes: MLX's bundled BLAS, then the system OpenBLAS."""
    import os
    import subprocess
    import sys

    from daemon.core.backend import REEXEC_MARKER, find_openblas

    lib = find_openblas()
    if lib is None:
        raise RuntimeError(
            "no system OpenBLAS found (Debian: apt-get install libopenblas0-pthread)"
        )
    rows: dict[str, Any] = {}
    for name, preload in (("bundled", None), ("openblas", lib)):
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", REEXEC_MARKER)}
        env["SPECD_MODELS__PRELOAD_OPENBLAS"] = "false"  # no re-exec: exactly this environment
        if preload:
            env["LD_PRELOAD"] = preload
        out = subprocess.run(
            [sys.executable, "-m", "daemon", *argv_base, "--probe"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        rows[f"{key.split('_')[0]}_speedup"] = rows["openblas"][key] / rows["bundled"][key]
    return rows


def run(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd bench blas``: runs itself twice as ``bench blas --probe`` children."""
    if args.probe:  # the child: one measurement in this process's environment
        print(json.dumps(blas_probe(load_pair(settings).target)))
        return 0
    base = ["bench", "blas"]
    if args.config:
        base += ["--config", str(args.config)]
    base += ["--data-dir", str(settings.paths.data_dir)]
    result = bench_blas(base)
    rows = {k: v for k, v in result.items() if isinstance(v, dict)}
    print_table(rows, ["blas", "prefill_tokens_per_s", "decode_tokens_per_s"])
    print(
        f"OpenBLAS speed-up: prefill {result['prefill_speedup']:.1f}x, "
        f"decode {result['decode_speedup']:.1f}x"
    )
    write_json(args.json, result)
    return 0
