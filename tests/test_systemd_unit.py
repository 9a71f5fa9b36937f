"""The systemd units and their example config: required directives, ``systemd-analyze verify``.

Two units: ``dde-gateway.service`` (one gateway) and the template ``dde-gateway@.service`` (N
instances of one cluster on one host). Every check of the single unit runs on the template too,
and the template must repeat the single unit's directives exactly, except the few that make an
instance (its identity, its state directory, one shared user for SO_REUSEPORT).

Rules: no network and no running systemd needed. The unit is parsed by a small parser that
keeps repeated keys (systemd allows them; configparser would merge them). ``systemd-analyze
verify`` runs on a copy whose ExecStart binary exists (the real one is only present once
installed); it exits 0 even for unknown keys or unparsable values, reporting them as warnings,
so the test also requires that it prints nothing about the unit, and a deliberately broken copy
shows that check can fail. Skipped, with the reason, where systemd-analyze is absent.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import DEFAULT_DRAIN_TIMEOUT, expand_path, load_config
from tests.conftest import TEST_TOKEN

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "dde-gateway.service"
TEMPLATE = SYSTEMD_DIR / "dde-gateway@.service"
#: [Service] directives of the template that differ from the single unit's, and their values.
INSTANCE_DIRECTIVES = {
    "StateDirectory": ["dde-gateway/%i"],
    "SyslogIdentifier": ["dde-gateway@%i"],
    "User": ["dde-gateway"],
    "Environment": ["PYTHONFAULTHANDLER=1", "DDE_GATEWAY_INSTANCE=%i"],
}
EXAMPLE_CONFIG = SYSTEMD_DIR / "gateway.toml"
INSTALLED_BINARY = "/opt/dde-gateway/.venv/bin/dde-gateway"
ANALYZE = shutil.which("systemd-analyze") or (
    "/usr/bin/systemd-analyze" if Path("/usr/bin/systemd-analyze").exists() else None
)
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed on this machine"
)

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Sections to (key, value) lists in file order; comments and blank lines skipped."""
    unit: Unit = {}
    section: list[tuple[str, str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if m := re.fullmatch(r"\[(\w+)\]", line):
            section = unit.setdefault(m[1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and section is not None, f"line {number} is not KEY=VALUE in a section"
        section.append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def the_value(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= set {len(found)} times, expected once"
    return found[0]


def read_unit(path: Path) -> Unit:
    return parse_unit(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=[UNIT, TEMPLATE], ids=lambda p: p.name)
def unit(request: pytest.FixtureRequest) -> Unit:
    path: Path = request.param
    return read_unit(path)


REQUIRED = [
    ("Type", "notify"),
    ("NotifyAccess", "main"),
    ("WatchdogSec", "30"),
    ("Restart", "on-failure"),
    ("RestartSec", "5"),
    ("TimeoutStopSec", "30"),
    (
        "ExecStart",
        f"{INSTALLED_BINARY} run --config /etc/dde-gateway/gateway.toml --log-format json",
    ),
    ("ExecReload", "/bin/kill -HUP $MAINPID"),
    ("LoadCredential", "dde-token:/etc/dde-gateway/token"),
    ("DynamicUser", "yes"),
    ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectControlGroups", "yes"),
    ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ("CapabilityBoundingSet", ""),
    ("AmbientCapabilities", ""),
    ("SystemCallArchitectures", "native"),
    ("LockPersonality", "yes"),
    ("MemoryDenyWriteExecute", "yes"),
    ("RestrictRealtime", "yes"),
    ("RestrictNamespaces", "yes"),
    ("RestrictSUIDSGID", "yes"),
    ("ProtectClock", "yes"),
    ("ProtectHostname", "yes"),
    ("UMask", "0077"),
    ("LimitNOFILE", "65536"),
    ("StateDirectoryMode", "0750"),
]


@pytest.mark.parametrize(("key", "expected"), REQUIRED, ids=[k for k, _ in REQUIRED])
def test_required_service_directive(unit: Unit, key: str, expected: str) -> None:
    assert the_value(unit, "Service", key) == expected


def test_faulthandler_is_on(unit: Unit) -> None:
    assert "PYTHONFAULTHANDLER=1" in values(unit, "Service", "Environment")


def test_system_call_filter_allows_system_service_only(unit: Unit) -> None:
    filters = values(unit, "Service", "SystemCallFilter")
    assert filters[0] == "@system-service"
    # Any further line may only take system calls away (a leading "~").
    assert all(f.startswith("~") for f in filters[1:])


def test_unit_is_installable(unit: Unit) -> None:
    assert the_value(unit, "Install", "WantedBy") == "multi-user.target"
    assert "network-online.target" in the_value(unit, "Unit", "After")


def test_stop_timeout_leaves_room_for_the_drain(unit: Unit) -> None:
    stop = float(the_value(unit, "Service", "TimeoutStopSec"))
    assert stop > DEFAULT_DRAIN_TIMEOUT
    assert stop > load_config(EXAMPLE_CONFIG).gateway.drain_timeout


def test_example_config_reads_the_token_from_the_credential(
    unit: Unit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credential = the_value(unit, "Service", "LoadCredential").partition(":")[0]
    (tmp_path / credential).write_text(TEST_TOKEN + "\n", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    config = load_config(EXAMPLE_CONFIG)
    assert str(config.upstream.token_file) == f"${{CREDENTIALS_DIRECTORY}}/{credential}"
    assert config.upstream.read_token().reveal() == TEST_TOKEN


def test_template_repeats_the_single_unit_but_for_the_instance() -> None:
    single, template = read_unit(UNIT), read_unit(TEMPLATE)
    for section in ("Unit", "Install"):
        assert [kv for kv in template[section] if kv[0] != "Description"] == [
            kv for kv in single[section] if kv[0] != "Description"
        ]
    keys = {k for k, _ in single["Service"]} | {k for k, _ in template["Service"]}
    for key in sorted(keys):
        expected = INSTANCE_DIRECTIVES.get(key, values(single, "Service", key))
        assert values(template, "Service", key) == expected, key


def test_template_instances_share_one_user_and_have_their_own_identity() -> None:
    template = read_unit(TEMPLATE)
    # SO_REUSEPORT: Linux shares a port only among sockets of one user. Without User= each
    # instance's dynamic user would be named after its unit ("dde-gateway@1" is no valid user
    # name, so a hash of it): one UID per instance, and the second could not bind.
    assert the_value(template, "Service", "DynamicUser") == "yes"
    assert the_value(template, "Service", "User") == "dde-gateway"
    assert "DDE_GATEWAY_INSTANCE=%i" in values(template, "Service", "Environment")
    assert the_value(template, "Service", "StateDirectory") == "dde-gateway/%i"
    assert "%i" in the_value(template, "Unit", "Description")


@pytest.mark.parametrize(
    ("path", "instance", "directory"),
    [
        (UNIT, "", "/var/lib/dde-gateway"),
        (TEMPLATE, "1", "/var/lib/dde-gateway/1"),
        (TEMPLATE, "2", "/var/lib/dde-gateway/2"),
    ],
    ids=["single", "instance-1", "instance-2"],
)
def test_example_config_records_in_the_units_own_state_directory(
    path: Path, instance: str, directory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # systemd sets $STATE_DIRECTORY to /var/lib/ + StateDirectory= (with %i expanded).
    state = "/var/lib/" + the_value(read_unit(path), "Service", "StateDirectory")
    assert state.replace("%i", instance) == directory
    monkeypatch.setenv("STATE_DIRECTORY", directory)
    config = load_config(EXAMPLE_CONFIG)
    assert config.recorder.dir is not None
    assert expand_path(config.recorder.dir) == Path(directory) / "recordings"


def test_example_config_leaves_reuse_port_off_for_the_single_unit() -> None:
    assert load_config(EXAMPLE_CONFIG).gateway.reuse_port is False
    assert "reuse_port = false" in EXAMPLE_CONFIG.read_text(encoding="utf-8")


def verify(unit_text: str, directory: Path, name: str = UNIT.name) -> tuple[int, list[str]]:
    """Run systemd-analyze verify on a copy (named *name*) whose ExecStart binary exists.

    A template is verified as its instance ``1`` (what ``systemctl start NAME@1`` loads).
    Returns the exit code and the output lines that mention the unit file.
    """
    assert ANALYZE is not None
    assert INSTALLED_BINARY in unit_text
    path = directory / name
    path.write_text(unit_text.replace(INSTALLED_BINARY, sys.executable), encoding="utf-8")
    target = directory / name.replace("@.", "@1.")
    proc = subprocess.run(
        [ANALYZE, "verify", str(target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = (proc.stdout + proc.stderr).splitlines()
    return proc.returncode, [line for line in output if path.name in line]


@needs_analyze
@pytest.mark.parametrize("path", [UNIT, TEMPLATE], ids=lambda p: p.name)
def test_systemd_analyze_verify_is_clean(tmp_path: Path, path: Path) -> None:
    code, complaints = verify(path.read_text(encoding="utf-8"), tmp_path, path.name)
    assert complaints == []
    assert code == 0


@needs_analyze
@pytest.mark.parametrize("path", [UNIT, TEMPLATE], ids=lambda p: p.name)
def test_verify_check_catches_a_broken_unit(tmp_path: Path, path: Path) -> None:
    broken = path.read_text(encoding="utf-8").replace(
        "ProtectSystem=strict", "ProtectSystem=stricter\nProtectEverything=yes"
    )
    # systemd 252 exits 0 here (it only warns): that is why the output is checked too.
    _, complaints = verify(broken, tmp_path, path.name)
    assert any("ProtectEverything" in line for line in complaints)
    assert any("stricter" in line for line in complaints)


INSTALL_DOCS = [SYSTEMD_DIR.parent / "README.md", SYSTEMD_DIR.parent / "docs" / "operations.md"]


def _install_block(path: Path) -> str:
    """The first ``sh`` block after the install heading of *path*."""
    text = path.read_text()
    heading = re.search(r"^## Install.*$", text, re.M)
    assert heading is not None, path
    block = re.search(r"^```sh\n(.*?)^```", text[heading.end() :], re.M | re.S)
    assert block is not None, path
    return block.group(1)


@pytest.mark.parametrize("doc", INSTALL_DOCS, ids=lambda p: p.name)
def test_install_steps_put_the_command_on_path_and_the_docs_where_the_unit_says(
    unit: Unit, doc: Path
) -> None:
    steps = _install_block(doc)
    binary = the_value(unit, "Service", "ExecStart").split()[0]
    # The unit's binary is what the install steps create, and it is linked onto PATH.
    assert (
        binary.startswith("/opt/dde-gateway/.venv/bin/")
        and "python3 -m venv /opt/dde-gateway/.venv" in steps
    )
    assert f"ln -sf {binary} /usr/local/bin/dde-gateway" in steps
    # Documentation= names a page the steps copy, and the page exists in the repository.
    doc_url = the_value(unit, "Unit", "Documentation")
    assert doc_url.startswith("file:///opt/dde-gateway/docs/"), doc_url
    page = doc_url.removeprefix("file:///opt/dde-gateway/docs/")
    assert (SYSTEMD_DIR.parent / "docs" / page).is_file()
    assert "cp -rT /path/to/this/checkout/docs /opt/dde-gateway/docs" in steps
    assert "<<<" not in steps  # not POSIX sh
