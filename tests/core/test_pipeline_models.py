"""A split by layers works for the mlx-lm families it claims (llama, qwen2, qwen3, gemma 1-3,
phi3, starcoder2, olmo2, cohere, internlm3): tiny models split across 2 and 3 ranks on
loopback give exactly the whole model's logits over a prefill, steps, a verify step and a
trim, sliding-window layers included (tests/core/pipeline_check.py does the work)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.core.pipeline_check import TYPES
from tests.helpers import clean_env

LAUNCH = Path(sys.executable).parent / "mlx.launch"
BOUND_S = 120.0

pytestmark = pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed")


@pytest.mark.parametrize("counts", ["3,3", "1,2,3"])
def test_each_family_split_by_layers_gives_the_whole_model_s_logits(counts: str) -> None:
    ranks = len(counts.split(","))
    root = Path(__file__).resolve().parents[2]
    cmd = [str(LAUNCH), "--backend", "ring", "-n", str(ranks), "--hosts", "127.0.0.1", "--"]
    cmd += [sys.executable, "-m", "tests.core.pipeline_check", counts]
    out = subprocess.run(
        cmd, cwd=root, env=clean_env(), capture_output=True, text=True, timeout=BOUND_S
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("OK ", "MISMATCH "))]
    assert [ln.split()[1] for ln in lines] == TYPES, out.stdout[-2000:] + out.stderr[-2000:]
    assert all(ln.startswith("OK ") for ln in lines), lines
