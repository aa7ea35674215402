"""What MLX runs on, and the Linux OpenBLAS preload.

The ``mlx[cpu]`` wheel links a slow reference BLAS. When a system OpenBLAS is present, the
``specd`` entry point re-executes itself once with it in ``LD_PRELOAD``: same logits, ~10x faster
matrix multiplies. This module must not import ``mlx`` at import time, since the re-exec decision
is taken before MLX loads.
"""

from __future__ import annotations

import functools
import glob
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REEXEC_MARKER = "SPECD_BLAS_REEXEC"
OPENBLAS_CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/libopenblas.so.0",
)


def find_openblas() -> str | None:
    """Path of a system OpenBLAS shared library, if one is installed."""
    for pattern in OPENBLAS_CANDIDATES:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def openblas_preloaded() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def maybe_reexec_with_openblas(enabled: bool, argv: list[str], module: str = "daemon") -> None:
    """Re-exec this process (``python -m module argv``) once with OpenBLAS preloaded.

    Linux CPU backend only. Does nothing (returns) when disabled, not on Linux, already
    preloaded, already re-executed once, or no OpenBLAS is installed.
    """
    if not enabled or not sys.platform.startswith("linux"):
        return
    if openblas_preloaded() or os.environ.get(REEXEC_MARKER):
        return
    env = openblas_env(os.environ)
    if env is not None:
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def openblas_env(base: Mapping[str, str]) -> dict[str, str] | None:
    """A copy of ``base`` with the system OpenBLAS first in ``LD_PRELOAD`` and the re-exec
    marker set; None when no OpenBLAS is installed."""
    lib = find_openblas()
    if lib is None:
        return None
    env = dict(base)
    env[REEXEC_MARKER] = "1"
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    return env


def loaded_blas() -> str:
    """Which BLAS the process actually has mapped (Linux: from /proc/self/maps)."""
    if sys.platform == "darwin":
        return "accelerate"
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return "unknown"
    libs = set()
    for line in maps.read_text().splitlines():
        parts = line.split()
        # numpy bundles its own (symbol-prefixed) OpenBLAS, which MLX never calls.
        if len(parts) >= 6 and "blas" in parts[-1] and "scipy_openblas" not in parts[-1]:
            libs.add(parts[-1])
    for lib in sorted(libs):
        if "openblas" in lib:
            return f"openblas ({lib})"
    return f"reference ({', '.join(sorted(libs))})" if libs else "bundled"


@functools.cache
def backend_info() -> dict[str, Any]:
    """MLX device and BLAS, for start-up logs and /status. ``device`` is "gpu" on Metal and
    on CUDA (``mlx[cuda]``): the CPU-only choices (dequantizing, float32) key on it."""
    import mlx.core as mx

    metal = bool(mx.metal.is_available()) if hasattr(mx, "metal") else False
    cuda = bool(mx.cuda.is_available()) if hasattr(mx, "cuda") else False
    device = "gpu" if (metal or cuda) and mx.default_device() == mx.gpu else "cpu"
    return {
        "mlx_version": getattr(mx, "__version__", "unknown"),  # not in mlx's type stub
        "device": device,
        "metal": metal,
        "cuda": cuda,
        "blas": loaded_blas() if device == "cpu" else ("metal" if metal else "cuda"),
    }


def release_freed_memory() -> None:
    """Give memory MLX freed back to the operating system: MLX's buffer cache, then (glibc)
    the malloc arenas, which otherwise keep freed CPU buffers resident (measured: 727 MB
    resident after offloading the embedded pair, 144 MB after ``malloc_trim``)."""
    import ctypes
    import ctypes.util

    import mlx.core as mx

    mx.clear_cache()
    if sys.platform.startswith("linux"):
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
        except OSError:
            libc = None
        trim = getattr(libc, "malloc_trim", None)
        if trim is not None:  # glibc only
            trim(0)


def free_memory_bytes() -> int:
    """Memory this machine can still give the model: on Metal the GPU's recommended working
    set less what MLX holds; on the CPU what the OS reports available (Linux
    ``MemAvailable``, else free pages)."""
    import mlx.core as mx

    if mx.default_device() == mx.gpu:
        info = mx.device_info()
        limit = info.get("max_recommended_working_set_size") or info.get("memory_size", 0)
        if limit:
            return max(0, int(limit) - int(mx.get_active_memory()))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError):
        return int(mx.device_info().get("memory_size", 0))


# --- launched as a group (mlx.launch; daemon.core.distributed) ---

# Environment variables launchers set: mlx.launch (ring, jaccl), mpirun.
RANK_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
LAUNCH_VARIABLES = (
    *RANK_VARIABLES,
    "MLX_HOSTFILE",
    "MLX_WORLD_SIZE",
    "MLX_IBV_DEVICES",
    "MLX_JACCL_COORDINATOR",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
)


def launch_rank() -> int | None:
    """This process's rank as a launcher set it, or None when not launched as a group."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return None


def launcher_free_environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the launcher's variables: a child process (training) must not try to
    join the group."""
    return {k: v for k, v in env.items() if k not in LAUNCH_VARIABLES}
