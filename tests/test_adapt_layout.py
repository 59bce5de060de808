"""The package's shape: imports inside ``card/`` run one way (no cycle, the library never imports the CLI),
every module imports, and the adaptation stage keeps small functions with a short training loop.

The graph counts every import of a ``card`` module, also those inside functions: a lazy import is still a
dependency.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

CARD = Path(__file__).resolve().parents[1] / "card"


def module_name(path: Path) -> str:
    parts = path.relative_to(CARD.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(CARD.rglob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """The ``card`` modules that module ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = 2
        path.pop()
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_no_import_cycle_inside_card():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_library_never_imports_the_cli():
    assert [n for n, deps in GRAPH.items() if "card.cli" in deps] == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    if name == "card.eval.tasks.shared.shared_tasks":
        pytest.importorskip("lm_eval")
    importlib.import_module(name)


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_adapt_functions_are_small_and_the_loop_short():
    long = [(p.name, f, n) for p in sorted((CARD / "adapt").glob("*.py")) for f, n in _functions(p) if n > 80]
    assert long == []
    loop = dict(_functions(CARD / "adapt" / "train.py"))["train"]
    assert loop < 60, f"the training loop has {loop} lines"


# card/eval/decoding.py is being rewritten on another branch, which drops its card-method.md references;
# remove it from this set once that branch is merged.


def test_no_file_refers_to_a_document_outside_the_repository():
    import re
    import subprocess

    repo = CARD.parent
    files = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    outside = re.compile(r"card-method\.md|platform-notes|shared/docs|pitfall \d")
    found = []
    for name in files:
        path = repo / name
        if path == Path(__file__).resolve() or path.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ""}:
            continue
        if path.is_file() and outside.search(path.read_text(errors="replace")):
            found.append(name)
    assert found == []
    for link in re.findall(r"\(?(docs/[\w.-]+\.md)", (repo / "README.md").read_text()):
        assert (repo / link).is_file(), link


def test_one_dtype_table_and_one_positions_lookup():
    import torch
    import transformers as tf

    from card.checkpoint import DTYPES, PRECISIONS, max_positions, precision_dtype, resolve_dtype

    assert set(PRECISIONS) == {"fp32", "bf16", "fp16"} and set(PRECISIONS.values()) == set(DTYPES) - {"auto"}
    for short, long in PRECISIONS.items():
        assert precision_dtype(short) is resolve_dtype(long) is getattr(torch, long)
    assert max_positions(tf.LlamaConfig(max_position_embeddings=77)) == 77
    assert max_positions(tf.GPT2Config(n_positions=33)) == 33
    assert max_positions(tf.PretrainedConfig()) is None
