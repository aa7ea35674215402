"""``specd service install|uninstall|status``: a launchd user agent (macOS) or systemd user unit.

The templates live in ``launchd/`` and ``systemd/`` at the top of the source tree; they are
rendered with this install's absolute paths.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from daemon.config import Settings

LABEL = "com.specd.daemon"
UNIT = "specd.service"
ROOT = Path(__file__).resolve().parents[2]


class ServiceError(Exception):
    """The service files cannot be rendered or the service manager refused."""


@dataclass
class ServicePlan:
    """What install/uninstall/status would write and run."""

    manager: str  # "launchd" | "systemd"
    path: Path
    content: str | None
    commands: list[list[str]] = field(default_factory=list)
    log_dir: Path | None = None


def detect_manager() -> str:
    if sys.platform == "darwin":
        return "launchd"
    if sys.platform.startswith("linux"):
        return "systemd"
    raise ServiceError(f"no supported service manager on {sys.platform} (launchd or systemd)")


def program_arguments(config_file: Path | None, data_dir: Path | None) -> list[str]:
    """The absolute command line the service manager runs."""
    exe = Path(sys.executable).with_name("specd")
    args = [str(exe)] if exe.exists() else [sys.executable, "-m", "daemon"]
    args.append("serve")
    if config_file is not None:
        args += ["--config", str(config_file)]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    return args


def _template(name: str) -> str:
    path = ROOT / name
    try:
        return path.read_text()
    except OSError as e:
        raise ServiceError(
            f"service template {path} not found ({e.strerror}); "
            "install specd from a source checkout (make run)"
        ) from e


def _systemd_quote(arg: str) -> str:
    # systemd splits ExecStart like a shell with "..." quoting; % starts a specifier.
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def render_systemd(args: list[str]) -> str:
    text = _template("systemd/specd.service.in")
    return text.replace("@EXEC@", " ".join(_systemd_quote(a) for a in args)).replace(
        "@DOC@", str(ROOT / "README.md")
    )


def render_launchd(args: list[str], log_dir: Path) -> str:
    text = _template("launchd/com.specd.daemon.plist.in")
    program = "\n".join(f"        <string>{escape(a)}</string>" for a in args)
    values = {
        "@LABEL@": LABEL,
        "@PROGRAM_ARGUMENTS@": program,
        "@LOG_DIR@": escape(str(log_dir)),
        "@PATH@": escape(os.environ.get("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")),
        "@HOME@": escape(str(Path.home())),
    }
    for key, value in values.items():
        text = text.replace(key, value)
    return text


def plan(
    action: str,
    settings: Settings,
    config_file: Path,
    data_dir: Path | None,
    manager: str | None = None,
) -> ServicePlan:
    """Files and commands for ``action`` (install, uninstall, status)."""
    manager = manager or detect_manager()
    args = program_arguments(config_file, data_dir)
    if manager == "launchd":
        path = Path.home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        domain = f"gui/{os.getuid()}"
        content = render_launchd(args, settings.log_dir) if action == "install" else None
        commands = {
            "install": [
                ["launchctl", "bootout", f"{domain}/{LABEL}"],
                ["launchctl", "bootstrap", domain, str(path)],
            ],
            "uninstall": [["launchctl", "bootout", f"{domain}/{LABEL}"]],
            "status": [["launchctl", "print", f"{domain}/{LABEL}"]],
        }[action]
    elif manager == "systemd":
        path = (
            Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
            / "systemd"
            / "user"
            / UNIT
        )
        content = render_systemd(args) if action == "install" else None
        commands = {
            "install": [
                ["systemctl", "--user", "daemon-reload"],
                ["systemctl", "--user", "enable", "--now", UNIT],
            ],
            "uninstall": [
                ["systemctl", "--user", "disable", "--now", UNIT],
                ["systemctl", "--user", "daemon-reload"],
            ],
            "status": [["systemctl", "--user", "status", "--no-pager", UNIT]],
        }[action]
    else:
        raise ServiceError(f"unknown service manager {manager!r}")
    return ServicePlan(manager, path, content, commands, settings.log_dir)


def execute(p: ServicePlan, action: str, dry_run: bool) -> int:
    """Write/remove the file and run the commands (or print them with ``dry_run``)."""
    if dry_run:
        if p.content is not None:
            print(f"# would write {p.path}:\n{p.content}")
        elif action == "uninstall":
            print(f"# would remove {p.path}")
        for cmd in p.commands:
            print("# would run: " + shlex.join(cmd))
        return 0
    if action == "install":
        assert p.content is not None
        if p.log_dir is not None:
            p.log_dir.mkdir(parents=True, exist_ok=True)  # launchd will not create it
        p.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.path.with_suffix(".tmp")
        tmp.write_text(p.content)
        os.replace(tmp, p.path)
        print(f"wrote {p.path}")
    rc = 0
    for i, cmd in enumerate(p.commands):
        if shutil.which(cmd[0]) is None:
            raise ServiceError(f"{cmd[0]} not found: is {p.manager} running this session?")
        proc = subprocess.run(cmd, check=False)
        # launchctl bootout before bootstrap fails when the agent was not loaded: expected.
        tolerated = p.manager == "launchd" and action == "install" and i == 0
        if proc.returncode != 0 and not tolerated:
            rc = proc.returncode
            if action != "status":
                raise ServiceError(f"{shlex.join(cmd)} failed with exit code {rc}")
    if action == "uninstall" and p.path.exists():
        p.path.unlink()
        print(f"removed {p.path}")
    return rc
