"""The package's layering, read from the source: the model imports nothing but the model package and
the leaf ``partitioning`` module (no mesh building, training, data or I/O), and ``partitioning``
imports nothing of the project."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "iclm_jax"


def _project_imports(path: pathlib.Path) -> set[str]:
    """Every ``iclm_jax`` module a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "iclm_jax")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "iclm_jax":
            # "from iclm_jax import x" imports the submodule iclm_jax.x
            out.update(f"{node.module}.{a.name}" if node.module == "iclm_jax" else node.module
                       for a in node.names)
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
    f.write_text("import jax\nfrom iclm_jax import sharding\ndef g():\n    from iclm_jax.train import loop\n")
    assert _project_imports(f) == {"iclm_jax.sharding", "iclm_jax.train"}
