"""The docs run as written: every shell example in README.md and docs/*.md against a real
``dde-gateway demo`` (a separate process on free ports).

A block is a fenced ``sh`` (or ``bash``, ``shell``, ``console``) block. Its commands are the lines
that start with a command this repository documents (``curl``, ``dde-gateway``, ...) and the
lines continuing them (after a ``\\`` or ``|``); the other lines are the output shown. Each block
runs in bash with ``set -eo pipefail``, ``curl`` failing on an HTTP error status, the demo's ports
put where the docs say 8780 / 8765 / 8799, and ``dde-gateway`` on PATH. A block that needs more
than the demo says so in an HTML comment on the line before its fence:

    <!-- not run: needs systemd and root -->      skipped, with that reason
    <!-- run: error statuses expected -->         run, but curl may get 4xx (the example shows one)

pytest lists how many ran and, with ``-rs``, every skipped block with its reason.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from gateway.service import DEMO_TRACKING

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Pages the lead edits (common rules): their blocks cannot carry a marker from this test's
#: authors, so an unmarked block there is skipped with this reason instead of failing.
LEAD_OWNED = {"docs/reliability.md", "docs/security.md"}
FENCE = re.compile(r"^```(?:sh|bash|shell|console)\n(.*?)^```", re.M | re.S)
MARKER = re.compile(r"<!--\s*(not run|run):\s*(.*?)\s*-->")
COMMAND = re.compile(
    r"^(?:sudo |[A-Z_]+=\S* )*(curl|dde-gateway|python3?|pip|node|systemctl|journalctl|printf|"
    r"sh|install|ln|cp|mkdir|\.venv/bin/\S+)\b"
)
#: Where the docs' examples point, and what the demo is asked for.
DOC_PORTS = {"http": "127.0.0.1:8780", "stream": "127.0.0.1:8765", "simulator": "127.0.0.1:8799"}
BLOCK_TIMEOUT = 30.0
DEMO_PORTS_FREE = ("--stream-port", "0", "--http-port", "0", "--simulator-port", "0")


class Block(NamedTuple):
    where: str  # path:line of the fence
    commands: str
    skip: str | None  # the reason it is not run
    errors_expected: bool


def _blocks() -> Iterator[Block]:
    for path in DOCS:
        text = path.read_text()
        rel = str(path.relative_to(ROOT))
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = MARKER.search(before)
            commands = _commands(match.group(1))
            skip: str | None = None
            if marker is not None and marker.group(1) == "not run":
                skip = marker.group(2)
            elif marker is None and rel in LEAD_OWNED:
                skip = f"{rel} is the lead's page: no marker yet"
            elif not commands:
                skip = "no command in the block"
            errors = marker is not None and marker.group(1) == "run" and "error" in marker.group(2)
            yield Block(f"{rel}:{line}", commands, skip, errors)


def _commands(body: str) -> str:
    lines: list[str] = []
    continued = False
    for line in body.splitlines():
        if continued or COMMAND.match(line):
            lines.append(line)
            continued = line.rstrip().endswith(("\\", "|", "&&"))
    return "\n".join(lines)


BLOCKS = list(_blocks())


class Demo(NamedTuple):
    ports: dict[str, str]  # http, stream, simulator -> host:port


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--log-level", "warning", *DEMO_PORTS_FREE],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ports: dict[str, str] = {}
        patterns = {
            "simulator": r"simulator \(vendor stand-in\): ws://(\S+)",
            "stream": r"subscriber WebSocket: +ws://(\S+)/v1/stream",
            "http": r"HTTP API: +http://(\S+)/v1/status",
        }
        while len(ports) < len(patterns):  # the banner (the pytest timeout bounds the wait)
            line = proc.stdout.readline()
            assert line, f"demo exited ({proc.wait()}) before its banner"
            for name, pattern in patterns.items():
                if found := re.search(pattern, line):
                    ports[name] = found.group(1)
        # Ready for the examples: the first tracking fixture has a frame.
        latest = f"http://{ports['http']}/v1/fixtures/tracking/{DEMO_TRACKING[0]}/latest"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(latest, timeout=5):
                    break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "the demo's fixture never got a frame"
                time.sleep(0.1)  # polling the condition itself, not assuming it
        yield Demo(ports)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_docs_have_runnable_examples_and_every_skip_has_a_reason() -> None:
    ran = [b for b in BLOCKS if b.skip is None]
    skipped = [b for b in BLOCKS if b.skip is not None]
    assert len(ran) >= 10, [b.where for b in ran]
    assert all(b.skip for b in skipped)
    # Privileged or host-changing commands are never run by accident.
    for block in ran:
        assert not re.search(r"\b(sudo|systemctl|journalctl)\b", block.commands), block.where


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_example_runs_against_the_demo(block: Block, demo: Demo) -> None:
    if block.skip is not None:
        pytest.skip(f"{block.where}: {block.skip}")
    script = block.commands
    for name, doc_port in DOC_PORTS.items():
        script = script.replace(doc_port, demo.ports[name])
    curl = 'curl() { command curl --max-time 10 --fail-with-body "$@"; }\n'
    if block.errors_expected:
        curl = 'curl() { command curl --max-time 10 "$@"; }\n'
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["H"] = "X-Docs-Example: 1"  # the demo has no token file: any harmless header
    result = subprocess.run(
        ["bash", "-c", "set -eo pipefail\n" + curl + script],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, (
        f"{block.where} failed ({result.returncode}):\n{script}\n"
        f"--- stdout\n{result.stdout[-2000:]}\n--- stderr\n{result.stderr[-2000:]}"
    )
