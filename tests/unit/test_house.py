"""The shape of the code: no import cycles, no borrowed private names, contracts that import
only the standard library (and other contracts).

Read from the source with ``ast``, every import counts: at module top, inside functions
(the lazy ones included) and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import ml_platform

PACKAGE = Path(ml_platform.__file__).parent
RESOURCES = PACKAGE / "resources"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
# Contracts: the __init__ of every folder under resources/ (one folder per outside system).
CONTRACTS = {
    name
    for name, path in MODULES.items()
    if path.parent.parent == RESOURCES and path.name == "__init__.py"
}


def imports(path: Path, *, at_run_time: bool = False) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every import statement in the file; with
    ``at_run_time``, not those under ``if TYPE_CHECKING:`` (annotations only)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped: set[int] = set()
    if at_run_time:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
                skipped |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            found.append((node.lineno, node.module or "", [alias.name for alias in node.names]))
    return found


def internal_targets(module: str, names: list[str]) -> set[str]:
    """The ml_platform modules an import runs: the module, or the submodules it names."""
    if module not in MODULES:
        return set()
    return {f"{module}.{name}" if f"{module}.{name}" in MODULES else module for name in names} or {
        module
    }


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        edges = graph.setdefault(name, set())
        parent = name.rpartition(".")[0]
        if parent in MODULES:  # importing a module runs its package's __init__ first
            edges.add(parent)
        for _, module, names in imports(path):
            edges |= internal_targets(module, names)
        edges.discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_the_checker_finds_a_cycle():
    # The checker itself must be able to fail.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_anywhere_in_ml_platform():
    assert cycles(import_graph()) == []


def test_every_outside_system_has_a_contract_folder():
    expected = {"warehouse", "pipeline_runs", "templates", "alerts"}
    assert {f"ml_platform.resources.{name}" for name in expected} <= CONTRACTS


def test_contracts_import_only_the_standard_library_and_other_contracts():
    # At run time: annotations may name pandas or pyarrow types under TYPE_CHECKING.
    for contract in sorted(CONTRACTS):
        for line, module, _ in imports(MODULES[contract], at_run_time=True):
            top = module.split(".")[0]
            allowed = top in sys.stdlib_module_names or module in CONTRACTS
            assert allowed, f"{MODULES[contract]}:{line}: the contract imports {module}"


def test_no_module_imports_private_names():
    """Neither another ml_platform module's private names, nor a library's private modules,
    except where no public API exists: such an import says so in a comment just above it."""
    problems = []
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        for line, module, names in imports(path):
            if module == "__future__":
                continue
            private_module = any(is_private(part) for part in module.split("."))
            private_names = [n for n in names if is_private(n)]
            if module in MODULES and private_names:
                problems.append(f"{path}:{line}: imports {private_names} from {module}")
            elif private_module or private_names:
                above = lines[max(0, line - 4) : line - 1]
                if not any("no public" in text.lower() for text in above if "#" in text):
                    problems.append(
                        f"{path}:{line}: private {module} {private_names or ''} without a "
                        "comment saying no public API exists"
                    )
    assert problems == []


def test_the_retried_status_codes_are_named_in_one_place():
    # Every backend retries through ml_platform/resources/retries.py and its RETRYABLE_STATUS.
    retried = {429, 500, 502, 503, 504}
    found = [
        f"{path}:{node.lineno}: {node.value}"
        for name, path in MODULES.items()
        if name != "ml_platform.resources.retries"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value in retried
    ]
    assert found == []
