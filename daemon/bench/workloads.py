"""Workloads the benchmarks generate themselves, from the installed Python's standard library,
so that any machine regenerates the same prompts without files from outside the repository.

``autocomplete``: code prefixes cut from standard-library modules at a point inside a function
body, mid-line, as an editor's autocomplete sends them (a raw completion prompt, no chat
template). The modules, the cut points and their order follow a fixed seed: the same Python
version gives the same prompts.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

__all__ = ["autocomplete_prompts"]


def _modules() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.glob("*.py") if not p.name.startswith("_"))


def autocomplete_prompts(
    n: int, seed: int = 0, max_chars: int = 1500, min_chars: int = 300
) -> list[str]:
    """``n`` code prefixes (one per module, modules in a seeded order), each ending part-way
    through an indented line of a function body, with up to ``max_chars`` of the code before."""
    rng = random.Random(seed)
    modules = _modules()
    rng.shuffle(modules)
    out: list[str] = []
    for path in modules:
        if len(out) >= n:
            break
        try:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        except (OSError, UnicodeDecodeError):
            continue
        # inside a function body: indented code lines, not comments or docstrings
        cuts = [
            i
            for i, line in enumerate(lines)
            if i >= 20 and line.startswith("        ") and len(line.strip()) > 12
            and not line.strip().startswith(("#", '"', "'"))
        ]  # fmt: skip
        if not cuts:
            continue
        i = rng.choice(cuts)
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        head = line[: indent + max(4, (len(line.rstrip()) - indent) // 2)]
        before = "".join(lines[:i])[-max_chars:]
        before = before[before.find("\n") + 1 :] if len(before) == max_chars else before
        prompt = before + head
        if len(prompt) >= min_chars:
            out.append(prompt)
    return out
