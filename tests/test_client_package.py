"""The Python client as a distribution of its own (clients/python).

- It versions with the gateway: one version in both pyproject files, what both packages
  report once installed, and the gateway's requirement pins it.
- It depends on a WebSocket library and nothing of the gateway's server side: its modules
  import the standard library, trio + trio-websocket (the ``trio`` extra) and websockets (the
  ``asyncio`` extra) only, and its metadata requires nothing without an extra.
- The wheel builds offline (``pip wheel --no-deps --no-build-isolation``, no index) from a
  copy of the tree, and carries ``py.typed``.
"""

from __future__ import annotations

import ast
import os
import shutil
import sys
import tomllib
import zipfile
from pathlib import Path

import dde_gateway_client
import trio

import gateway
from tests.clients_kit import ROOT

CLIENT = ROOT / "clients" / "python"
ALLOWED = {"trio", "trio_websocket", "websockets"}


def _version(pyproject: Path) -> str:
    return str(tomllib.loads(pyproject.read_text())["project"]["version"])


def test_the_client_versions_with_the_gateway() -> None:
    version = _version(ROOT / "pyproject.toml")
    assert _version(CLIENT / "pyproject.toml") == version
    assert gateway.__version__ == dde_gateway_client.__version__ == version
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"dde-gateway-client[trio]=={version}" in deps
    assert dde_gateway_client.PROTOCOLS == ("dde.v1",)


def test_the_client_imports_nothing_of_the_server_side() -> None:
    stdlib = set(sys.stdlib_module_names)
    sources = sorted((CLIENT / "src").rglob("*.py")) + sorted((CLIENT / "examples").rglob("*.py"))
    assert len(sources) >= 8
    outside: dict[str, set[str]] = {}
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in stdlib and top not in ALLOWED and top != "dde_gateway_client":
                    outside.setdefault(str(path.relative_to(ROOT)), set()).add(top)
    assert outside == {}
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == []
    assert set(project["optional-dependencies"]) == {"trio", "asyncio"}


async def test_the_wheel_builds_offline(tmp_path: Path) -> None:
    tree = tmp_path / "src"
    shutil.copytree(
        CLIENT, tree, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__")
    )
    out = tmp_path / "wheels"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": ""}
    with trio.fail_after(110):
        result = await trio.run_process(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-q",
                str(tree),
                "-w",
                str(out),
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    (wheel,) = out.glob("*.whl")
    version = dde_gateway_client.__version__
    assert wheel.name == f"dde_gateway_client-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read(f"dde_gateway_client-{version}.dist-info/METADATA").decode()
    assert "dde_gateway_client/py.typed" in names
    assert "dde_gateway_client/_core.py" in names
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert requires and all("extra ==" in line for line in requires), requires
