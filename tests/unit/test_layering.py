"""Lower layers never import higher ones: the package import graph follows LAYERS, for every
import statement — at module level and inside functions (a lazy import is still a dependency,
and a hidden package cycle)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "nemo_loop"
# A package may import packages of its own layer or below.
LAYERS = {
    "config": 0, "utils": 0,
    "data": 1,
    "models": 2,
    "losses": 3, "generation": 3, "checkpointing": 3, "checkpoint_manifest": 3, "tasks": 3,
    "algorithms": 4, "conversion": 4,
    "evaluation": 5,
    "experiments": 6,
}


def _imported_modules(tree: ast.AST, path: Path) -> list[str]:
    """Absolute module names of every Import/ImportFrom node anywhere in ``tree`` (relative
    imports resolved against ``path``; ``from nemo_loop import x`` names ``nemo_loop.x``)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the path's package upwards
                parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
                base = parts[:len(parts) - node.level]
                module = ".".join(base + ((module,) if module else ()))
            names += [f"{module}.{alias.name}" for alias in node.names] \
                if module == "nemo_loop" else [module]
    return names


def _imports(path: Path) -> set[str]:
    """Top-level nemo_loop packages imported anywhere in ``path`` (function bodies included)."""
    return {name.split(".")[1] for name in _imported_modules(ast.parse(path.read_text()), path)
            if name.startswith("nemo_loop.")}


def _package(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_every_package_has_a_layer():
    packages = {_package(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"
                or p.parent != PACKAGE}
    assert packages <= set(LAYERS), packages - set(LAYERS)


def test_no_module_imports_a_higher_layer():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue
        own = _package(path)
        for imported in _imports(path):
            if LAYERS[imported] > LAYERS[own]:
                violations.append(f"{path.relative_to(PACKAGE.parent)} ({own}) imports "
                                  f"nemo_loop.{imported}")
    assert not violations, "\n".join(violations)


def test_imports_inside_functions_are_seen():
    """The checker finds a lazy upward import, ``from nemo_loop import x`` and relative forms."""
    source = (
        "def f():\n"
        "    from nemo_loop.checkpointing import save_checkpoint\n"
        "def g():\n"
        "    import nemo_loop.algorithms.common\n"
        "    from nemo_loop import evaluation\n"
        "    from ...conversion import ouro\n")
    path = PACKAGE / "models" / "looplm" / "example.py"
    found = {name.split(".")[1] for name in _imported_modules(ast.parse(source), path)}
    assert found == {"checkpointing", "algorithms", "evaluation", "conversion"}


def test_data_and_algorithms_never_import_evaluation():
    for package in ("data", "algorithms", "tasks"):
        for path in (PACKAGE / package).rglob("*.py"):
            assert "evaluation" not in _imports(path), path
