"""docs/openapi.yaml matches the control plane, checked against the real server.

- Every route and method of the app is documented, and nothing else is.
- Every documented (path, method, status) is produced by a real request, and schemathesis
  validates each response (status, content type, headers, body schema) against the document.
- schemathesis generates requests for every operation (hypothesis, derandomized, few examples,
  no example database) and validates the answers, with both token lists configured so its
  ``ignored_auth`` check sees auth enforced: every operation on a single node, then the ones
  whose answers change in a cluster (``/v1/cluster``, status, readiness, fixtures, metrics)
  with a cluster view, degraded, and fixtures with an owner and a role.

schemathesis sends with ``requests`` (blocking), so it runs in a worker thread while the server
runs on the test's trio loop, on 127.0.0.1 port 0. Rules of tests/conftest.py apply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import hypothesis
import requests
import schemathesis
import trio
import yaml
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from starlette.routing import Route

from gateway.config import ListenAddress
from gateway.controlplane import MAX_BODY_BYTES, build_app, run
from gateway.dataplane import SubscriberView
from tests.conftest import TEST_TOKEN
from tests.memory_target import MemoryTarget
from tests.test_controlplane import (
    ADMIN_TOKENS,
    READ_TOKEN,
    REDIS_PASSWORD,
    REDIS_URL,
    make_config,
    sample_cluster,
)

SPEC = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
TIMEOUT = 90  # generation is CPU-bound and the CI machine is small and busy
EXAMPLES_PER_OPERATION = 12
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKENS[0]}"}


def spec() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(SPEC.read_text())
    return data


# Statuses only a client misbehaving at the socket level can cause (a body trickled for longer
# than the body timeout: tests/test_controlplane.py; downloads held open past the limits:
# tests/test_hostile_api.py) are driven over raw sockets instead.
SOCKET_LEVEL_STATUSES = {
    ("/v1/fixtures/{feed}/{fixture}", "PUT", 408),
    # The same body reader as PUT's (its 408 is tested there over a raw socket).
    ("/v1/subscribers/{id}", "DELETE", 408),
    ("/v1/fixtures/{feed}/{fixture}/recording", "GET", 429),
    ("/v1/fixtures/{feed}/{fixture}/recording", "GET", 503),
}


def documented_statuses() -> set[tuple[str, str, int]]:
    """Every (path, method, status) the document lists that a well-formed request can get."""
    out: set[tuple[str, str, int]] = set()
    for path, item in spec()["paths"].items():
        for method, op in item.items():
            if method in HTTP_METHODS:
                out.update((path, method.upper(), int(code)) for code in op["responses"])
    assert out >= SOCKET_LEVEL_STATUSES, "documented, and covered by a raw-socket test"
    return out - SOCKET_LEVEL_STATUSES


def test_every_route_is_documented(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    app = build_app(MemoryTarget(config))
    served = {
        (route.path, method)
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"  # Starlette adds HEAD to every GET route
    }
    documented = {(path, method) for path, method, _ in documented_statuses()}
    assert served == documented


def schema() -> Any:
    return schemathesis.openapi.from_path(SPEC, config=schemathesis.Config())


def _publish(target: MemoryTarget) -> None:
    target.publish("soccer", "123", '{"ix": 1, "mt": 1.10}')


def _record(target: MemoryTarget) -> None:
    target.record("soccer", "123", '{"ix": 1, "mt": 1.10}')


def _drain(target: MemoryTarget) -> None:
    target.draining = True


def _unsynced(target: MemoryTarget) -> None:
    target.synced = False


def _full(target: MemoryTarget) -> None:
    target.config = attrs.evolve(target.config, api=attrs.evolve(target.config.api, max_fixtures=0))


_DEGRADED = "cluster: redis unreachable: Connection refused"


def _cluster(target: MemoryTarget) -> None:
    """A cluster instance, degraded, that owns soccer/123 and relays soccer/9 (no owner).
    Either may have been unfollowed before (and the API's fixture limit set to 0): followed
    again first."""
    target.cluster = sample_cluster(_DEGRADED)
    target.degraded = _DEGRADED
    target.config = attrs.evolve(target.config, api=attrs.evolve(target.config.api, max_fixtures=9))
    target.follow("soccer", "123", 0)
    target.follow("soccer", "9", 0)
    target.set_role("soccer", "123", owner="gw-a", role="owner")
    target.set_role("soccer", "9", owner=None, role="relay")


def _subscriber(target: MemoryTarget) -> None:
    target.add_subscriber(
        SubscriberView("5", "10.0.0.5:4000", "/v1/stream", ("soccer/123",), 0, 1, 0, 4.0)
    )


def _single_node(target: MemoryTarget) -> None:
    target.cluster = None
    target.degraded = None


# One request per documented status: (path, method, path params, headers, body, status), and
# optionally a step run on the trio thread (like the data path would) before the request.
_PARAMS_123 = {"feed": "soccer", "fixture": "123"}
_PARAMS_9 = {"feed": "soccer", "fixture": "9"}
_PARAMS_10 = {"feed": "soccer", "fixture": "10"}
_ID_5 = {"id": "5"}
_Setup = Callable[[MemoryTarget], None] | None
_CASES: list[tuple[str, str, dict[str, str], dict[str, str], Any, int, _Setup]] = [
    # The dashboard is open even with read tokens configured (it holds no data).
    ("/", "GET", {}, {}, None, 200, None),
    ("/dashboard/{name}", "GET", {"name": "app.js"}, {}, None, 200, None),
    ("/dashboard/{name}", "GET", {"name": "style.css"}, {}, None, 200, None),
    ("/dashboard/{name}", "GET", {"name": "nope.js"}, {}, None, 404, None),
    ("/healthz", "GET", {}, {}, None, 200, None),
    ("/readyz", "GET", {}, {}, None, 200, None),
    ("/v1/status", "GET", {}, ADMIN, None, 200, None),
    ("/v1/status", "GET", {}, {}, None, 401, None),
    ("/v1/cluster", "GET", {}, ADMIN, None, 404, None),  # a single node
    ("/v1/cluster", "GET", {}, {}, None, 401, None),
    ("/v1/fixtures", "GET", {}, {"Authorization": f"Bearer {READ_TOKEN}"}, None, 200, None),
    ("/v1/fixtures", "GET", {}, {}, None, 401, None),
    ("/v1/fixtures/{feed}/{fixture}", "GET", _PARAMS_123, ADMIN, None, 200, None),
    ("/v1/fixtures/{feed}/{fixture}", "GET", _PARAMS_123, {}, None, 401, None),
    ("/v1/fixtures/{feed}/{fixture}", "GET", {"feed": "x", "fixture": "1"}, ADMIN, None, 404, None),
    ("/v1/fixtures/{feed}/{fixture}/latest", "GET", _PARAMS_123, ADMIN, None, 404, None),
    ("/v1/fixtures/{feed}/{fixture}/latest", "GET", _PARAMS_123, {}, None, 401, None),
    ("/v1/fixtures/{feed}/{fixture}", "PUT", _PARAMS_9, ADMIN, None, 201, None),
    ("/v1/fixtures/{feed}/{fixture}", "PUT", _PARAMS_123, ADMIN, {"backfill": 3}, 200, None),
    ("/v1/fixtures/{feed}/{fixture}", "PUT", _PARAMS_123, ADMIN, {"backfill": -5}, 400, None),
    ("/v1/fixtures/{feed}/{fixture}", "PUT", _PARAMS_123, {}, None, 401, None),
    (
        "/v1/fixtures/{feed}/{fixture}",
        "PUT",
        _PARAMS_123,
        {"Authorization": f"Bearer {READ_TOKEN}"},
        None,
        403,
        None,
    ),
    ("/v1/fixtures/{feed}/{fixture}", "PUT", {"feed": "x", "fixture": "1"}, ADMIN, None, 404, None),
    (
        "/v1/fixtures/{feed}/{fixture}",
        "PUT",
        _PARAMS_123,
        ADMIN,
        {"backfill": 1, "pad": "x" * MAX_BODY_BYTES},
        413,
        None,
    ),
    (
        "/v1/fixtures/{feed}/{fixture}",
        "PUT",
        {"feed": "soccer", "fixture": "10"},
        ADMIN,
        None,
        429,
        _full,
    ),
    (
        "/v1/fixtures/{feed}/{fixture}",
        "DELETE",
        _PARAMS_9,
        ADMIN,
        None,
        204,
        None,
    ),
    (
        "/v1/fixtures/{feed}/{fixture}",
        "DELETE",
        _PARAMS_9,
        ADMIN,
        None,
        404,
        None,
    ),
    ("/v1/fixtures/{feed}/{fixture}", "DELETE", _PARAMS_123, {}, None, 401, None),
    (
        "/v1/fixtures/{feed}/{fixture}",
        "DELETE",
        _PARAMS_123,
        {"Authorization": f"Bearer {READ_TOKEN}"},
        None,
        403,
        None,
    ),
    ("/v1/subscribers", "GET", {}, ADMIN, None, 200, None),
    ("/v1/subscribers", "GET", {}, {}, None, 401, None),
    ("/v1/subscribers/{id}", "DELETE", _ID_5, ADMIN, {"reason": "upgrade"}, 204, _subscriber),
    ("/v1/subscribers/{id}", "DELETE", _ID_5, ADMIN, None, 404, None),
    ("/v1/subscribers/{id}", "DELETE", _ID_5, ADMIN, {"reason": 5}, 400, _subscriber),
    ("/v1/subscribers/{id}", "DELETE", _ID_5, {}, None, 401, None),
    (
        "/v1/subscribers/{id}",
        "DELETE",
        _ID_5,
        {"Authorization": f"Bearer {READ_TOKEN}"},
        None,
        403,
        None,
    ),
    (
        "/v1/subscribers/{id}",
        "DELETE",
        _ID_5,
        ADMIN,
        {"reason": "x" * MAX_BODY_BYTES},
        413,
        None,
    ),
    ("/metrics", "GET", {}, ADMIN, None, 200, None),
    ("/metrics", "GET", {}, {}, None, 401, None),
    ("/v1/fixtures/{feed}/{fixture}/latest", "GET", _PARAMS_123, ADMIN, None, 200, _publish),
    ("/v1/recordings", "GET", {}, {}, None, 401, None),
    ("/v1/fixtures/{feed}/{fixture}/recording", "GET", _PARAMS_123, ADMIN, None, 404, None),
    ("/v1/fixtures/{feed}/{fixture}/recording", "GET", _PARAMS_123, {}, None, 401, None),
    ("/v1/fixtures/{feed}/{fixture}/recording", "GET", _PARAMS_123, ADMIN, None, 200, _record),
    ("/v1/recordings", "GET", {}, ADMIN, None, 200, None),
    # A cluster instance: the views that change, validated against the document.
    ("/v1/cluster", "GET", {}, {"Authorization": f"Bearer {READ_TOKEN}"}, None, 200, _cluster),
    ("/readyz", "GET", {}, {}, None, 200, None),  # degraded
    ("/v1/status", "GET", {}, ADMIN, None, 200, None),
    ("/v1/fixtures", "GET", {}, ADMIN, None, 200, None),
    ("/v1/fixtures/{feed}/{fixture}", "GET", _PARAMS_9, ADMIN, None, 200, None),
    ("/metrics", "GET", {}, ADMIN, None, 200, None),
    ("/v1/cluster", "GET", {}, ADMIN, None, 404, _single_node),
    ("/readyz", "GET", {}, {}, None, 503, _drain),
    # A cluster instance whose Redis does not answer cannot tell whether another instance's
    # API follows a fixture it does not know.
    ("/v1/fixtures/{feed}/{fixture}", "DELETE", _PARAMS_10, ADMIN, None, 503, _unsynced),
]
#: The operations whose answers differ in a cluster: fuzzed again with a cluster view.
CLUSTER_OPERATIONS = {"cluster", "status", "readyz", "listFixtures", "getFixture", "metrics"}
# Requests with a query string: (path, method, path params, query, headers, status).
_QUERY_CASES: list[tuple[str, str, dict[str, str], dict[str, Any], dict[str, str], int]] = [
    ("/v1/fixtures/{feed}/{fixture}/recording", "GET", _PARAMS_123, {"after": -1}, ADMIN, 400),
    ("/v1/fixtures", "GET", {}, {"limit": 0}, ADMIN, 400),
    ("/v1/recordings", "GET", {}, {"after": "no-slash"}, ADMIN, 400),
    ("/v1/subscribers", "GET", {}, {"limit": 1001}, ADMIN, 400),
    ("/v1/subscribers", "GET", {}, {"sort": "-queued_bytes", "after_value": "x"}, ADMIN, 400),
    ("/v1/subscribers", "GET", {}, {"sort": "-queued_bytes", "after": "gone"}, ADMIN, 404),
    ("/v1/subscribers", "GET", {}, {"feed": "soccer", "slow": "false"}, ADMIN, 200),
]


def _documented_cases(
    base_url: str, session: requests.Session, target: MemoryTarget
) -> set[tuple[str, str, int]]:
    loaded = schema()
    seen: set[tuple[str, str, int]] = set()
    for path, method, params, headers, body, status, setup in _CASES:
        if setup is not None:
            trio.from_thread.run_sync(setup, target)
        operation = loaded[path][method]
        kwargs: dict[str, Any] = {"path_parameters": params, "headers": dict(headers)}
        if body is not None:
            kwargs["body"] = body
            kwargs["media_type"] = "application/json"
        case = operation.Case(**kwargs)
        # Only the response checks here: these requests are deliberately rejected ones too.
        response = case.call(base_url=base_url, session=session)
        # A documented 503 (/readyz while draining) is an answer, not a server failure.
        excluded = [not_a_server_error] if status == 503 else []
        case.validate_response(response, headers=headers, excluded_checks=excluded)
        assert response.status_code == status, (path, method, response.text)
        for secret in (TEST_TOKEN, REDIS_PASSWORD, REDIS_URL):
            assert secret not in response.text
        seen.add((path, method, status))
    for path, method, params, query, headers, status in _QUERY_CASES:
        case = loaded[path][method].Case(path_parameters=params, query=query, headers=dict(headers))
        response = case.call(base_url=base_url, session=session)
        case.validate_response(response, headers=headers)
        assert response.status_code == status, (path, method, response.text)
        seen.add((path, method, status))
    return seen


def _fuzz(base_url: str, session: requests.Session, only: set[str] | None = None) -> int:
    """Generated requests for every operation (or those with an operationId in *only*);
    returns how many were sent."""
    sent = 0
    for result in schema().get_all_operations():
        operation = result.ok()
        if only is not None and operation.definition.raw.get("operationId") not in only:
            continue
        strategy = operation.as_strategy(headers=dict(ADMIN))

        @hypothesis.settings(
            max_examples=EXAMPLES_PER_OPERATION,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        @hypothesis.given(case=strategy, known=st.sampled_from(["none", "feed", "both"]))
        def check(case: Any, known: str) -> None:
            nonlocal sent
            # Random feed names are all unknown (404); steer some cases onto real resources.
            if case.path_parameters and known != "none":
                case.path_parameters["feed"] = "soccer"
                if known == "both":
                    case.path_parameters["fixture"] = "123"
            response = case.call_and_validate(base_url=base_url, session=session)
            for secret in (TEST_TOKEN, REDIS_PASSWORD, REDIS_URL):
                assert secret not in response.text
            sent += 1

        check()
    return sent


async def test_documented_statuses_and_schemathesis(tmp_path: Path) -> None:
    config = make_config(tmp_path, admin=True, read=True, cluster=True)
    target = MemoryTarget(config)

    def in_thread(base_url: str) -> tuple[set[tuple[str, str, int]], int]:
        with requests.Session() as session:
            seen = _documented_cases(base_url, session, target)
            trio.from_thread.run_sync(setattr, target, "draining", False)
            trio.from_thread.run_sync(setattr, target, "synced", True)
            trio.from_thread.run_sync(setattr, target, "config", config)
            sent = _fuzz(base_url, session)
            trio.from_thread.run_sync(_cluster, target)
            in_cluster = _fuzz(base_url, session, CLUSTER_OPERATIONS)
            assert in_cluster >= EXAMPLES_PER_OPERATION
            return seen, sent + in_cluster

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            address: ListenAddress = await nursery.start(run, config, target)
            seen, sent = await trio.to_thread.run_sync(
                in_thread, f"http://{address}", abandon_on_cancel=True
            )
            nursery.cancel_scope.cancel()
    assert seen == documented_statuses()
    assert sent >= EXAMPLES_PER_OPERATION  # generation did run


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_spec_is_closed() -> None:
    # Every object schema says additionalProperties: false (or is free-form on purpose), so
    # an undocumented field in a response fails the schema check above.
    for node in _walk(spec()["components"]["schemas"]):
        if isinstance(node, dict) and node.get("type") == "object":
            assert node.get("additionalProperties") is False, node


def _security(op: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = op.get("security", spec()["security"])
    return found


async def test_no_token_is_allowed_where_the_server_runs_without_token_files(
    tmp_path: Path,
) -> None:
    # Token files are optional ([api]): every operation of the document accepts no token ({})
    # beside the bearer token, and a gateway without token files answers each without one.
    operations = [
        (path, method.upper())
        for path, item in spec()["paths"].items()
        for method in item
        if method in HTTP_METHODS
    ]
    for path, method in operations:
        security = _security(spec()["paths"][path][method.lower()])
        assert security == [] or {} in security, (path, method, security)
    config = make_config(tmp_path)  # no admin or read tokens file
    target = MemoryTarget(config)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            address: ListenAddress = await nursery.start(run, config, target)

            def requests_without_a_token() -> list[tuple[str, str, int]]:
                out = []
                with requests.Session() as session:
                    for path, method in operations:
                        url = f"http://{address}" + path.replace("{feed}", "soccer").replace(
                            "{fixture}", "123"
                        ).replace("{name}", "app.js").replace("{id}", "1")
                        out.append(
                            (path, method, session.request(method, url, timeout=10).status_code)
                        )
                return out

            answers = await trio.to_thread.run_sync(requests_without_a_token)
            nursery.cancel_scope.cancel()
    assert [a for a in answers if a[2] in (401, 403)] == []
