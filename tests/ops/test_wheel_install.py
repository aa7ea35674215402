"""`specd service install` from a plain (non-editable) wheel install: templates are package data."""

from __future__ import annotations

import importlib.util
import os
import plistlib
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[2]


def _can_build_wheels() -> bool:
    # Offline, without build isolation: setuptools >= 70.1 has bdist_wheel, older needs `wheel`.
    return any(
        importlib.util.find_spec(name) is not None
        for name in ("setuptools.command.bdist_wheel", "wheel")
    )


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD_S, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.skipif(not _can_build_wheels(), reason="needs setuptools>=70.1 or wheel to build")
def test_service_install_dry_run_from_a_wheel(tmp_path: Path) -> None:
    # Build from a copy, so the build leaves no build/ or egg-info in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(REPO / "daemon", src / "daemon", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(dist), str(src)]
    )
    (wheel,) = dist.glob("specd-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    purelib = Path(
        _run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).stdout.strip()
    )
    # The dependencies (mlx, pydantic, ...) from this venv, without network. A path line in a
    # .pth does not run that directory's own .pth files, so the editable specd stays inactive.
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q"]
        + ["--no-deps", "--no-index", str(wheel)]
    )

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("SPECD_")}
    elsewhere = tmp_path / "cwd"  # not the checkout: nothing may come from the source tree
    elsewhere.mkdir()
    where = _run([str(py), "-c", "import daemon; print(daemon.__file__)"], cwd=elsewhere, env=env)
    assert Path(where.stdout.strip()).is_relative_to(venv)

    (tmp_path / "c.yaml").write_text("")
    common = ["--config", str(tmp_path / "c.yaml"), "--data-dir", str(tmp_path / "data")]
    specd = str(venv / "bin" / "specd")
    unit = _run(
        [specd, "service", "install", "--dry-run", "--manager", "systemd", *common],
        cwd=elsewhere,
        env=env,
    ).stdout
    assert "# would write" in unit and "Type=notify" in unit
    exec_line = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_line.startswith(f'ExecStart="{specd}" "serve"')
    assert "@" not in unit.replace("@PLACEHOLDERS@", "")  # every placeholder filled

    agent = _run(
        [specd, "service", "install", "--dry-run", "--manager", "launchd", *common],
        cwd=elsewhere,
        env=env,
    ).stdout
    plist = agent[agent.index("<?xml") : agent.index("</plist>") + len("</plist>")]
    assert plistlib.loads(plist.encode())["ProgramArguments"][:2] == [specd, "serve"]
    assert not (tmp_path / "data").exists()
    # the status page's files are package data too (daemon.serving.api.page serves them)
    listed = _run(
        [
            str(py),
            "-c",
            "from importlib import resources; print(' '.join(sorted(p.name for p in "
            "(resources.files('daemon.serving.api') / 'static').iterdir())))",
        ],
        cwd=elsewhere,
        env=env,
    ).stdout.split()
    from daemon.serving.api.page import STATIC_FILES

    assert set(listed) == {"index.html", *STATIC_FILES}
