"""The modules of `nas` import one another one way: no cycles, lazy imports inside functions
included (a cycle through a function-level import is still two modules that need each other)."""

import ast
from pathlib import Path

NAS = Path(__file__).resolve().parents[1] / "nas"


def module_name(path: Path) -> str:
    parts = path.relative_to(NAS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The nas modules ``path`` imports, anywhere in the file (``from nas.x import y`` counts as
    nas.x.y when that is a module, else nas.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        found |= {n for n in names if n in modules}
    return found - {module_name(path)}


def graph() -> dict[str, set[str]]:
    paths = sorted(NAS.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_graph_is_read_from_the_code():
    edges = graph()
    assert "nas.train" in edges["nas.workers"] and "nas.config" in edges["nas.train"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_nas_modules_import_one_another_without_cycles():
    assert find_cycle(graph()) is None


def test_the_data_layer_and_the_model_import_nothing_above_them():
    """nas.data, nas.model and the config and budget arithmetic sit at the bottom: they import one
    another and the error and file helpers, nothing else of nas (never the trainer, the search or
    the outputs)."""
    edges = graph()
    lows = ("nas.data", "nas.model", "nas.config", "nas.plan", "nas.budget")

    def low(m: str) -> bool:  # nas.model_card is not nas.model
        return any(m == p or m.startswith(p + ".") for p in lows)

    bottom = [m for m in edges if low(m)]
    assert {"nas.data.corpus", "nas.model.build", "nas.config", "nas.budget"} <= set(bottom)
    for m in bottom:
        assert not {d for d in edges[m] if not low(d) and d not in ("nas.errors", "nas.files")}, m


def test_the_report_sits_on_top_only_the_command_line_and_the_demo_import_it():
    """The export, the model card and the measurements use what the report uses (nas.conditions,
    nas.markdown), never the report itself."""
    edges = graph()
    users = {m for m, deps in edges.items() if any(d == "nas.report" or d.startswith("nas.report.") for d in deps)}
    assert {m for m in users if not m.startswith("nas.report")} == {"nas.cli", "nas.demo"}
