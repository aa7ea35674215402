"""The user's path, end to end, on the real embedded model.

Default configuration -> `specd serve` (a real process) imports the embedded SmolLM2 GGUF into
its data directory -> the official ``openai`` client sends a chat request -> chat template,
worker, engine -> the answer equals mlx-lm's own greedy generation of the same conversation ->
the request is a row of the replay buffer.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import mlx.core as mx
import openai
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.utils import dequantize_model

from daemon.store.buffer import ReplayBuffer
from tests.helpers import HANG_GUARD_S, start_daemon, wait_for_event

pytestmark = pytest.mark.slow

QUESTION = "Write a Python function that returns the square of a number."
MAX_TOKENS = 48


def mlx_lm_greedy(model_dir: Path, messages: list[dict[str, str]]) -> tuple[list[int], str]:
    """mlx-lm alone: load, prepare as specd documents for the CPU (dequantized float32), chat
    template, greedy decoding until EOS or MAX_TOKENS."""
    model, tokenizer = load(str(model_dir))[:2]
    if mx.default_device() == mx.cpu:
        dequantize_model(model)
        model.set_dtype(mx.float32)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    tokens: list[int] = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=MAX_TOKENS):
        if int(token) in tokenizer.eos_token_ids:
            break
        tokens.append(int(token))
    return tokens, tokenizer.decode(tokens)


def test_openai_client_against_specd_serve_on_the_embedded_model(tmp_path: Path) -> None:
    proc = start_daemon(tmp_path, {})  # the defaults: embedded target, layer-skip draft
    data = tmp_path / "data"
    log_file = data / "logs" / "specd.log"
    try:
        loaded = wait_for_event(log_file, "models_loaded", proc, timeout=HANG_GUARD_S)
        ready = wait_for_event(log_file, "ready", proc, timeout=HANG_GUARD_S)
        assert loaded["target"] == "embedded:smollm2-135m"
        runtime = json.loads((data / "runtime.json").read_text())
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{runtime['port']}/v1", api_key="unused", max_retries=0
        )
        messages = [{"role": "user", "content": QUESTION}]
        response = client.chat.completions.create(
            model="specd",
            messages=messages,
            max_tokens=MAX_TOKENS,
            temperature=0,  # type: ignore[arg-type]
        )
        answer = response.choices[0].message.content

        expected_tokens, expected_text = mlx_lm_greedy(Path(loaded["target_path"]), messages)
        assert answer == expected_text
        assert response.usage is not None
        eos_counted = int(response.choices[0].finish_reason == "stop")
        assert response.usage.completion_tokens == len(expected_tokens) + eos_counted

        # The response ended, so its record is committed (the API waits for the commit).
        with ReplayBuffer(data, create=False) as buf:
            rows = list(buf.iter_records())
        assert len(rows) == 1, ready
        row = rows[0]
        assert row.prompt_text == QUESTION
        assert row.output_text == expected_text
        assert row.output_tokens[: len(expected_tokens)] == expected_tokens
        assert row.target_id == loaded["target"]
        assert row.stats["generation_tokens"] == response.usage.completion_tokens
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=HANG_GUARD_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
