"""Held-out agreement checked against what it must be, not against itself.

A draft identical to the target agrees on every position of the target's own greedy answers;
answers shifted by one position, or tokens the target never produced, agree on almost none. A
scorer whose logits are misaligned by one position fails the first check: the last test shows
that with a deliberately broken scorer written here.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import generate_step

from daemon.core.evaluation import Agreement, teacher_forced_agreement
from tests.helpers import make_tiny_llama

VOCAB = 64
PROMPTS = [[3, 17, 5], [40, 2, 9, 33, 12, 8], [21], [7, 7, 7, 7], [60, 1, 44, 19, 25]]


def greedy(model: nn.Module, prompt: list[int], n: int = 16) -> list[int]:
    """The target's own greedy answer, by mlx-lm (independent of specd's code)."""
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def rows(model: nn.Module) -> list[tuple[list[int], list[int]]]:
    return [(p, greedy(model, p)) for p in PROMPTS]


def off_by_one_agreement(
    model: nn.Module, rows: Sequence[tuple[Sequence[int], Sequence[int]]]
) -> Agreement:
    """A broken scorer: compares the prediction *at* each output token with that token (it
    should compare the prediction made one position earlier)."""
    result = Agreement()
    for prompt, output in rows:
        tokens = mx.array(list(prompt) + list(output[:-1]))[None]
        pred = mx.argmax(model(tokens)[0, len(prompt) :], axis=-1).tolist()
        result.matches += sum(int(a == b) for a, b in zip(pred, output[:-1], strict=False))
        result.total += len(output)
        result.rows += 1
    return result


def test_identical_draft_agrees_everywhere() -> None:
    target = make_tiny_llama(VOCAB, seed=11)
    data = rows(target)
    a = teacher_forced_agreement(target, data)
    assert a.rows == len(PROMPTS) and a.total == sum(len(o) for _, o in data)
    assert a.rate == 1.0
    # A separately built model with the same weights: the same, through another object.
    copy = make_tiny_llama(VOCAB, seed=11)
    assert teacher_forced_agreement(copy, data).rate == 1.0


SCRIPT = np.random.default_rng(7).permutation(VOCAB).tolist()  # no token twice


class PositionLM(nn.Module):
    """A model whose prediction at absolute position ``i`` is ``SCRIPT[i + 1]``, with clear
    margins, whatever the tokens: an answer moved by one position against its prompt
    disagrees everywhere, which a context-driven random model cannot promise."""

    def __init__(self) -> None:
        super().__init__()
        nxt = SCRIPT[1:] + SCRIPT[:1]
        self.table = mx.array(np.eye(VOCAB, dtype=np.float32)[nxt] * 10.0)

    def __call__(self, inputs: mx.array) -> mx.array:
        return self.table[mx.arange(inputs.shape[1])][None]


def script_rows(shift: int = 0) -> list[tuple[list[int], list[int]]]:
    """Prompts from SCRIPT and their answers (the script's continuation), moved by ``shift``."""
    out = []
    for n_prompt in (1, 3, 6, 10):
        start = n_prompt + shift
        out.append((SCRIPT[:n_prompt], SCRIPT[start : start + 16]))
    return out


def test_shifted_and_foreign_outputs_agree_almost_nowhere() -> None:
    model = PositionLM()
    assert teacher_forced_agreement(model, script_rows()).rate == 1.0
    assert teacher_forced_agreement(model, script_rows(shift=1)).rate == 0.0  # one early
    late = [(p, [p[-1], *o[:-1]]) for p, o in script_rows()]  # one position late
    assert teacher_forced_agreement(model, late).rate == 0.0
    rng = np.random.default_rng(0)
    foreign = [(p, rng.integers(0, VOCAB, size=len(o)).tolist()) for p, o in script_rows()]
    assert teacher_forced_agreement(model, foreign).rate < 0.1  # chance is 1/64
    # The tiny llama's own greedy answers, scored with the script model: near chance too.
    llama = make_tiny_llama(VOCAB, seed=11)
    assert teacher_forced_agreement(model, rows(llama)).rate < 0.2


def test_an_off_by_one_scorer_fails_the_identity_check() -> None:
    for model, data in (
        (make_tiny_llama(VOCAB, seed=11), rows(make_tiny_llama(VOCAB, seed=11))),
        (PositionLM(), script_rows()),
    ):
        assert teacher_forced_agreement(model, data).rate == 1.0
        assert off_by_one_agreement(model, data).rate < 0.5  # what the identity check catches


def test_vocab_limit_and_truncation() -> None:
    target = make_tiny_llama(VOCAB, seed=11)
    data = rows(target)
    # Slicing logits to the shared vocabulary keeps every greedy token (all are < VOCAB).
    assert teacher_forced_agreement(target, data, vocab_limit=VOCAB).rate == 1.0
    # Only the first max_output tokens of each answer are scored.
    a = teacher_forced_agreement(target, data, max_output=4)
    assert a.total == 4 * len(PROMPTS) and a.rate == 1.0
