"""The import graph runs one way: no module of lordo imports (even inside a function) one that imports it back;
every module imports alone; `lordo --help` and the analysis/plots layer load only what they need."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "lordo"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))


def imports_of(path: Path) -> set[str]:
    """The lordo modules a file imports anywhere in it (top level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & set(MODULES)
            found |= submodules or {node.module}      # `from lordo.data import corpora` needs corpora, not data
    return {m for m in found if m in MODULES and m != "lordo"}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in PACKAGE.rglob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}   # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"b2"}, "b2": {"b"}}) == ["b", "b2", "b"]


def test_imports_of_sees_function_level_imports(tmp_path):
    f = PACKAGE / "launch.py"
    assert {"lordo.trainer", "lordo.runs", "lordo.comm"} <= imports_of(f)
    g = tmp_path / "x.py"
    g.write_text("def f():\n    from lordo import analysis, plots\n    import lordo.data\n"
                 "    from lordo.runs import Run\n")
    assert imports_of(g) == {"lordo.analysis", "lordo.plots", "lordo.data", "lordo.runs"}


def test_import_graph_is_acyclic():
    graph = import_graph()
    assert "lordo.trainer" in graph["lordo.launch"]          # the graph is the real one
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_point_one_way():
    graph = import_graph()
    assert "lordo.launch" not in graph["lordo.trainer"]      # the launcher starts workers; the trainer is one
    for low in ("lordo.optim", "lordo.projection", "lordo.comm", "lordo.reference", "lordo.paths"):
        assert not graph[low] & {"lordo.trainer", "lordo.launch", "lordo.runs", "lordo.data", "lordo.config"}, low
    assert graph["lordo.reference"] == set()                 # the float64 reference stays independent
    assert graph["lordo.paths"] == set()


def _fresh(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)


@pytest.mark.integration
@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports_alone(module):
    done = _fresh(f"import {module}")
    assert done.returncode == 0, done.stderr[-2000:]


HEAVY = ("torch", "torch.distributed", "tokenizers", "transformers", "lordo.trainer", "lordo.data")


@pytest.mark.integration
def test_lordo_help_loads_no_training_stack():
    code = ("import sys\nfrom lordo.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            f"    assert e.code == 0\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = _fresh(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: lordo" in done.stdout and done.stdout.strip().endswith("[]"), done.stdout


@pytest.mark.integration
def test_analysis_and_plots_do_not_load_the_trainer():
    done = _fresh("import sys\nimport lordo.analysis, lordo.plots\n"
                  "print(sorted(m for m in ('lordo.trainer', 'lordo.launch', 'lordo.data') if m in sys.modules))")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
