"""Service integration pieces: launchd/systemd files, sd_notify, `specd logs`, config reloads."""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.config import Settings, load_settings
from daemon.errors import ServiceError
from daemon.ops.install import plan
from daemon.ops.logview import format_record, parse_since, show_logs
from daemon.serving import notify
from daemon.serving import reload as reload_mod
from daemon.serving.reload import ConfigReloader, needs_restart, settings_diff
from tests.helpers import HANG_GUARD_S, wait_until


def test_launchd_plist_renders_and_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home with space"))
    settings = Settings()
    cfg = tmp_path / "cfg & <odd>" / "config.yaml"
    p = plan("install", settings, cfg, tmp_path / "data", manager="launchd")
    assert p.path.name == "com.specd.daemon.plist"
    assert p.content is not None
    doc = plistlib.loads(p.content.encode())
    assert doc["Label"] == "com.specd.daemon"
    args = doc["ProgramArguments"]
    assert Path(args[0]).is_absolute()
    assert args[args.index("--config") + 1] == str(cfg)  # escaped in XML, exact once parsed
    assert args[args.index("--data-dir") + 1] == str(tmp_path / "data")
    assert doc["RunAtLoad"] is True
    assert doc["KeepAlive"] == {"SuccessfulExit": False}  # restart only on failure
    assert doc["ThrottleInterval"] > 0
    assert doc["StandardOutPath"].startswith(str(settings.log_dir))
    assert doc["StandardErrorPath"].startswith(str(settings.log_dir))
    assert "PATH" in doc["EnvironmentVariables"]
    assert doc["ProcessType"] == "Standard"
    assert p.commands[-1][:2] == ["launchctl", "bootstrap"]


def test_systemd_unit_renders_and_verifies(tmp_path: Path) -> None:
    p = plan("install", Settings(), tmp_path / "my config" / "config.yaml", None, "systemd")
    assert p.content is not None
    assert "Type=notify" in p.content
    assert "Restart=on-failure" in p.content
    assert "WantedBy=default.target" in p.content
    exec_line = next(line for line in p.content.splitlines() if line.startswith("ExecStart="))
    assert f'"{tmp_path / "my config" / "config.yaml"}"' in exec_line
    assert p.commands[-1] == ["systemctl", "--user", "enable", "--now", "specd.service"]
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    unit = tmp_path / "specd.service"
    unit.write_text(p.content)
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    # verify exits 0 even for ignored lines; anything it says about our file is a problem.
    problems = [line for line in proc.stderr.splitlines() if str(unit) in line]
    assert proc.returncode == 0 and not problems, proc.stderr


def test_service_dry_run_prints_and_changes_nothing(tmp_path: Path, capsys) -> None:
    (tmp_path / "c.yaml").write_text("")
    rc = main(
        [
            "service",
            "install",
            "--dry-run",
            "--manager",
            "systemd",
            "--config",
            str(tmp_path / "c.yaml"),
            "--data-dir",
            str(tmp_path / "d"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "# would write" in out and "Type=notify" in out
    assert "# would run: systemctl --user enable --now specd.service" in out
    assert not (tmp_path / "d").exists()


def test_sd_notify_sends_to_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False  # not under systemd: nothing to do
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify.ready("serving on 127.0.0.1:1") is True
        msg = server.recv(4096).decode()
    assert "READY=1" in msg.splitlines()
    assert "STATUS=serving on 127.0.0.1:1" in msg.splitlines()


def _log_line(event: str, component: str = "server", **kw) -> str:
    return json.dumps(
        {
            "timestamp": "2026-11-25T10:00:00Z",
            "level": "info",
            "event": event,
            "component": component,
            **kw,
        }
    )


def test_logs_pretty_prints_and_filters(tmp_path: Path, capsys) -> None:
    log = tmp_path / "data" / "logs" / "specd.log"
    log.parent.mkdir(parents=True)
    log.write_text(
        "\n".join(
            [
                _log_line("ready"),
                _log_line("train_step", "training", step=3, loss=2.5, grad_norm=0.8, lr=1e-4),
                "not json at all",
                _log_line("request_finished", "api", acceptance_rate=0.5),
            ]
        )
        + "\n"
    )
    assert main(["logs", "--data-dir", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4
    assert "ready" in out[0] and "INFO" in out[0]
    assert "train_step" in out[1] and "loss=2.5" in out[1] and "grad_norm=0.8" in out[1]
    assert main(["logs", "--data-dir", str(tmp_path / "data"), "--training"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "train_step" in out[0]
    assert main(["logs", "--data-dir", str(tmp_path / "data"), "--since", "1h"]) == 0
    assert capsys.readouterr().out.count("\n") == 1  # only the line without a timestamp


def test_parse_since() -> None:
    assert parse_since("10m", now=1000.0) == 400.0
    assert parse_since("2h", now=10_000.0) == 2800.0
    assert parse_since("2026-11-25T10:00:00+00:00") == 1795600800.0
    with pytest.raises(ValueError, match="invalid --since"):
        parse_since("yesterday")
    assert "loss=2.5" in format_record(json.loads(_log_line("x", loss=2.5)))


def test_logs_follow_survives_rotation(tmp_path: Path) -> None:
    log = tmp_path / "specd.log"
    log.write_text(_log_line("old") + "\n")
    lines: list[str] = []

    class Sink:
        def write(self, s: str) -> None:
            lines.extend(x for x in s.splitlines() if x)

        def flush(self) -> None:
            pass

    t = threading.Thread(
        target=show_logs, args=(log,), kwargs={"follow": True, "out": Sink()}, daemon=True
    )
    t.start()

    def wait_for(word: str) -> None:
        wait_until(lambda: any(word in line for line in lines), f"{word!r} in {lines}")

    wait_for("old")
    with log.open("a") as f:
        f.write(_log_line("appended") + "\n")
    wait_for("appended")
    log.rename(tmp_path / "specd.log.1")  # logrotate / newsyslog
    log.write_text(_log_line("after_rotation") + "\n")
    wait_for("after_rotation")
    order = [next(i for i, line in enumerate(lines) if w in line) for w in ("old", "appended")]
    assert order == sorted(order) and "after_rotation" in lines[-1]  # in order, nothing lost


def test_settings_diff_and_restart_keys() -> None:
    a = Settings()
    b = a.model_copy(deep=True)
    b.server.port = 9999
    b.training.lora.rank = 4
    b.logging.level = "debug"
    assert settings_diff(a, b) == ["logging.level", "server.port", "training.lora.rank"]
    assert needs_restart("server.port") and needs_restart("models.target")
    assert not needs_restart("server.api_key") and not needs_restart("training.lora.rank")


def test_reloader_follows_drop_ins(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("training:\n  min_failure_cases: 10\n")
    settings, _ = load_settings(cfg)
    applied: list[tuple[Settings, list[str]]] = []
    event = threading.Event()

    def apply(new: Settings, keys: list[str]) -> None:
        applied.append((new, keys))
        event.set()

    r = ConfigReloader(cfg, {}, settings, apply, debounce=0.2)
    r.start()
    conf_d = tmp_path / "conf.d"
    try:

        def expect(keys: list[str]) -> Settings:
            assert event.wait(HANG_GUARD_S), f"no reload for {keys}"
            event.clear()
            new, got = applied[-1]
            assert got == keys
            return new

        (conf_d / "10-a.yaml").write_text("sampling:\n  temperature: 0.5\n")  # created
        assert expect(["sampling.temperature"]).sampling.temperature == 0.5
        (conf_d / "10-a.yaml").write_text("sampling:\n  temperature: 0.7\n")  # modified
        assert expect(["sampling.temperature"]).sampling.temperature == 0.7
        tmp = conf_d / ".20-b.yaml.swp"  # an editor saving by rename
        tmp.write_text("buffer:\n  failure_threshold: 0.5\n")
        tmp.rename(conf_d / "20-b.yaml")
        assert expect(["buffer.failure_threshold"]).buffer.failure_threshold == 0.5
        (conf_d / "10-a.yaml").unlink()  # deleted
        assert expect(["sampling.temperature"]).sampling.temperature == 0.0
        n, refused = len(applied), r.rejected
        (conf_d / "30-bad.yaml").write_text("server:\n  queue_size: lots\n")
        wait_until(lambda: r.rejected > refused, "the invalid drop-in refused")
        assert len(applied) == n  # invalid: the previous settings stay in force
        assert r.current.buffer.failure_threshold == 0.5
        (conf_d / "30-bad.yaml").unlink()
        cfg.write_text("training:\n  min_failure_cases: 20\n")  # the main file too
        assert expect(["training.min_failure_cases"]).training.min_failure_cases == 20
    finally:
        r.stop()


def test_keys_that_need_a_restart_keep_their_running_values(tmp_path: Path) -> None:
    """A reload installs the files' live keys only: models.*, paths.* and the rest that wait
    for a restart keep the values the daemon started with (listed as pending until then), so
    nothing reading the settings later follows a model or directory it does not serve."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(json.dumps({"models": {"target": "/served"}, "sampling": {"max_tokens": 5}}))
    started, _ = load_settings(cfg)
    applied: list[tuple[Settings, list[str]]] = []
    r = ConfigReloader(cfg, {}, started, lambda new, keys: applied.append((new, keys)))

    edit = {"models": {"target": "/other"}, "paths": {"data_dir": str(tmp_path / "elsewhere")}}
    cfg.write_text(json.dumps({**edit, "sampling": {"max_tokens": 9}}))
    assert r.reload()
    new, keys = applied[-1]
    assert keys == ["sampling.max_tokens"] and new.sampling.max_tokens == 9
    assert new.models.target == "/served" and new.paths.data_dir == started.paths.data_dir
    assert r.current == new
    assert r.pending_restart == ["models.target", "paths.data_dir"]

    # a restart key alone: nothing to apply, still pending; reverted: no longer pending
    cfg.write_text(json.dumps({**edit, "sampling": {"max_tokens": 9}, "server": {"port": 1}}))
    assert r.reload() and len(applied) == 1
    assert r.pending_restart == ["models.target", "paths.data_dir", "server.port"]
    cfg.write_text(json.dumps({"models": {"target": "/served"}, "sampling": {"max_tokens": 9}}))
    assert r.reload() and r.pending_restart == [] and len(applied) == 1


def test_reloads_are_serialised(tmp_path: Path, monkeypatch) -> None:
    """SIGHUP (main thread) and a file event (timer thread) can reload at the same moment: one
    waits for the other, so neither installs settings built against stale ones."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text("sampling:\n  max_tokens: 5\n")
    settings, _ = load_settings(cfg)
    inside, most = [0], [0]
    lock = threading.Lock()

    def slow_load(*args, **kwargs):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            threading.Event().wait(0.3)
            return load_settings(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(reload_mod, "load_settings", slow_load)
    r = ConfigReloader(cfg, {}, settings, lambda new, keys: None)
    cfg.write_text("sampling:\n  max_tokens: 6\n")
    threads = [threading.Thread(target=r.reload) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD_S)
    assert r.reloads == 2 and most[0] == 1


def test_reload_rejects_invalid_and_logs_file_and_key(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    cfg = tmp_path / "config.yaml"
    cfg.write_text("")
    settings, _ = load_settings(cfg)
    r = ConfigReloader(cfg, {}, settings, lambda new, keys: None)
    (tmp_path / "conf.d").mkdir()
    bad = tmp_path / "conf.d" / "50-x.yaml"
    bad.write_text("speculative:\n  max_draft_tokens: 0\n")
    with capture_logs() as logs:
        assert r.reload() is False
    err = next(e for e in logs if e["event"] == "config_reload_rejected")
    assert str(bad) in err["error"] and "speculative.max_draft_tokens" in err["error"]
    bad.write_text("server:\n  port: 9999\n")
    with capture_logs() as logs:
        assert r.reload() is True
    assert any(e["event"] == "config_needs_restart" and e["keys"] == ["server.port"] for e in logs)
    assert os.path.exists(bad)


def test_install_writes_a_starter_config_where_the_daemon_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from daemon.config import Settings, load_settings
    from daemon.ops.install import execute, plan

    config = tmp_path / "xdg" / "specd" / "config.yaml"
    monkeypatch.setenv("SPECD_CONFIG", str(config))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    p = plan("install", Settings(), None, tmp_path / "d", manager="systemd")
    assert p.starter_config == config
    execute(p, "install", dry_run=True)
    assert "would write a starter config" in capsys.readouterr().out and not config.exists()
    p.commands = []  # no systemctl here: the files alone
    execute(p, "install", dry_run=False)
    assert config.is_file() and (config.parent / "conf.d").is_dir()
    settings, _ = load_settings(config)  # every key at its default
    assert settings.model_dump(exclude={"paths"}) == Settings().model_dump(exclude={"paths"})
    config.write_text("server:\n  port: 9\n")  # the user's own file is never replaced
    assert plan("install", Settings(), None, None, manager="systemd").starter_config is None
    assert (
        plan("install", Settings(), tmp_path / "c.yaml", None, manager="systemd").starter_config
        is None
    )


def test_service_for_a_group_rank_sets_the_launch_variables(tmp_path: Path) -> None:
    from daemon.ops.install import group_environment

    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([["10.0.0.1:5000"], ["10.0.0.2:5000"]]))
    env = group_environment(1, hostfile)
    assert env == {"MLX_HOSTFILE": str(hostfile.resolve()), "MLX_RANK": "1"}
    unit = plan("install", Settings(), None, None, "systemd", env=env).content
    assert unit is not None and f'Environment="MLX_HOSTFILE={hostfile.resolve()}"' in unit
    assert 'Environment="MLX_RANK=1"' in unit
    agent = plan("install", Settings(), None, None, "launchd", env=env).content
    assert agent is not None
    assert plistlib.loads(agent.encode())["EnvironmentVariables"]["MLX_RANK"] == "1"
    with pytest.raises(ServiceError, match="ranks 0..1"):
        group_environment(2, hostfile)
    with pytest.raises(ServiceError, match="go together"):
        group_environment(1, None)
    hostfile.write_text('{"hosts": 2}')
    with pytest.raises(ServiceError, match="one list of"):
        group_environment(0, hostfile)
