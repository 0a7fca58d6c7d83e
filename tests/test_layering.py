"""The house rules, read from the code's own imports (every `import` and `from ... import`, those
inside functions included): lumo_core never imports Dagster, the Dagster layer is never imported
by lumo_core, and no import circle exists anywhere in lumo_core or lumo_pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lumo_core", "lumo_pipeline")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imported_names(path: Path, name: str) -> set[str]:
    """Every module name an import statement in the file names (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from lumo_core.audit import audits` imports the module lumo_core.audit.audits.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def project_import_graph() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for imported in imported_names(path, name):
            # The nearest known module: `lumo_core.uti.adapters.base.pad_rows` -> lumo_core.uti.adapters.base.
            while imported and imported not in known:
                imported = imported.rpartition(".")[0]
            # A package's __init__ importing its own submodules is how packages work, not a circle.
            if (
                imported
                and imported != name
                and not (imported.startswith(name + ".") and known[name].name == "__init__.py")
            ):
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
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
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_cycle_finder_finds_a_planted_circle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_either_package():
    graph = project_import_graph()
    assert "lumo_core.cli" in graph and graph["lumo_core.cli"], "the graph was not built"
    assert find_cycles(graph) == []


@pytest.mark.parametrize("name", sorted(n for n in modules() if n.startswith("lumo_core")))
def test_lumo_core_never_imports_dagster_or_the_dagster_layer(name: str):
    imported = imported_names(modules()[name], name)
    forbidden = sorted(
        i
        for i in imported
        if i.split(".")[0] in ("dagster", "lumo_pipeline")
        or i.startswith("dagster_")
        and i.split(".")[0] != "dagster_pipes"
    )
    assert forbidden == []


# lumo_core's layers, lowest first: a module may import its own layer and the layers below, never
# one above. Top-level modules not named here are the base layer (config, errors, fileio, ...).
LAYERS = ("base", "uti", "tokenize", "lm", "audit", "bench", "entry")
ENTRY_MODULES = {"lumo_core.cli", "lumo_core.torchrun_train", "lumo_core.input_versions"}


def layer_of(name: str) -> str:
    if name in ENTRY_MODULES:
        return "entry"
    parts = name.split(".")
    if len(parts) >= 3 and parts[1] in LAYERS:
        return parts[1]
    return "base"


def test_layer_of_names_every_package():
    assert layer_of("lumo_core.uti.adapters.vq") == "uti"
    assert layer_of("lumo_core.fileio") == "base"
    assert layer_of("lumo_core.cli") == "entry"
    packages = {path.parent.name for path in (ROOT / "lumo_core").glob("*/__init__.py")}
    assert packages - {"data"} <= set(LAYERS), "a new package under lumo_core needs its place in LAYERS"


def test_no_package_imports_a_higher_layer():
    graph = project_import_graph()
    upward = sorted(
        f"{source} ({layer_of(source)}) imports {target} ({layer_of(target)})"
        for source, targets in graph.items()
        if source.startswith("lumo_core")
        for target in targets
        if target.startswith("lumo_core") and LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(source))
    )
    assert upward == []


def test_at_most_twelve_modules_at_the_top_of_lumo_core():
    top = sorted(path.name for path in (ROOT / "lumo_core").glob("*.py"))
    assert len(top) <= 12, top
