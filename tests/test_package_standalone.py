"""The installed package stands alone: nothing under gateway/ reaches into the checkout.

A wheel installs ``gateway/`` only, so a module that builds a path into the repository's
``tests/`` (or climbs out of the package with ``Path(__file__).parents[N]``) works in a checkout
and breaks once installed. This reads every module's source (no imports, no I/O beyond the
files): string constants that name a ``tests`` directory, and ``parents[N]`` that leave the
package. Docstrings may mention tests; code may not build paths with them. Test doubles live
under tests/, not in the package's exports.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import gateway
import gateway.controlplane

PACKAGE = Path(gateway.__file__).resolve().parent
TESTS_PATH = re.compile(r"(?:^|[/\\])tests(?:[/\\]|$)")


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the Constant nodes that are docstrings (module, class, function)."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
        ):
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def escapes(source: str, depth: int) -> list[str]:
    """What in *source* (a module *depth* directories below the package root's parent, e.g. 2
    for gateway/bench/_run.py) builds a path into tests/ or out of the package."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docs
            and TESTS_PATH.search(node.value)
        ):
            found.append(f"line {node.lineno}: {node.value!r}")
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "parents"
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, int)
            and node.slice.value >= depth - 1
        ):
            found.append(f"line {node.lineno}: parents[{node.slice.value}] leaves the package")
    return found


def test_the_check_catches_the_old_peer_path() -> None:
    old = 'PEER = Path(__file__).resolve().parents[2] / "tests" / "perf" / "ws_peer.py"\n'
    assert len(escapes(old, depth=2)) == 2
    assert escapes('"""Run by the tests/ suite."""\nX = Path(__file__).parents[0]\n', 2) == []
    assert escapes('ROOT = "../tests"\n', 1) and escapes('P = "tests"\n', 1)
    assert escapes('HELP = "the tests use this"\n', 1) == []


def test_no_module_builds_a_path_into_the_checkout() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 20
    problems = {
        str(path.relative_to(PACKAGE.parent)): found
        for path in modules
        if (found := escapes(path.read_text(), len(path.relative_to(PACKAGE).parts)))
    }
    assert problems == {}


def test_the_package_exports_no_test_doubles() -> None:
    for name in ("MemoryTarget", "MemoryHistogram"):
        assert not hasattr(gateway.controlplane, name)
        assert name not in gateway.controlplane.__all__
