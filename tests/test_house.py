"""The shape of the package (issue 28), measured from its own source so that it stays that way:

- imports flow down the pipeline: a package never imports one that stands later in PIPELINE;
- no import circle between modules (imports at module level: those run when a module is imported);
- no module over 500 lines, no function over 80 (nested functions count towards the function that holds them; its
  docstring does not).

A new package gets its place in PIPELINE; the test fails until it has one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "src" / "bloodcell"

# The pipeline from the bottom up. The loose modules at the root (errors, io, config, ...) are the floor everything
# stands on; `detect` is the smear-photograph detector's wing, which uses the classifier's floors below it.
PIPELINE = ["", "data", "models", "train", "evaluate", "study", "detect", "infer", "review", "serve", "cli", "__main__"]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _floor(module: str) -> str:
    """The pipeline floor of a dotted module name: its first package under bloodcell, '' for the loose modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PIPELINE else ""


def _imports(tree: ast.Module, module_level_only: bool) -> list[tuple[int, str]]:
    """(line, dotted name) of every bloodcell import; `from bloodcell.x import y` names bloodcell.x.y when y is a
    module, else bloodcell.x."""
    modules = _modules()
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    if module_level_only:  # an import under `if TYPE_CHECKING:` or try/except at the top still runs at import time
        nodes = [n for top in tree.body for n in ast.walk(top) if not isinstance(top, (ast.FunctionDef, ast.ClassDef))]
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("bloodcell")]
        elif (
            isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bloodcell") and not node.level
        ):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((node.lineno, sub if sub in modules else node.module))
    return found


def test_every_package_has_a_place_in_the_pipeline():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages <= set(PIPELINE), f"give {sorted(packages - set(PIPELINE))} a place in PIPELINE"


def test_imports_flow_down_the_pipeline():
    upward = []
    for module, path in _modules().items():
        here = PIPELINE.index(_floor(module))
        for line, target in _imports(ast.parse(path.read_text()), module_level_only=False):
            if PIPELINE.index(_floor(target)) > here:
                upward.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not upward, "imports that run back up the pipeline:\n" + "\n".join(upward)


def test_no_import_circle():
    modules = _modules()
    graph = {
        name: {t for _, t in _imports(ast.parse(path.read_text()), module_level_only=True) if t != name}
        for name, path in modules.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


def _too_long(tree: ast.Module):
    """(line, name, lines) of each function over the limit. Its docstring does not count: an `Args:` block must
    never be what pushes a function over."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                lines -= first.end_lineno - first.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                yield node.lineno, node.name, lines


@pytest.mark.parametrize("limit", ["module", "function"])
def test_modules_and_functions_stay_small(limit):
    over = []
    for module, path in _modules().items():
        text = path.read_text()
        if limit == "module" and len(text.splitlines()) > MAX_MODULE_LINES:
            over.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        if limit == "function":
            over += [
                f"{path.relative_to(REPO)}:{line} {name}: {n} lines" for line, name, n in _too_long(ast.parse(text))
            ]
    top = MAX_MODULE_LINES if limit == "module" else MAX_FUNCTION_LINES
    assert not over, f"over {top} lines (split by idea):\n" + "\n".join(over)
