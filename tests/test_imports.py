"""The package's layering, read from the source: no import cycles between its modules, the model
imports nothing but the model package and the leaf ``partitioning`` module (no mesh building,
training, data or I/O), and ``partitioning`` imports nothing of the project."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "iclm_jax"


def _main_guards(tree) -> list:
    """``if __name__ == "__main__":`` blocks: they run only when the file is the script, a module of
    its own (``__main__``), so what they import is not an import of this module."""
    return [n for n in tree.body if isinstance(n, ast.If) and isinstance(n.test, ast.Compare)
            and isinstance(n.test.left, ast.Name) and n.test.left.id == "__name__"]


def _project_imports(path: pathlib.Path) -> set[str]:
    """Every ``iclm_jax`` module a file imports, at module level or inside functions."""
    out = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = {id(n) for guard in _main_guards(tree) for n in ast.walk(guard)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "iclm_jax")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "iclm_jax":
            # "from iclm_jax import x" / "from iclm_jax.model import x" import the submodule (package.x)
            package = (PKG.parent / node.module.replace(".", "/")).is_dir()
            out.update(f"{node.module}.{a.name}" if package else node.module for a in node.names)
    return out


@pytest.mark.parametrize("path", sorted((PKG / "model").glob("*.py")), ids=lambda p: p.name)
def test_the_model_imports_only_the_model_and_partitioning(path):
    bad = {m for m in _project_imports(path)
           if not m.startswith("iclm_jax.model.") and m != "iclm_jax.partitioning"}
    assert not bad, f"{path.name} imports infrastructure: {sorted(bad)}"


def test_partitioning_is_a_leaf():
    assert _project_imports(PKG / "partitioning.py") == set()


def test_the_checker_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import jax\nfrom iclm_jax import sharding\ndef g():\n    from iclm_jax.train import loop\n"
                 "from iclm_jax.model import rows\nfrom iclm_jax.model.lora import LoraConfig\n")
    assert _project_imports(f) == {"iclm_jax.sharding", "iclm_jax.train.loop", "iclm_jax.model.rows",
                                   "iclm_jax.model.lora"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports ("from iclm_jax.data import acre" -> the module
    iclm_jax.data.acre; "from iclm_jax.data.acre import X" -> iclm_jax.data.acre)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}

    def resolve(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return name
    return {m: {resolve(t) for t in _project_imports(p)} - {m} for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _import_graph()
    assert "iclm_jax.data.acre" in graph["iclm_jax.data.cli"]     # the graph sees the package
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# Deferred on purpose (each says why in a comment): jax.distributed.initialize must run before the
# training stack touches a jax backend.
DEFERRED = {"main.py"}


def test_project_imports_are_at_module_level():
    """An import inside a function hides a dependency (and, in this project, used to hide cycles)."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = {id(n) for guard in _main_guards(tree) for n in ast.walk(guard)}
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or id(fn) in skip:
                continue
            for node in ast.walk(fn):
                mod = (node.module if isinstance(node, ast.ImportFrom) else
                       node.names[0].name if isinstance(node, ast.Import) else None)
                if mod and mod.split(".")[0] == "iclm_jax":
                    found.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    rel = {f.split(":")[0] for f in found}
    assert rel <= {f"iclm_jax/{d}" for d in DEFERRED}, found
