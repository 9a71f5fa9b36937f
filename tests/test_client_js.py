"""The JavaScript client (clients/js, docs/clients-js.md) under Node, driven from here.

Covers: its own unit tests (``node --test clients/js/test/``: the sans-I/O core event by event,
the bounded queue's two policies, the watchdog, the token's handling) pass; the hand-written
declarations compile with ``tsc --strict`` against a file that uses every one of them; the
package versions with the gateway and ``npm pack`` builds it offline with exactly its files;
the dashboard ships the client byte for byte; ``examples/watch.mjs`` refuses bad arguments
(exit 2) and, against a real gateway with a recorder restarting twice, goes through its URLs in
turn (the first one dead) and resumes ``recovered`` with every frame once; Node's own
WebSocket (``--experimental-websocket`` on Node 20) works without an injected constructor, the
token offered as a subprotocol as a browser does; ``watch.mjs`` over ``wss://`` with a
private CA (``--ca-file``) and a header token (``--token-file``), the token in no output;
its default output (one line per frame, states on stderr). The scenarios both clients share
run for Node in tests/test_client_conformance.py (runner ``node`` of tests/clients_kit.py);
the client in Chromium in tests/test_client_js_browser.py.

Node is Debian's ``nodejs`` (``.ci/test`` installs it as root when missing), ``tsc`` Debian's
``node-typescript``; without them these tests fail in CI (``CI=true``) and skip elsewhere.
Rules: 127.0.0.1 port 0 (a restarted gateway takes the port its predecessor was given),
``trio.fail_after`` on every test, waits on what the client printed, never a guessed sleep.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

import gateway
from tests.clients_kit import contiguous, frame_problems, seqs, watch
from tests.test_client_conformance import FX, site

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "clients" / "js"
WATCH = JS / "examples" / "watch.mjs"
DASHBOARD = ROOT / "gateway" / "controlplane" / "dashboard"
#: The client's source files the dashboard ships (byte for byte).
SHIPPED = ("core.js", "client.js")


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        why = f"{name} is missing: apt-get install -y {package} (.ci/test does it as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def node() -> str:
    return _tool("node", "nodejs")


def test_the_clients_own_tests_pass_under_node(node: str) -> None:
    result = subprocess.run(
        [node, "--test", *sorted(str(p) for p in (JS / "test").glob("*.test.mjs"))],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout and "# pass " in result.stdout


def test_the_declarations_compile_strictly() -> None:
    tsc = _tool("tsc", "node-typescript")
    result = subprocess.run(
        [
            tsc,
            "--noEmit",
            "--strict",
            "--module",
            "nodenext",
            "--moduleResolution",
            "nodenext",
            "--target",
            "es2022",
            "--lib",
            "es2022,dom",
            "test/types.ts",
        ],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_package_versions_with_the_gateway_and_packs_offline(node: str, tmp_path: Path) -> None:
    package = json.loads((JS / "package.json").read_text())
    assert package["version"] == gateway.__version__
    assert package["type"] == "module" and "dependencies" not in package
    assert package["ddeProtocols"] == ["dde.v1"]
    npm = _tool("npm", "npm")
    env = {**os.environ, "npm_config_offline": "true", "npm_config_cache": str(tmp_path / "c")}
    result = subprocess.run(
        [npm, "pack", "--json", "--pack-destination", str(tmp_path)],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    (packed,) = json.loads(result.stdout)
    with tarfile.open(tmp_path / packed["filename"]) as tar:
        names = {n.removeprefix("package/") for n in tar.getnames()}
    assert names == {
        "package.json",
        "index.js",
        "index.d.ts",
        "node.js",
        "node.d.ts",
        "src/core.js",
        "src/client.js",
        "src/node.js",
        "examples/watch.mjs",
        "README.md",
    }


def test_the_dashboard_ships_the_client_byte_for_byte() -> None:
    for name in SHIPPED:
        assert (DASHBOARD / name).read_bytes() == (JS / "src" / name).read_bytes(), (
            f"gateway/controlplane/dashboard/{name} differs from clients/js/src/{name}: "
            f"cp clients/js/src/{name} gateway/controlplane/dashboard/"
        )
    # The browser half never imports Node's (node:http) WebSocket.
    for name in SHIPPED:
        assert "node:" not in (JS / "src" / name).read_text()


# -- watch.mjs against a real gateway (the shared scenarios: tests/test_client_conformance.py) -


def _closed_port() -> int:
    """A port nothing listens on (bound, then released): an instance that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_restarts_with_a_recorder_and_a_dead_url_first(node: str, tmp_path: Path) -> None:
    """Two URLs, the first one dead: every attempt goes on to the next URL in turn, and the
    gateway restarting twice (same address, same recording) is resumed ``recovered``."""
    down = f"ws://127.0.0.1:{_closed_port()}/v1/stream"
    with trio.fail_after(90):
        async with site(tmp_path, recorder={"dir": str(tmp_path / "rec")}) as s:
            async with s.gateway():
                url = s.url
            async with watch(
                "node", ["--events", "--url", down, "--url", url, f"tracking/{FX}"]
            ) as w:
                for _ in range(2):
                    async with s.gateway():
                        await w.frames_after(30)
                assert await w.stop() == 0
    assert w.events("loss") == []
    assert frame_problems(w.lines, FX) == []
    assert contiguous(seqs(w.lines, FX)) == []
    subscribed = [(e["resumed"], e["recovered"]) for e in w.events("subscribed")]
    assert subscribed == [(False, False), (True, True)]
    tried = [e["url"] for e in w.events("state") if e["state"] == "connecting"]
    assert tried[:2] == [down, url] and tried.count(url) >= 2
    assert all(a != b for a, b in itertools.pairwise(tried))  # the next URL each time
    assert {e["url"] for e in w.events("state") if e["state"] == "connected"} == {url}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "at least one FEED/FIXTURE"),
        (["tracking"], "expected FEED/FIXTURE"),
        (["--url", "http://x/v1/stream", "t/F"], "--url must be ws:// or wss://"),
        (["--backfill", "-2", "t/F"], "--backfill must be -1 to"),
        (["--max-queue", "x", "t/F"], "--max-queue must be an integer"),
        (["--token-file", "/nonexistent/t", "t/F"], "--token-file /nonexistent/t: ENOENT"),
        (["--events", "--raw", "t/F"], "either --events or --raw"),
        (["--bogus", "t/F"], "Unknown option '--bogus'"),
    ],
)
def test_bad_arguments_exit_2(node: str, args: list[str], says: str) -> None:
    result = subprocess.run(
        [node, str(WATCH), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert says in result.stderr and "usage: watch.mjs" in result.stderr


#: Node's own WebSocket (undici; behind a flag on Node 20), the browser's way: the token as a
#: subprotocol, no injected constructor.
GLOBAL_WEBSOCKET = """
import { Client } from "./index.js";
const [url, fixture, token] = process.argv.slice(1);
const client = new Client(url, { token });
client.subscribe("tracking", fixture, { backfill: 3 });
const seen = [];
for await (const event of client) {
  seen.push(event);
  if (seen.filter((e) => e.event === "frame").length === 5) client.close();
}
console.log(JSON.stringify(seen));
"""


async def test_nodes_own_websocket_with_the_token_as_a_subprotocol(
    node: str, tmp_path: Path
) -> None:
    probe = "process.exit(typeof WebSocket === 'function' ? 0 : 1)"
    has = await trio.run_process(
        [node, "--experimental-websocket", "-e", probe], capture_stderr=True, check=False
    )
    if has.returncode != 0:
        # Debian 12's nodejs is 18: no WebSocket of its own (the client then needs NodeWebSocket).
        version = await trio.run_process([node, "--version"], capture_stdout=True)
        pytest.skip(f"Node {version.stdout.decode().strip()} has no WebSocket of its own")
    (tmp_path / "subscribers").write_text("sub-token-5e1f tracking\n")
    subscribers = {"tokens_file": str(tmp_path / "subscribers")}
    with trio.fail_after(60):
        async with site(tmp_path, subscribers=subscribers) as s, s.gateway() as gw:
            argv = [node, "--experimental-websocket", "--no-warnings", "--input-type=module"]
            result = await trio.run_process(
                [*argv, "-e", GLOBAL_WEBSOCKET, s.url, FX, "sub-token-5e1f"],
                cwd=JS,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert gw.auth.failures["stream"] == 0
    assert result.returncode == 0, result.stderr.decode()
    events = json.loads(result.stdout)
    assert [e["event"] for e in events[:3]] == ["state", "state", "subscribed"]
    frames = [e["seq"] for e in events if e["event"] == "frame"]
    assert len(frames) == 5 and contiguous(frames) == []
    assert frames[0] == events[2]["seq"] - 2  # the backfill of 3


async def test_watch_over_tls_with_a_private_ca_and_a_header_token(
    node: str, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    (tmp_path / "subscribers").write_text("tls-token-77aa\n")
    (tmp_path / "token-file").write_text("tls-token-77aa\n")
    sections: dict[str, Any] = {
        "gateway": {"tls_cert_file": str(cert_file), "tls_key_file": str(key_file)},
        "subscribers": {"tokens_file": str(tmp_path / "subscribers")},
    }
    with trio.fail_after(60):
        async with site(tmp_path, **sections) as s, s.gateway() as gw:
            url = s.url.replace("ws://", "wss://", 1)
            args = [
                "--events",
                "--ca-file",
                str(ca_file),
                "--token-file",
                str(tmp_path / "token-file"),
            ]
            async with watch("node", [*args, "--url", url, f"tracking/{FX}"]) as w:
                await w.frames_after(5)
                assert await w.stop() == 0
            assert gw.auth.failures["stream"] == 0
    assert frame_problems(w.lines, FX) == []
    assert {e["url"] for e in w.events("state")} == {url}
    assert not any("tls-token-77aa" in line for line in w.err)


async def test_watch_prints_one_line_per_frame_by_default(node: str, tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with site(tmp_path) as s, s.gateway():
            url = s.url
            argv = [node, str(WATCH), "--url", url, "--backfill", "-1", "--count", "5"]
            result = await trio.run_process(
                [*argv, f"tracking/{FX}"], capture_stdout=True, capture_stderr=True, check=False
            )
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    frames = [ln for ln in lines if ln.startswith("frame ")]
    assert len(frames) == 5
    for line in frames:
        assert re.fullmatch(rf"frame tracking/{FX} seq=\d+ ix=\d+ \(\d+ bytes\)", line), line
    others = [json.loads(ln) for ln in lines if not ln.startswith("frame ")]
    assert [e["event"] for e in others] == ["subscribed", "status"]
    err = result.stderr.decode().splitlines()
    assert err[:2] == [f"# connecting {url}", f"# connected {url}"]
    assert err[-1].startswith("watch.mjs: stats {")
