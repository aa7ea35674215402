"""``specd service install|uninstall|status``: a launchd user agent (macOS) or systemd user unit.

Both are rendered with this install's absolute paths (the ``specd`` executable, config file,
data dir). The launchd agent is a dict written with `plistlib`, so every path is escaped by the
library. The systemd unit is a template, ``daemon/ops/templates/specd.service.in``, shipped as
package data so that a plain wheel install can render it. The file itself lives in the package,
and ``systemd/specd.service.in`` at the top of the tree is a symlink to it (for people browsing
the tree): the wheel then never depends on how a build treats symlinks. ``launchd/README.md``
says where the agent comes from.

Install also writes a starter ``config.yaml`` (every key with its default, commented; the
package's ``templates/config.yaml``, which ``configs/config.yaml`` links to) where the daemon
will look for it, unless ``--config`` names another file or one exists already: a new user has
a file to edit and a ``conf.d/`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from daemon.config import ConfigSources, Settings, default_config_file, drop_in_dir
from daemon.errors import ServiceError

LABEL = "com.specd.daemon"
UNIT = "specd.service"
SYSTEMD_TEMPLATE = "templates/specd.service.in"  # package data of daemon.ops
STARTER_CONFIG = "templates/config.yaml"


@dataclass
class ServicePlan:
    """What install/uninstall/status would write and run."""

    manager: str  # "launchd" | "systemd"
    path: Path
    content: str | None
    commands: list[list[str]] = field(default_factory=list)
    log_dir: Path | None = None
    starter_config: Path | None = None  # written (install) when no config file exists there


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
    try:
        return resources.files(__package__).joinpath(name).read_text()
    except OSError as e:
        raise ServiceError(
            f"service template {name} missing from the specd package ({e}); reinstall specd"
        ) from e


def _documentation() -> str | None:
    # A source checkout has the README beside the package; a wheel install has none, and the
    # unit then goes without a Documentation= line rather than point at a missing file.
    readme = Path(__file__).resolve().parents[2] / "README.md"
    return f"file://{readme}" if readme.is_file() else None


def _systemd_quote(arg: str) -> str:
    # systemd splits ExecStart like a shell with "..." quoting; % starts a specifier.
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def group_environment(rank: int | None, hostfile: Path | None) -> dict[str, str]:
    """The variables that make ``specd serve`` rank ``rank`` of the group in ``hostfile``
    (MLX's ring hostfile: one list of "address:port" per rank, as mlx.launch writes it), so
    each machine's service manager runs (and restarts) its own rank; {} for neither."""
    if rank is None and hostfile is None:
        return {}
    if rank is None or hostfile is None:
        raise ServiceError("--group-rank and --hostfile go together")
    try:
        hosts = json.loads(hostfile.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ServiceError(f"hostfile {hostfile}: {e}") from None
    if not (
        isinstance(hosts, list)
        and len(hosts) >= 2
        and all(
            isinstance(h, list) and h and all(isinstance(a, str) and ":" in a for a in h)
            for h in hosts
        )
    ):
        raise ServiceError(
            f'hostfile {hostfile}: expected a JSON list with one list of "address:port" '
            'per rank, e.g. [["192.168.1.10:5000"], ["192.168.1.11:5000"]]'
        )
    if not 0 <= rank < len(hosts):
        raise ServiceError(f"--group-rank {rank}: {hostfile} has ranks 0..{len(hosts) - 1}")
    return {"MLX_HOSTFILE": str(hostfile.resolve()), "MLX_RANK": str(rank)}


def render_systemd(args: list[str], env: dict[str, str] | None = None) -> str:
    text = _template(SYSTEMD_TEMPLATE)
    doc = _documentation()
    if doc is None:
        text = "".join(line for line in text.splitlines(keepends=True) if "@DOC@" not in line)
    extra = "".join(f"\nEnvironment={_systemd_quote(f'{k}={v}')}" for k, v in (env or {}).items())
    text = text.replace("Environment=PYTHONUNBUFFERED=1", "Environment=PYTHONUNBUFFERED=1" + extra)
    return text.replace("@EXEC@", " ".join(_systemd_quote(a) for a in args)).replace(
        "@DOC@", doc or ""
    )


def render_launchd(args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> str:
    agent = {
        "Label": LABEL,
        "ProgramArguments": args,
        "RunAtLoad": True,
        # Restart only after a failure: a clean exit (specd stopped on purpose) stays down.
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 30,
        "ExitTimeOut": 90,
        "StandardOutPath": f"{log_dir}/specd.stdout.log",
        "StandardErrorPath": f"{log_dir}/specd.stderr.log",
        "EnvironmentVariables": {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin:/usr/sbin:/sbin"),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        },
        "WorkingDirectory": str(Path.home()),
        # Standard: not throttled like Background, since users wait on its answers.
        "ProcessType": "Standard",
    }
    return plistlib.dumps(agent, sort_keys=False).decode()


def plan(
    action: str,
    settings: Settings,
    config_file: Path | None,
    data_dir: Path | None,
    manager: str | None = None,
    env: dict[str, str] | None = None,
) -> ServicePlan:
    """Files and commands for ``action`` (install, uninstall, status); ``env`` adds
    variables to the service's environment (`group_environment`)."""
    manager = manager or detect_manager()
    args = program_arguments(config_file, data_dir)
    if manager == "launchd":
        path = Path.home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        domain = f"gui/{os.getuid()}"
        content = render_launchd(args, settings.log_dir, env) if action == "install" else None
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
        content = render_systemd(args, env) if action == "install" else None
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
    starter = None
    if action == "install" and config_file is None and not default_config_file().exists():
        starter = default_config_file()
    return ServicePlan(manager, path, content, commands, settings.log_dir, starter)


def execute(p: ServicePlan, action: str, dry_run: bool) -> int:
    """Write/remove the file and run the commands (or print them with ``dry_run``)."""
    if dry_run:
        if p.starter_config is not None:
            print(f"# would write a starter config (every key, commented) to {p.starter_config}")
        if p.content is not None:
            print(f"# would write {p.path}:\n{p.content}")
        elif action == "uninstall":
            print(f"# would remove {p.path}")
        for cmd in p.commands:
            print("# would run: " + shlex.join(cmd))
        return 0
    if action == "install" and p.starter_config is not None and not p.starter_config.exists():
        drop_in_dir(p.starter_config).mkdir(parents=True, exist_ok=True)
        tmp = p.starter_config.with_suffix(".tmp")
        tmp.write_text(_template(STARTER_CONFIG))
        os.replace(tmp, p.starter_config)
        print(f"wrote a starter config (every key with its default) to {p.starter_config}")
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


def run(args: argparse.Namespace, settings: Settings, sources: ConfigSources) -> int:
    """``specd service install|uninstall|status [--dry-run]``."""
    config = args.config.expanduser().resolve() if args.config else None
    data_dir = args.data_dir.expanduser().resolve() if args.data_dir else None
    hostfile = args.hostfile.expanduser() if args.hostfile else None
    env = group_environment(args.group_rank, hostfile)
    p = plan(args.action, settings, config, data_dir, manager=args.manager, env=env)
    return execute(p, args.action, args.dry_run)
