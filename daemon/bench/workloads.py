"""Workloads the benchmarks generate themselves, from the installed Python's standard library,
so that any machine regenerates the same prompts without files from outside the repository
(`specd bench workloads` writes them; ``benchmarks/workloads/`` holds the published set).

``code``, ``docs``, ``edit``, ``multiturn``: chat prompts from public standard-library
functions (write it from its signature and docstring; edit its source; four turns about it)
and from the Python reference's topics, split into train and eval by a hash of their source
(`split_of`), so no eval prompt shares its function with a train prompt.

``autocomplete``: code prefixes cut from standard-library modules at a point inside a function
body, mid-line, as an editor's autocomplete sends them (a raw completion prompt, no chat
template). The modules, the cut points and their order follow a fixed seed: the same Python
version gives the same prompts.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["autocomplete_prompts", "chat_workloads", "split_of", "write_workloads"]


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


# --------------------------------------------------------------------------------------------
# Chat workloads: code, docs, edit and multi-turn prompts, split into train and eval

KINDS = ("code", "docs", "edit", "multiturn")
EVAL_SHARE = 0.25  # of each kind's sources, by a hash of the source's name: a fixed split
EDITS = (
    "Add type hints to this function's parameters and return value. Return the complete function.",
    "Rewrite this function's docstring in the Google style (Args, Returns). Return the "
    "complete function.",
    "Rename the local variables of this function to longer, descriptive names. Return the "
    "complete function.",
    "Add a comment above each non-trivial line of this function. Return the complete function.",
)
FOLLOW_UPS = (
    "Now write two unit tests for it.",
    "Make it shorter without changing what it does.",
    "Which edge cases does it not handle?",
)


@dataclass(frozen=True)
class _Function:
    source: str  # module.name: the unit of the train/eval split
    signature: str
    summary: str  # the docstring's first paragraph
    code: str


def split_of(source: str) -> str:
    """ "eval" for about EVAL_SHARE of sources, "train" for the rest, the same everywhere."""
    digest = hashlib.sha256(source.encode()).digest()
    return "eval" if digest[0] < 256 * EVAL_SHARE else "train"


def _functions(max_lines: int = 30) -> list[_Function]:
    """Public top-level functions of the standard library's modules with a docstring and at
    most ``max_lines`` lines, in module then line order."""
    out: list[_Function] = []
    for path in _modules():
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            end = node.end_lineno or node.lineno
            if not doc or end - node.lineno + 1 > max_lines or node.decorator_list:
                continue
            summary = " ".join(doc.split("\n\n")[0].split())
            if len(summary) < 20:
                continue
            code = "\n".join(lines[node.lineno - 1 : end])
            signature = f"{node.name}({ast.unparse(node.args)})"
            out.append(_Function(f"{path.stem}.{node.name}", signature, summary, code))
    return out


def _fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def chat_workloads(per_kind: int = 120, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """``{"code-train": [...], "code-eval": [...], ...}``: prompt-file lines for each kind and
    split, at most ``per_kind`` per kind, in a seeded order. Code, edit and multi-turn prompts
    come from standard-library functions (a function is in one split for every kind that uses
    it); docs prompts from the Python reference's topics (`pydoc_data.topics`)."""
    import pydoc_data.topics

    rng = random.Random(seed)
    functions = _functions()
    rng.shuffle(functions)
    out: dict[str, list[dict[str, Any]]] = {
        f"{k}-{s}": [] for k in KINDS for s in ("train", "eval")
    }

    def add(kind: str, source: str, line: dict[str, Any]) -> None:
        if sum(len(out[f"{kind}-{s}"]) for s in ("train", "eval")) < per_kind:
            out[f"{kind}-{split_of(source)}"].append({**line, "domain": kind, "source": source})

    for i, f in enumerate(functions):
        add(
            "code",
            f.source,
            {"prompt": f"Write a Python function `{f.signature}` that does the following:"
             f"\n\n{f.summary}"},
        )  # fmt: skip
        add("edit", f.source, {"prompt": f"{EDITS[i % len(EDITS)]}\n\n{_fenced(f.code)}"})
        add(
            "multiturn",
            f.source,
            {"turns": [f"What does this function do?\n\n{_fenced(f.code)}", *FOLLOW_UPS]},
        )
    topics = sorted(pydoc_data.topics.topics.items())
    rng.shuffle(topics)
    for name, text in topics:
        excerpt = " ".join(text.split())[:700]
        prompt = (
            "Explain in plain words, with a short example, this part of the Python reference:"
            f"\n\n{excerpt}"
        )
        add("docs", f"reference.{name}", {"prompt": prompt})
    return out


def write_workloads(out_dir: Path, per_kind: int = 120, autocomplete: int = 16) -> dict[str, Any]:
    """Write every workload as JSONL into ``out_dir`` and a ``MANIFEST.json`` naming the
    Python that generated them (the standard library is the source: another version gives
    other prompts) and each file's line count and sha256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        **chat_workloads(per_kind),
        "autocomplete": [{"prompt": p, "domain": "autocomplete"} for p in
                         autocomplete_prompts(autocomplete)],
    }  # fmt: skip
    manifest: dict[str, Any] = {
        "python": sys.version.split()[0],
        "generated_by": "specd bench workloads",
        "files": {},
    }
    for name, lines in files.items():
        text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        (out_dir / f"{name}.jsonl").write_text(text, encoding="utf-8")
        manifest["files"][f"{name}.jsonl"] = {
            "lines": len(lines),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
        }
    (out_dir / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def run(args: argparse.Namespace, settings: Any, sources: Any) -> int:
    """``specd bench workloads``: generate the benchmark prompt files."""
    manifest = write_workloads(args.out, args.per_kind, args.autocomplete)
    for name, info in manifest["files"].items():
        print(f"{args.out / name}: {info['lines']} prompts")
    print(f"from Python {manifest['python']}'s standard library; {args.out / 'MANIFEST.json'}")
    return 0
