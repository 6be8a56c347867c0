"""The package's layering: no import cycles, methods below pools and the run flow, chunks below methods."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mergelab

PACKAGE = Path(mergelab.__file__).resolve().parent


def type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks (annotations only, never run)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for n in ast.walk(node)}
    return out


def import_graph(runtime_only: bool = False) -> dict[str, set[str]]:
    """mergelab module -> the mergelab modules it imports anywhere in its file (functions too; TYPE_CHECKING
    blocks too unless ``runtime_only``)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = type_checking_nodes(tree) if runtime_only else set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 30  # the whole package was read
    assert cycles(graph) == []


def test_the_detector_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers() -> None:
    graph = import_graph(runtime_only=True)
    below_methods = [
        "mergelab.task_vectors",
        "mergelab.weight_checks",
        "mergelab.engine.scratch",
        "mergelab.engine.chunks",
        "mergelab.engine.protocol",
    ]
    for low in below_methods:
        assert not any(t.startswith("mergelab.methods") for t in graph[low]), low
    for name, targets in graph.items():
        if name.startswith("mergelab.methods") or name.startswith("mergelab.engine"):
            above = [t for t in targets if t.startswith(("mergelab.pools", "mergelab.run", "mergelab.text"))]
            assert not above, f"{name} imports {above}"


def test_methods_never_test_a_pool_type() -> None:
    for path in (PACKAGE / "methods").glob("*.py"):
        text = path.read_text()
        assert "isinstance(pool" not in text, path.name


def test_the_command_line_starts_without_the_heavy_libraries() -> None:
    # `mergelab --help` and config errors answer before torch, Lightning or transformers are imported.
    heavy = ("torch", "lightning", "transformers", "datasets", "wandb")
    code = f"import sys, mergelab.cli; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_a_merge_of_checkpoints_imports_no_training_or_evaluation_library() -> None:
    # The run flow, the checkpoint pool and every method (AWD's fit imports Lightning when it runs) load with torch
    # alone: a streamed merge-only run starts without Lightning, transformers, datasets, wandb or matplotlib.
    heavy = ("lightning", "transformers", "datasets", "wandb", "matplotlib")
    code = (
        "import sys, mergelab.run, mergelab.pools.checkpoint, mergelab.methods; "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"
