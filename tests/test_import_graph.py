"""vlkit's import graph: no cycle among module-level imports, and the layers point down."""

from __future__ import annotations

import ast
from pathlib import Path

import vlkit

ROOT = Path(vlkit.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, modules: set[str]) -> tuple[set[str], set[str]]:
    """(module-level, function-level) vlkit modules that ``path`` imports; ``if TYPE_CHECKING:`` blocks
    import nothing at run time and are left out. ``from pkg import name`` counts ``pkg.name`` when that is
    a module, else ``pkg``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top: set[str] = set()
    inner: set[str] = set()

    def targets(node: ast.Import | ast.ImportFrom) -> set[str]:
        if isinstance(node, ast.Import):
            return {a.name for a in node.names}
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, *([base] if base else [])])
        return {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(ast.Module(body=[sub], type_ignores=[]), in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found = {t for t in targets(child) if t.split(".")[0] == "vlkit"}
                (inner if in_function else top).update(found)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), str(path)), False)
    return top, inner


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    top: dict[str, set[str]] = {}
    inner: dict[str, set[str]] = {}
    for name, path in files.items():
        t, i = imports(path, modules)
        # importing `a.b.c` runs `a/__init__` and `a/b/__init__` too (from outside those packages: inside,
        # a submodule's own package is always initialised first, whatever it imports)
        parents = {".".join(m.split(".")[:k]) for m in t for k in range(2, m.count(".") + 1)}
        top[name] = {m for m in t if m in modules} | {p for p in parents if not name.startswith(p + ".")}
        inner[name] = {m for m in i if m in modules}
        top[name].discard(name)
    return top, inner


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return out


def test_the_graph_sees_module_and_function_level_imports():
    top, inner = graph()
    assert "vlkit.config" in top["vlkit.model"]  # module level
    assert "vlkit.registry" in inner["vlkit.model"]  # inside build_model
    assert "vlkit.model" not in top["vlkit.data.feature_cache"]  # under TYPE_CHECKING only
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_at_module_level():
    top, _ = graph()
    found = cycles(top)
    assert not found, "import cycles among module-level imports: " + "; ".join(" <-> ".join(c) for c in found)


def test_lower_layers_import_no_higher_ones():
    top, inner = graph()
    everything = {name: top[name] | inner[name] for name in top}
    assert not everything["vlkit.constants"]
    assert everything["vlkit.schema"] <= {"vlkit.errors"}  # recipe schemas: usable from every layer
    # the cycles of function-level imports that existed: config <-> registry <-> encoders.holistic,
    # data.feature_cache <-> data.shards <-> data.processor, training.mix -> training.fit -> training
    assert "vlkit.config" not in everything["vlkit.registry"]
    assert "vlkit.config" not in everything["vlkit.encoders.holistic"]
    assert not {"vlkit.data.shards", "vlkit.data.processor", "vlkit.model"} & everything["vlkit.data.feature_cache"]
    assert "vlkit.training.fit" not in everything["vlkit.training.mix"]
    assert not {m for m in top["vlkit.model"] if m.startswith("vlkit.training")}
    assert not {m for m in everything["vlkit.model"] if m.startswith("vlkit.training")}
    for name, deps in top.items():  # the model's parts never import the model or the training stack
        if name.startswith(("vlkit.encoders", "vlkit.fusions", "vlkit.strategies", "vlkit.constants")):
            assert not {d for d in deps if d in ("vlkit.model", "vlkit.module") or d.startswith("vlkit.training")}, name
