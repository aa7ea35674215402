"""Several models in one daemon (``models.targets``): chosen by the request's ``model``, each
answering as it does served alone, loaded on demand and freed beyond ``models.max_loaded``.

A real ``specd serve`` process and the ``openai`` client; the answers of each model served
alone come from a `Service` of its own in this process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.helpers import (
    HANG_GUARD_S,
    clean_env,
    read_log,
    start_daemon,
    stop_daemon,
    wait_for_event,
    wait_until,
    write_model_dir,
)

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]
PROMPTS = ["a b c", "d e f", "g h a", "b d f"]
MAX_TOKENS = 10


def model_dirs(tmp_path: Path, hidden: int = 32) -> tuple[Path, Path]:
    # sharp heads: clear argmax margins, so a k+1-row pass and a 1-row pass agree
    return (
        write_model_dir(tmp_path / "chat", WORDS, 40, seed=11, lm_head_scale=8.0, hidden=hidden),
        write_model_dir(tmp_path / "coder", WORDS, 40, seed=12, lm_head_scale=8.0, hidden=hidden),
    )


def answers_alone(tmp_path: Path, model: Path) -> list[str]:
    """Each prompt's greedy answer from ``model`` served alone (its own service)."""
    from daemon.config import load_settings
    from daemon.serving.service import Service

    data = tmp_path / f"alone-{model.name}"
    settings, _ = load_settings(
        None,
        {"paths.data_dir": str(data), "models.target": str(model), "models.draft_layers": [0, 1]},
    )
    service = Service(settings)
    service.start()
    try:
        return [
            service.generate([{"role": "user", "content": p}], max_tokens=MAX_TOKENS).text
            for p in PROMPTS
        ]
    finally:
        service.stop(30)


def serve(tmp_path: Path, chat: Path, coder: Path, **models: Any) -> tuple[Any, openai.OpenAI]:
    proc = start_daemon(
        tmp_path,
        {
            "models": {
                "target": str(chat),
                "draft_layers": [0, 1],
                "targets": {"coder": {"target": str(coder)}},
                **models,
            },
            "training": {"enabled": False},
        },
    )
    ready = wait_for_event(tmp_path / "data" / "logs" / "specd.log", "ready", proc)
    client = openai.OpenAI(base_url=ready["url"] + "/v1", api_key="none", max_retries=0)
    return proc, client


def ask(client: openai.OpenAI, model: str, prompt: str) -> str:
    out = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert out.model == model  # the response names the model that answered
    return out.choices[0].message.content or ""


def test_two_models_answer_alternating_requests_as_each_does_alone(tmp_path: Path) -> None:
    chat, coder = model_dirs(tmp_path)
    alone = {str(chat): answers_alone(tmp_path, chat), "coder": answers_alone(tmp_path, coder)}
    assert alone[str(chat)] != alone["coder"]  # two different models, or the test shows nothing
    proc, client = serve(tmp_path, chat, coder)
    try:
        listed = {m.id: m for m in client.models.list().data}
        assert list(listed) == [str(chat), "coder"]
        assert listed["coder"].model_extra["loaded"] is False  # loaded on its first request
        for i, prompt in enumerate(PROMPTS):
            for name in (str(chat), "coder"):
                assert ask(client, name, prompt) == alone[name][i], (name, prompt)
        with pytest.raises(openai.NotFoundError) as err:
            ask(client, "nonexistent", "a b")
        message = str(err.value)
        assert "nonexistent" in message and str(chat) in message and "'coder'" in message
        listed = {m.id: m for m in client.models.list().data}
        assert listed["coder"].model_extra["loaded"] is True  # max_loaded 2: both stay
        assert listed[str(chat)].model_extra["loaded"] is True
        # the CLI lists them as configured, with what the running daemon says of each
        listed = specd_cli(tmp_path, "models", "list")
        assert listed.returncode == 0, listed.stderr
        shown = listed.stdout.splitlines()
        # /metrics counts each model's generations and tokens apart
        metrics = httpx.get(str(client.base_url).removesuffix("/v1/") + "/metrics").text
        for name in (str(chat), "coder"):
            line = f'specd_model_generations_total{{model="{name}"}} {float(len(PROMPTS))}'
            assert line in metrics.splitlines(), (line, metrics)
        # /v1/models' acceptance is each model's own, as /metrics counts it
        listed = {m.id: m for m in client.models.list().data}
        for name in (str(chat), "coder"):
            sums = [0.0, 0.0]
            for line in metrics.splitlines():
                for i, kind in enumerate(("draft", "accepted")):
                    if line.startswith(f'specd_model_{kind}_tokens_total{{model="{name}"'):
                        sums[i] += float(line.split()[-1])
            assert sums[0] > 0
            assert listed[name].model_extra["acceptance_rate"] == pytest.approx(sums[1] / sums[0])
        rows = {line.split()[0]: line.split()[1:] for line in shown[1:] if line.strip()}
        assert rows["coder"] == [str(coder), "yes", "v0"]
        assert rows[str(chat)] == [str(chat), "yes", "v0"]
    finally:
        stop_daemon(proc)
    loaded = [
        r
        for r in read_log(tmp_path / "data" / "logs" / "specd.log")
        if r["event"] == "model_loaded"
    ]
    assert [r["model"] for r in loaded] == ["coder"]  # once, on its first request
    # every request is recorded under the target that answered it, with its adapter version
    from daemon.store.buffer import ReplayBuffer

    with ReplayBuffer(tmp_path / "data", create=False) as buf:
        by_target = {
            t: sorted(r.output_text for r in buf.for_target(t).iter_records())
            for t in (str(chat), str(coder))
        }
        assert buf.count() == 2 * len(PROMPTS)
        assert all(r.adapter_version == 0 for r in buf.iter_records())
    assert by_target[str(chat)] == sorted(alone[str(chat)])
    assert by_target[str(coder)] == sorted(alone["coder"])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_one_model_loaded_at_a_time_keeps_memory_bounded(tmp_path: Path) -> None:
    """``models.max_loaded: 1``: every switch frees the other model; over 20 switches the
    process's RSS stays within 10% of where it was after the first two requests."""
    chat, coder = model_dirs(tmp_path, hidden=384)  # ~14 MB of weights each: a leak shows
    proc, client = serve(tmp_path, chat, coder, max_loaded=1)
    try:
        rss = []
        for i in range(22):
            name = (str(chat), "coder")[i % 2]
            ask(client, name, PROMPTS[i % len(PROMPTS)])
            rss.append(rss_bytes(proc.pid))
            loaded = [m.id for m in client.models.list().data if m.model_extra["loaded"]]
            assert loaded == [name], (i, loaded)
        assert max(rss[2:]) <= 1.10 * rss[1], [r // 2**20 for r in rss]
    finally:
        stop_daemon(proc)
    events = [r["event"] for r in read_log(tmp_path / "data" / "logs" / "specd.log")]
    assert events.count("model_unloaded") == 21  # every switch but the first load


def specd_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon",
            *args,
            "--config",
            str(tmp_path / "config.yaml"),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=HANG_GUARD_S,
    )


def test_models_added_and_removed_live_leave_the_others_serving(tmp_path: Path) -> None:
    """``specd models add`` writes a drop-in the running daemon picks up: the new model
    answers as it does alone; ``specd models remove`` drops it (then a 404); the model
    served all along never stops."""
    chat, coder = model_dirs(tmp_path)
    alone = answers_alone(tmp_path, coder)
    # a model directory under <data dir>/models/ is served by its name, unconfigured
    write_model_dir(tmp_path / "data" / "models" / "found", WORDS, 40, seed=12, lm_head_scale=8.0)
    proc = start_daemon(
        tmp_path,
        {"models": {"target": str(chat), "draft_layers": [0, 1]}, "training": {"enabled": False}},
    )
    log = tmp_path / "data" / "logs" / "specd.log"
    try:
        ready = wait_for_event(log, "ready", proc)
        client = openai.OpenAI(base_url=ready["url"] + "/v1", api_key="none", max_retries=0)
        first = ask(client, str(chat), PROMPTS[0])
        assert [m.id for m in client.models.list().data] == [str(chat), "found"]
        assert ask(client, "found", PROMPTS[0]) == alone[0]  # coder's weights, another name
        bad = specd_cli(tmp_path, "models", "add", "broken", str(coder), "--draft-layers", "1,1")
        assert bad.returncode == 1 and "duplicates" in bad.stderr
        assert not list((tmp_path / "conf.d").glob("*.yaml"))  # nothing left behind
        added = specd_cli(tmp_path, "models", "add", "coder", str(coder))
        assert added.returncode == 0, added.stderr
        changed = wait_for_event(log, "models_changed", proc)
        assert changed["added"] == ["coder"] and changed["removed"] == []
        assert [ask(client, "coder", p) for p in PROMPTS] == alone
        assert ask(client, str(chat), PROMPTS[0]) == first
        removed = specd_cli(tmp_path, "models", "remove", "coder")
        assert removed.returncode == 0, removed.stderr
        wait_until(
            lambda: any(
                r["event"] == "models_changed" and r["removed"] == ["coder"] for r in read_log(log)
            ),
            "the model removed",
        )
        with pytest.raises(openai.NotFoundError):
            ask(client, "coder", PROMPTS[0])
        assert ask(client, str(chat), PROMPTS[0]) == first
        # pull: a local directory is served as it is, under its directory's name
        pulled = specd_cli(tmp_path, "models", "pull", str(coder))
        assert pulled.returncode == 0, pulled.stderr
        wait_until(lambda: "coder" in [m.id for m in client.models.list().data], "pulled")
        assert ask(client, "coder", PROMPTS[0]) == alone[0]
    finally:
        stop_daemon(proc)


def test_models_add_names_the_draft_kind_and_the_feature_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from daemon import cli
    from daemon.config import load_settings

    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    common = ["--config", str(config), "--data-dir", str(tmp_path / "data")]
    add = ["models", "add", *common]
    assert cli.main([*add, "plain", "/models/a", "--draft", "layer-skip"]) == 0
    assert cli.main([*add, "tapped", "/models/b", "--feature-layers", "1,3"]) == 0
    assert cli.main([*add, "bad", "/models/c", "--feature-layers", "one"]) == 1
    assert "not a comma-separated list of layer indices" in capsys.readouterr().err
    settings, _ = load_settings(config, {"paths.data_dir": str(tmp_path / "data")})
    plain, tapped = settings.models.targets["plain"], settings.models.targets["tapped"]
    assert plain.draft is None  # the LoRA-adapted layer-skip draft
    assert tapped.draft == "auto" and tapped.feature_layers == [1, 3]
    assert "bad" not in settings.models.targets
