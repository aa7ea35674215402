"""The Linux OpenBLAS preload gives the same logits as MLX's bundled BLAS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from daemon.core.backend import REEXEC_MARKER, find_openblas
from tests.helpers import HANG_GUARD_S

SCRIPT = """
import sys
import mlx.core as mx
import numpy as np
from mlx_lm.models.llama import Model, ModelArgs
from daemon.core.backend import loaded_blas

mx.random.seed(0)
args = ModelArgs(model_type="llama", hidden_size=256, num_hidden_layers=2, intermediate_size=512,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=1000)
model = Model(args)
model.set_dtype(mx.float32)
tokens = mx.array([list(range(1, 200, 3))])
logits = model(tokens)
np.save(sys.argv[1], np.array(logits))
print(loaded_blas())
"""


def run_logits(out: Path, preload: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", REEXEC_MARKER)}
    if preload:
        env["LD_PRELOAD"] = preload
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        check=True,
    )
    return proc.stdout.strip()


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or find_openblas() is None,
    reason="needs Linux with a system OpenBLAS (CI installs libopenblas0-pthread)",
)
def test_openblas_logits_match_bundled_blas(tmp_path: Path) -> None:
    lib = find_openblas()
    blas_plain = run_logits(tmp_path / "plain.npy", None)
    blas_open = run_logits(tmp_path / "open.npy", lib)
    assert "openblas" not in blas_plain
    assert blas_open.startswith("openblas")
    plain, fast = np.load(tmp_path / "plain.npy"), np.load(tmp_path / "open.npy")
    assert plain.shape == fast.shape
    np.testing.assert_allclose(fast, plain, atol=1e-3, rtol=1e-4)
    # Same greedy choice everywhere the top two logits are not near-tied.
    top2 = np.sort(plain, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 1e-2
    assert (plain.argmax(-1)[clear] == fast.argmax(-1)[clear]).all()


@pytest.mark.parametrize(
    ("metal", "cuda", "default", "device", "blas"),
    [
        (False, True, "gpu", "gpu", "cuda"),  # mlx[cuda]: a GPU, not the CPU backend
        (True, False, "gpu", "gpu", "metal"),
        (False, False, "cpu", "cpu", None),
        (False, True, "cpu", "cpu", None),  # CUDA present, the CPU chosen
    ],
)
def test_backend_info_names_the_device_mlx_runs_on(
    monkeypatch: pytest.MonkeyPatch,
    metal: bool,
    cuda: bool,
    default: str,
    device: str,
    blas: str | None,
) -> None:
    """On CUDA the device is the GPU, so the CPU-only choices (dequantize, float32) are off."""
    import mlx.core as mx

    from daemon.core import backend, models

    monkeypatch.setattr(mx.metal, "is_available", lambda: metal)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu if default == "gpu" else mx.cpu)
    backend.backend_info.cache_clear()
    try:
        info = backend.backend_info()
        assert info["device"] == device
        assert info["cuda"] is cuda and info["metal"] is metal
        if blas is not None:
            assert info["blas"] == blas
        assert models._should_dequantize("auto") is (device == "cpu")
    finally:
        backend.backend_info.cache_clear()
