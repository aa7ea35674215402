"""Configuration sources, precedence and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from daemon.cli import main
from daemon.config import ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("SPECD_"):
            monkeypatch.delenv(name)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_documented_config_matches_defaults(tmp_path: Path) -> None:
    # configs/config.yaml documents every key with its default value.
    settings, sources = load_settings(REPO / "configs" / "config.yaml")
    defaults = Settings()
    assert settings.model_dump(exclude={"paths"}) == defaults.model_dump(exclude={"paths"})
    assert sources.main_file == REPO / "configs" / "config.yaml"
    doc = (REPO / "configs" / "config.yaml").read_text()
    for section, model in Settings.model_fields.items():
        assert f"{section}:" in doc
        for key in model.annotation.model_fields:  # type: ignore[union-attr]
            assert f"{key}:" in doc, f"{section}.{key} is not documented in configs/config.yaml"


@pytest.mark.parametrize(
    ("name", "target", "draft"),
    [
        (
            "50-mac-qwen2.5-7b",
            "mlx-community/Qwen2.5-7B-Instruct-4bit",
            "mlx-community/Qwen2.5-0.5B-Instruct-4bit",
        ),
        (
            "60-two-macs-llama-3.3-70b",
            "mlx-community/Llama-3.3-70B-Instruct-4bit",
            "mlx-community/Llama-3.2-1B-Instruct-4bit",
        ),
    ],
)
def test_example_drop_ins_are_valid(tmp_path: Path, name: str, target: str, draft: str) -> None:
    example = REPO / "configs" / "conf.d" / f"{name}.yaml.example"
    cfg = write(tmp_path / "config.yaml", "")
    write(tmp_path / "conf.d" / f"{name}.yaml", example.read_text())
    settings, _ = load_settings(cfg)
    assert settings.models.target == target
    assert settings.models.draft == draft


def test_defaults_follow_seed_configuration() -> None:
    s = Settings()
    # Changed from the seed (1e-4, accumulation 4) by measurement: see README.
    assert s.training.learning_rate == 1e-3
    assert s.training.warmup_steps == 10
    assert s.training.lora.rank == 32
    assert s.training.lora.dropout == 0.05
    assert s.training.batch_size == 1
    assert s.training.gradient_accumulation_steps == 1
    assert s.training.min_failure_cases == 50
    assert s.training.replay_ratio == 0.5
    assert s.data.max_prompt_length == 512
    assert s.data.max_output_length == 256
    assert s.sampling.temperature == 0.0
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8765)


def test_precedence_cli_env_dropins_main_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(
        tmp_path / "config.yaml",
        "server:\n  port: 1001\n  queue_size: 3\n"
        "training:\n  lora:\n    rank: 4\n    dropout: 0.1\n",
    )
    write(
        tmp_path / "conf.d" / "10-a.yaml",
        "server:\n  port: 1002\ntraining:\n  lora:\n    rank: 6\n",
    )
    write(tmp_path / "conf.d" / "20-b.yaml", "server:\n  port: 1003\n")
    write(tmp_path / "conf.d" / "notes.txt", "server: [not yaml at all")  # ignored: not *.yaml
    settings, sources = load_settings(cfg)
    assert settings.server.port == 1003  # later drop-in wins
    assert settings.server.queue_size == 3  # main file where no drop-in says otherwise
    # deep merge: rank from the drop-in, dropout kept from the main file
    assert settings.training.lora.rank == 6
    assert settings.training.lora.dropout == 0.1
    assert settings.server.host == "127.0.0.1"  # default
    assert [p.name for p in sources.drop_ins] == ["10-a.yaml", "20-b.yaml"]

    monkeypatch.setenv("SPECD_SERVER__PORT", "1004")
    monkeypatch.setenv("SPECD_TRAINING__LORA__RANK", "12")
    settings, sources = load_settings(cfg)
    assert settings.server.port == 1004
    assert settings.training.lora.rank == 12
    assert settings.training.lora.dropout == 0.1
    assert "SPECD_SERVER__PORT" in sources.env_keys

    settings, _ = load_settings(cfg, {"server.port": 1005, "paths.data_dir": str(tmp_path)})
    assert settings.server.port == 1005
    assert settings.paths.data_dir == tmp_path


def test_data_dir_moves_logs_unless_set(tmp_path: Path) -> None:
    settings, _ = load_settings(None, {"paths.data_dir": str(tmp_path / "d")})
    assert settings.log_file == tmp_path / "d" / "logs" / "specd.log"
    assert settings.models_dir == tmp_path / "d" / "models"
    cfg = write(tmp_path / "c.yaml", f"paths:\n  log_dir: {tmp_path / 'logs'}\n")
    settings, _ = load_settings(cfg, {"paths.data_dir": str(tmp_path / "d")})
    assert settings.log_file == tmp_path / "logs" / "specd.log"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("server:\n  port: eighty\n", ["server.port", "valid integer", "'eighty'"]),
        ("server:\n  port: 70000\n", ["server.port", "less than or equal to 65535"]),
        ("training:\n  lora:\n    rank: 0\n", ["training.lora.rank", "greater than or equal to 1"]),
        ("trainig:\n  learning_rate: 0.1\n", ["trainig", "unknown key"]),
        ("server:\n  prot: 9\n", ["server.prot", "unknown key"]),
        ("speculative:\n  min_draft_tokens: 9\n  max_draft_tokens: 2\n", ["speculative", "exceed"]),
        ("sampling:\n  top_p: 1.5\n", ["sampling.top_p"]),
        ("logging:\n  level: loud\n", ["logging.level", "'loud'"]),
        ("server: [1, 2\n", ["invalid YAML", "line"]),
        ("- just\n- a list\n", ["top level must be a mapping"]),
    ],
)
def test_bad_drop_in_names_file_key_and_reason(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    cfg = write(tmp_path / "config.yaml", "server:\n  port: 9000\n")
    bad = write(tmp_path / "conf.d" / "30-bad.yaml", text)
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg)
    msg = str(exc.value)
    assert str(bad) in msg
    for f in fragments:
        assert f in msg


def test_bad_env_value_names_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECD_SERVER__PORT", "many")
    with pytest.raises(ConfigError, match="environment variable SPECD_SERVER__PORT: server.port"):
        load_settings(write(tmp_path / "config.yaml", ""))


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


def test_cli_reports_config_error_and_exits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write(tmp_path / "config.yaml", "models:\n  draft_layers: []\n")
    rc = main(["serve", "--config", str(cfg), "--data-dir", str(tmp_path / "d")])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "models.draft_layers" in err and "at least one layer" in err


def test_models_targets_are_served_by_name_with_their_own_overrides() -> None:
    s = Settings(
        models={
            "draft_layers": [0, 1, 2],
            "targets": {"coder": {"target": "/m/coder", "draft": "/m/coder-draft"}},
        }
    )
    assert s.models.names() == [s.models.target, "coder"]
    coder = s.for_model("coder").models
    assert (coder.target, coder.draft, coder.draft_layers) == (
        "/m/coder",
        "/m/coder-draft",
        [0, 1, 2],
    )
    assert coder.targets == {}  # an entry is one model, not a registry
    assert s.for_model(s.models.target).models == s.models
    with pytest.raises(KeyError):
        s.for_model("nonexistent")


@pytest.mark.parametrize(
    ("targets", "error"),
    [
        ({"embedded:smollm2-135m": {"target": "/m/x"}}, "models.target's own name"),
        ({" padded": {"target": "/m/x"}}, "not a model name"),
        ({"x": {"target": "/m/x", "draft_layers": [1, 1]}}, "duplicates"),
        ({"x": {"draft": "/m/d"}}, "target"),
        ({"x": {"target": "/m/x", "lora": 3}}, "lora"),
    ],
)
def test_bad_models_targets_are_errors_naming_them(targets: dict, error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        Settings(models={"targets": targets})
