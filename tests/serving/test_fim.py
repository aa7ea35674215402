"""Fill-in-the-middle: ``/v1/completions`` (and Ollama's ``/api/generate``) with ``suffix`` on
a tiny model whose tokenizer has Qwen2.5-Coder's FIM tokens; a model without them answers 400
naming ``suffix``."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from transformers import PreTrainedTokenizerFast

from daemon.core.engine import SamplingParams
from daemon.core.prompts import encode_fim, fim_tokens
from daemon.server import Server
from tests.helpers import HANG_GUARD_S, pair_from_dir, start_server, stop_server

FIM = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Iterator[Server]:
    path = tmp_path_factory.mktemp("fim-model")
    tiny_tokenizer._tokenizer.save_pretrained(path)
    hf = PreTrainedTokenizerFast.from_pretrained(path)  # a copy: the session's stays as it is
    hf.add_special_tokens({"additional_special_tokens": FIM})
    hf.save_pretrained(path)
    pair = pair_from_dir(path, "tiny-coder")
    srv, thread = start_server(tmp_path_factory.mktemp("fim") / "data", pair)
    yield srv
    stop_server(srv, thread)


def test_suffix_is_filled_in_the_middle(served: Server) -> None:
    tok = served.pair.tokenizer
    markers = fim_tokens(tok)
    assert markers is not None
    tokens = encode_fim(tok, PREFIX, SUFFIX)
    assert tokens[0] == markers[0] and tokens[-1] == markers[2] and markers[1] in tokens
    body = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 12}
    r = httpx.post(f"{served.url}/v1/completions", json=body, timeout=HANG_GUARD_S)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["prompt_tokens"] == len(tokens)
    ref = served.worker.call_between_requests(
        lambda: served.engine.run(tokens, SamplingParams(max_tokens=12))
    ).result(HANG_GUARD_S)
    assert out["choices"][0]["text"] == ref.text
    # Ollama's /api/generate with a suffix: the same prompt
    r = httpx.post(
        f"{served.url}/api/generate",
        json={"model": "specd", "prompt": PREFIX, "suffix": SUFFIX, "stream": False,
              "options": {"num_predict": 12}},
        timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert json.loads(r.text)["response"] == ref.text


def test_a_model_without_fim_tokens_refuses_suffix(tiny_tokenizer) -> None:
    assert fim_tokens(tiny_tokenizer) is None
    with pytest.raises(ValueError):
        encode_fim(tiny_tokenizer, PREFIX, SUFFIX)
