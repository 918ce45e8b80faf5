"""Package-level contracts: public names, layering, metadata."""

import ast
import pathlib

import bilevel
import solvers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_all_names_exist():
    for mod in (bilevel, solvers):
        for name in mod.__all__:
            assert hasattr(mod, name), f"{mod.__name__}.{name} listed in __all__ but missing"


def test_solvers_contract_names():
    for name in [
        "cg",
        "neumann",
        "gmres",
        "bicgstab",
        "direct",
        "custom_root",
        "custom_fixed_point",
        "argmin",
        "Implicit",
        "Unrolled",
        "Truncated",
    ]:
        assert name in solvers.__all__


def imports_of(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module.split(".")[0]


def test_layering_imports_point_down():
    for path in (ROOT / "solvers").rglob("*.py"):
        bad = {"bilevel", "experiments", "flax"} & set(imports_of(path))
        assert not bad, f"{path} imports {bad}"
    for path in (ROOT / "bilevel").rglob("*.py"):
        assert "experiments" not in set(imports_of(path)), path
