"""The parts of `daemon.core.distributed` and `daemon.serving.distributed` that need no
group: what a launcher's environment says, how a target that does not split is refused, and
which settings a group fixes (tests/serving/test_distributed.py runs real groups)."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from daemon.config import load_settings
from daemon.core.backend import launch_rank, launcher_free_environment
from daemon.core.distributed import Group, GroupInfo
from daemon.core.split import shard_target
from daemon.errors import DistributedError
from daemon.serving.distributed import fit_settings
from tests.helpers import clean_env, tiny_model, write_hostfile


def test_launch_rank_and_the_training_child_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launch_rank() is None
    monkeypatch.setenv("MLX_RANK", "1")
    assert launch_rank() == 1
    env = {"MLX_RANK": "1", "MLX_HOSTFILE": "/h.json", "PATH": "/bin", "HOME": "/h"}
    assert launcher_free_environment(env) == {"PATH": "/bin", "HOME": "/h"}


def test_a_target_that_does_not_split_is_refused_naming_the_shape() -> None:
    model = tiny_model()  # 4 attention heads, 2 KV heads
    group = Group(handle=None, info=GroupInfo(3, 0, "ring", ["a", "b", "c"]))
    with pytest.raises(DistributedError, match=r"num_attention_heads 4.*not divisible by 3"):
        shard_target(model, group, "tensor")


def test_a_group_fixes_what_it_cannot_mirror_and_says_so(tmp_path) -> None:
    settings, _ = load_settings(None, {"paths.data_dir": str(tmp_path)})
    settings = settings.model_copy(
        update={"models": settings.models.model_copy(update={"keep_alive_seconds": 60.0})}
    )
    with capture_logs() as logs:
        fitted = fit_settings(settings)
    assert fitted.server.batch_size == 1
    assert fitted.server.prompt_cache_size == settings.server.prompt_cache_size  # mirrored
    assert fitted.models.keep_alive_seconds is None
    assert settings.server.batch_size == 8  # the original is untouched
    fixed = {e["key"]: e for e in logs if e["event"] == "fixed_in_distributed_mode"}
    assert set(fixed) == {"server.batch_size", "models.keep_alive_seconds"}
    assert fixed["server.batch_size"]["asked"] == 8 and fixed["server.batch_size"]["used"] == 1
    with capture_logs() as logs:
        assert fit_settings(fitted) == fitted  # nothing left to fix, nothing logged
    assert not logs


def test_a_rank_that_cannot_reach_its_group_fails_instead_of_serving_alone(tmp_path) -> None:
    import subprocess
    import sys

    hostfile = write_hostfile(tmp_path / "hosts.json", 2)  # nobody listens on either port
    code = (
        "from daemon.core.distributed import detect_group\n"
        "from daemon.errors import DistributedError\n"
        "try:\n    detect_group()\nexcept DistributedError as e:\n    print(e)\n"
    )
    env = clean_env(MLX_HOSTFILE=str(hostfile), MLX_RANK="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert "rank 1 could not join its group (ring" in out.stdout, out.stdout + out.stderr
