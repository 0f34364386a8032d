"""The project's seams, checked on its source: no import circle in the engine, the engine free of
Ray and MLflow, one experiment pipeline that both entry points call, modules of a readable size."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "mim4dd"
MAX_SERVICE_MODULE_LINES = 350


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (annotations only, never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(path: Path) -> set[str]:
    """Every module a file imports at run time, at any depth (a lazy import is still an edge)."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _engine_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ENGINE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_no_import_circle_in_the_engine():
    graph = _engine_graph()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert "mim4dd.objectives.base" in graph["mim4dd.objectives.trajectory"]  # the walk sees edges


def test_the_engine_never_imports_ray_or_mlflow():
    for path in ENGINE.rglob("*.py"):
        heavy = {m for m in _imports(path) if m.split(".")[0] in ("ray", "mlflow")}
        assert not heavy, f"{path.relative_to(ROOT)} imports {sorted(heavy)}"


def _calls(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            func = node.func
            names.add(func.id if isinstance(func, ast.Name) else getattr(func, "attr", ""))
    return names


@pytest.mark.parametrize("caller", ["mim4dd/cli.py", "orchestrator/trainable.py"])
def test_entry_points_call_the_one_experiment(caller):
    calls = _calls(ROOT / caller)
    assert "run_experiment" in calls
    # No pipeline of their own: no distiller built, no evaluation run, no set saved by hand.
    assert not calls & {"Distiller", "distill", "Evaluator", "evaluator_for"}


def test_service_modules_stay_readable():
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines())
             for p in (ROOT / "orchestrator").glob("*.py")}
    assert max(sizes.values()) <= MAX_SERVICE_MODULE_LINES, sizes


def test_read_commands_import_neither_torch_nor_ray():
    """`mim4dd-sweep list`, `status`, `report`, `stop`, `--help`: their modules (the CLI, the
    queries) import no torch and no Ray (2-3 s of imports); `launch`, `experts`, `evaluate` and
    `pull` (which loads the set it verifies) import them when they run."""
    code = ("import sys, orchestrator.cli, orchestrator.queries; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True, check=True)
    assert found.stdout.strip() == "[]", found.stderr
