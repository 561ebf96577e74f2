"""The layers of ferryd, read from the imports of its source (ARCHITECTURE in README).

Every import counts, at module level, inside a function or under
TYPE_CHECKING alike: a cycle hidden under a late import is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Import name -> folder (pyproject.toml's package-dir).
PACKAGES = {"ferryd": ROOT / "daemon", "ferry_repair": ROOT / "repair_helper"}


def _module_name(package: str, folder: Path, path: Path) -> str:
    parts = list(path.relative_to(folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join((package, *parts))


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            found[_module_name(package, folder, path)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module of ours that ``name`` (a module or a name in one) is, if any."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{alias.name}" for alias in node.names] or [base]
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                out.add(target)
    return out


GRAPH = {module: _imports(module) for module in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def _layer(module: str) -> str:
    """A module's room: its subpackage (ferryd.flows), or itself at the top."""
    parts = module.split(".")
    top = ".".join(parts[:2])
    return top if (top in MODULES and MODULES[top].name == "__init__.py") else module


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_module_imports_in_a_circle() -> None:
    assert _cycles(GRAPH) == []


def test_no_package_imports_in_a_circle() -> None:
    rooms: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        room = rooms.setdefault(_layer(module), set())
        room.update(_layer(t) for t in targets if _layer(t) != _layer(module))
    assert _cycles(rooms) == []


def test_nothing_imports_main() -> None:
    assert sorted(m for m, targets in GRAPH.items() if "ferryd.main" in targets) == []


def test_migration_knows_neither_control_nor_a_frontend() -> None:
    """Migration drives any frontend through the data path (ARCHITECTURE), and the data
    path only through its own narrow protocol (ferryd.migration.host), never the
    DataPath, the stack, or the control handlers and the coordinator that drive it."""
    forbidden = (
        "ferryd.main",
        "ferryd.control",
        "ferryd.frontends",
        "ferryd.ctl",
        "ferryd.datapath",
        "ferryd.stack",
        "ferryd.migration_control",
        "ferryd.coordinator",
    )
    offenders = {
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if _within(module, "ferryd.migration")
        for target in targets
        if any(_within(target, f) for f in forbidden)
    }
    assert offenders == set()


def test_flows_do_not_import_migration() -> None:
    offenders = {
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if any(_within(module, p) for p in ("ferryd.flows", "ferryd.wire", "ferryd.services"))
        for target in targets
        if _within(target, "ferryd.migration")
    }
    assert offenders == set()


def test_ferry_repair_imports_nothing_of_ferryd() -> None:
    offenders = {
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if _within(module, "ferry_repair")
        for target in targets
        if _within(target, "ferryd")
    }
    assert offenders == set()


def test_the_graph_is_read() -> None:
    """The reader sees imports at all (else every test above passes vacuously)."""
    assert "ferryd.wire.ip" in GRAPH["ferryd.flows.tcp"] or any(
        t.startswith("ferryd.wire") for t in GRAPH["ferryd.flows.tcp"]
    )
    assert "ferryd.config" in GRAPH["ferryd.main"]
