"""Data-parallel LoRA training (`Trainer(group=...)`): two ranks taking one example each per
step end where one process ends accumulating both, step for step. The ranks run as two
processes joined by MLX's ring backend over loopback, bounded in time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from tests.helpers import clean_env, write_hostfile

BOUND_S = 120
REPO = Path(__file__).resolve().parents[2]


def test_two_ranks_train_like_one_process_accumulating(tmp_path: Path) -> None:
    child = [sys.executable, "-m", "tests.adaptation.dp_child"]
    alone = tmp_path / "alone.safetensors"
    subprocess.run([*child, str(alone)], env=clean_env(), check=True, timeout=BOUND_S, cwd=REPO)

    hostfile = write_hostfile(tmp_path / "hosts.json", 2)
    together = tmp_path / "together.safetensors"
    procs = [
        subprocess.Popen(
            [*child, str(together)],
            env=clean_env(MLX_HOSTFILE=str(hostfile), MLX_RANK=str(r)),
            cwd=REPO,
        )
        for r in range(2)
    ]
    try:
        assert [p.wait(BOUND_S) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    a = mx.load(str(alone))
    b = mx.load(str(together))
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_allclose(np.array(a[name]), np.array(b[name]), rtol=1e-4, atol=1e-6)
    initial_moved = any(float(mx.abs(a[n]).max()) > 0 for n in a if "lora_b" in n)
    assert initial_moved  # two steps changed the adapter (lora_b starts at zero)
