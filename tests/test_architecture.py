"""The package's import structure, as docs/design.md draws it, checked from the source.

Imports run one way: each package of ``gateway`` has a layer, and a module may import only
from layers below its own (never sideways: the hub and the upstream do not know each other).
No module imports another package's private (``_name``) module, tests included: what a package
offers is what its ``__init__`` exports. Read with :mod:`ast`, so a lazy import inside a
function counts too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Layer of each top-level part of the package; imports go strictly downwards.
LAYERS: dict[str, int] = {
    # Leaves: shared facts, importing nothing of the gateway.
    "__init__": 0,  # the version
    "wire": 0,
    "model": 0,
    "errors": 0,
    "throttle": 0,
    "histogram": 0,  # fixed-bucket counts: the fan-out latency (hub), the data age (upstream)
    "config": 0,
    "listen": 0,  # the listeners' sockets (SO_REUSEPORT)
    # The two sides of the hub's FrameSink contract, and the tools that stand beside them.
    "hub": 1,
    "upstream": 1,
    "recorder": 1,  # beside the hub and the upstream: the service wires it to both
    "cluster": 1,  # Redis: leases, appends, relay reads; the service wires it to hub and upstream
    "client": 1,
    "replay": 2,  # a fixture's frames again: reads topics' archives, paces, passes through
    "dataplane": 3,
    "simulator": 3,  # replays the recorder's files
    "controlplane": 4,
    "service": 5,
    "bench": 6,
    "soak": 6,
    "cli": 7,
    "__main__": 8,
}


def _part(path: Path) -> str:
    rel = path.relative_to(ROOT / "gateway").with_suffix("")
    return rel.parts[0]


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted module) of every import of ``gateway...`` in *path*."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "gateway":
                for alias in node.names:
                    yield node.lineno, f"gateway.{alias.name}"
            elif node.module.startswith("gateway."):
                yield node.lineno, node.module
                for alias in node.names:  # from gateway.hub import _topic
                    if alias.name.startswith("_"):
                        yield node.lineno, f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "gateway" or alias.name.startswith("gateway."):
                    yield node.lineno, alias.name


def layering_violations(edges: list[tuple[str, str, str]]) -> list[str]:
    """Edges ``(where, from part, to part)`` that do not go strictly down a layer."""
    bad = []
    for where, src, dst in edges:
        if src == dst:
            continue
        if src not in LAYERS or dst not in LAYERS:
            bad.append(f"{where}: {src} -> {dst}: part without a layer (add it to LAYERS)")
        elif LAYERS[dst] >= LAYERS[src]:
            bad.append(f"{where}: {src} (layer {LAYERS[src]}) imports {dst} (layer {LAYERS[dst]})")
    return bad


def private_violations(importer_part: str | None, module: str) -> bool:
    """True when *module* is another package's private module (``gateway.X._y``)."""
    parts = module.split(".")
    # Dunders (__version__, __main__) are not private modules.
    private = [p for p in parts if p.startswith("_") and not p.endswith("__")]
    if not private:
        return False
    return importer_part != parts[1]


def _package_edges() -> list[tuple[str, str, str]]:
    edges = []
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        src = _part(path)
        for line, module in _imports(path):
            dst = module.split(".")[1] if "." in module else "__init__"
            if dst == "__version__":
                dst = "__init__"
            edges.append((f"{path.relative_to(ROOT)}:{line}", src, dst))
    return edges


def test_imports_run_one_way() -> None:
    edges = _package_edges()
    assert len(edges) > 50  # the walk found the package's imports at all
    assert layering_violations(edges) == []


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {_part(p) for p in (ROOT / "gateway").rglob("*.py")}
    assert parts <= LAYERS.keys(), sorted(parts - LAYERS.keys())


def test_no_import_of_another_packages_private_module() -> None:
    bad = []
    for path in sorted([*(ROOT / "gateway").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]):
        inside = _part(path) if path.is_relative_to(ROOT / "gateway") else None
        for line, module in _imports(path):
            if private_violations(inside, module):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert bad == []


def test_leaves_import_nothing_of_the_gateway_above_them() -> None:
    for leaf in ("wire", "model", "errors", "listen"):
        imported = [m for _, m in _imports(ROOT / "gateway" / f"{leaf}.py")]
        assert imported == [], (leaf, imported)


@pytest.mark.parametrize(
    ("edge", "ok"),
    [
        (("x", "dataplane", "hub"), True),
        (("x", "hub", "upstream"), False),  # sideways
        (("x", "upstream", "hub"), False),
        (("x", "hub", "dataplane"), False),  # upwards
        (("x", "model", "config"), False),  # a leaf importing a leaf: sideways too
        (("x", "newpart", "hub"), False),  # unknown parts must be placed first
    ],
)
def test_the_layering_check_can_fail(edge: tuple[str, str, str], ok: bool) -> None:
    assert (layering_violations([edge]) == []) is ok


@pytest.mark.parametrize(
    ("importer", "module", "bad"),
    [
        ("hub", "gateway.hub._topic", False),
        ("hub", "gateway.upstream._state", True),
        (None, "gateway.hub._topic", True),
        (None, "gateway.hub", False),
        (None, "gateway.wire", False),
    ],
)
def test_the_private_check_can_fail(importer: str | None, module: str, bad: bool) -> None:
    assert private_violations(importer, module) is bad
