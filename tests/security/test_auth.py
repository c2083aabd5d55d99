"""X2 and X3: with a token configured, every route of the router, every JSON-RPC method, the
dashboard, both event streams and /metrics need it in the Authorization header; cookies never
authenticate; /metrics never shows job arguments.

Routes are enumerated from the app's router, not from a list kept here, so a route added later is
checked without anyone remembering to: a route with a path parameter this file does not know
fails the test until a value is added to ``PATH_VALUES``.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.routing import Mount
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from conveyor.service import security
from conveyor.service.operations import OPERATIONS
from conveyor.service.security import PUBLIC_PATHS

from .conftest import ARG_SECRET, KWARG_SECRET, TOKEN, Live

#: Reviewed: the only paths served without a token (the probe, and the page's static code).
EXPECTED_PUBLIC = {"/health", "/static/app.js", "/static/style.css"}
QUEUE = "authq"  # the route test's own queue: its DELETE purges only this one
SERVICE_DIR = Path(security.__file__).parent


def walk_routes(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(kind, path, method) of every route, included routers flattened; kind: http or websocket."""
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI >= 0.120 keeps included routers as-is
            inner = prefix + (route.include_context.prefix or "")
            yield from walk_routes(route.original_router.routes, inner)
        elif isinstance(route, Mount) and not route.routes:  # a mounted app (static files...)
            yield "http", f"{prefix}{route.path}/", "GET"
        elif hasattr(route, "routes"):  # a Mount of a router, or a router
            yield from walk_routes(route.routes, prefix + getattr(route, "path", ""))
        elif getattr(route, "methods", None):
            for method in sorted(route.methods - {"HEAD"}):
                yield "http", prefix + route.path, method
        else:
            yield "websocket", prefix + route.path, ""


def concrete(path: str, values: dict[str, str]) -> str:
    """``path`` with each ``{param}`` replaced; fails naming a parameter with no value."""
    for name in re.findall(r"{(\w+)(?::\w+)?}", path):
        assert name in values, f"new path parameter {{{name}}} in {path}: add it to PATH_VALUES"
    return re.sub(r"{(\w+)(?::\w+)?}", lambda m: values[m.group(1)], path)


@pytest.fixture(scope="module")
def routes(live: Live) -> list[tuple[str, str, str]]:
    """Every route, with a real job's id and this file's queue in its path."""
    job = live.client.post("/jobs", json={"task": "t.echo", "args": [1], "queue": QUEUE})
    assert job.status_code == 201, job.text
    values = {"job_id": job.json()["job_id"], "queue": QUEUE, "name": "app.js"}
    found = [(kind, concrete(path, values), method) for kind, path, method in _all(live.api)]
    paths = {path for _, path, _ in found}
    # The router really is what was walked: the surfaces X2 names are all among them.
    assert {"/", "/metrics", "/rpc", "/events", "/events/ws", "/jobs", "/health"} <= paths
    return found


def _all(api: FastAPI) -> list[tuple[str, str, str]]:
    return list(walk_routes(api.routes))


def _request(client: httpx.Client, method: str, path: str, **options: Any) -> httpx.Response:
    if path == "/events":  # a stream: only its status and headers are wanted
        with client.stream(method, path, **options) as response:
            return response
    body = {} if method in ("POST", "PUT", "PATCH") else None
    return client.request(method, path, json=body, **options)


def test_only_reviewed_paths_are_public() -> None:
    assert set(PUBLIC_PATHS) == EXPECTED_PUBLIC


def test_every_route_refuses_a_missing_or_wrong_token(
    live: Live, routes: list[tuple[str, str, str]]
) -> None:
    presented: list[dict[str, str]] = [
        {},
        {"authorization": "Bearer wrong-token"},
        {"authorization": f"Basic {TOKEN}"},  # the right secret in the wrong scheme
        {"authorization": TOKEN},
        {"x-api-key": TOKEN},
    ]
    checked = 0
    with httpx.Client(base_url=live.url, timeout=5) as anonymous:
        for kind, path, method in routes:
            if path in EXPECTED_PUBLIC:
                continue
            for headers in presented:
                if kind == "websocket":
                    assert _ws_status(live, path, headers) == 401, (path, headers)
                    continue
                response = _request(anonymous, method, path, headers=headers)
                assert response.status_code == 401, (method, path, headers, response.status_code)
                assert response.headers["www-authenticate"] == "Bearer"
                assert response.headers["content-type"].startswith("application/json")
                checked += 1
    assert checked >= 5 * 15  # every REST route, /rpc, /events, the dashboard, /docs, /metrics


def test_every_route_opens_with_the_token_and_sets_no_cookie(
    live: Live, routes: list[tuple[str, str, str]]
) -> None:
    for kind, path, method in routes:
        if kind == "websocket":
            with ws_connect(f"ws://127.0.0.1:{live.port}{path}", additional_headers=_bearer()):
                pass  # accepted
            continue
        response = _request(live.client, method, path)
        assert response.status_code not in (401, 403), (method, path)
        assert response.status_code < 500, (method, path)
        assert "set-cookie" not in response.headers, (method, path)
        if path == "/events":
            assert response.headers["content-type"].startswith("text/event-stream")
        else:
            assert "no route" not in response.text, (method, path)  # the path reached its route


def test_every_json_rpc_method_needs_the_token(live: Live) -> None:
    assert len(OPERATIONS) >= 14
    with httpx.Client(base_url=live.url, timeout=5) as anonymous:
        for method in OPERATIONS:
            call = {"jsonrpc": "2.0", "method": method, "params": {}, "id": 1}
            refused = anonymous.post("/rpc", json=call)
            assert refused.status_code == 401, method
            assert refused.json()["error"]["data"]["http_status"] == 401
            batch = anonymous.post("/rpc", json=[call, call])
            assert batch.status_code == 401, method
            answered = live.client.post("/rpc", json=call)
            assert answered.status_code != 401, method
            error = answered.json().get("error") or {}
            assert error.get("code") != -32601, (method, error)  # the method exists


@pytest.mark.parametrize(
    "cookie_name", ["token", "conveyor_token", "CONVEYOR_TOKEN", "session", "authorization"]
)
def test_a_cookie_never_authenticates(
    live: Live, routes: list[tuple[str, str, str]], cookie_name: str
) -> None:
    value = f"Bearer {TOKEN}" if cookie_name == "authorization" else TOKEN
    mutating = [(p, m) for k, p, m in routes if m in ("POST", "PUT", "PATCH", "DELETE")]
    assert {("/jobs", "POST"), ("/rpc", "POST"), (f"/queues/{QUEUE}", "DELETE")} <= set(mutating)
    with httpx.Client(base_url=live.url, timeout=5) as browser:
        for path, method in [*mutating, ("/", "GET"), ("/jobs", "GET")]:
            headers = {"cookie": f"{cookie_name}={value}"}
            response = _request(browser, method, path, headers=headers)
            assert response.status_code == 401, (cookie_name, method, path)
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(
                f"ws://127.0.0.1:{live.port}/events/ws",
                additional_headers={"cookie": f"{cookie_name}={value}"},
            )
        assert refused.value.response.status_code == 401


def test_the_token_is_compared_in_constant_time_and_cookies_are_never_read() -> None:
    source = inspect.getsource(security)
    tree = ast.parse(source)
    matches = next(
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "token_matches"
    )
    calls = {ast.unparse(n.func) for n in ast.walk(matches) if isinstance(n, ast.Call)}
    assert "hmac.compare_digest" in calls
    # The middleware decides through token_matches, and nothing compares a token with == / !=.
    middleware = next(
        n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "SecurityMiddleware"
    )
    assert "token_matches" in {
        ast.unparse(n.func) for n in ast.walk(middleware) if isinstance(n, ast.Call)
    }
    for module in SERVICE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Compare) and any(
                isinstance(op, ast.Eq | ast.NotEq) for op in node.ops
            ):
                operands = [node.left, *node.comparators]
                if any(isinstance(side, ast.Constant) for side in operands):
                    continue  # a name checked against a literal (the query key 'token', say)
                sides = [ast.unparse(side) for side in operands]
                assert not any("token" in side.lower() for side in sides), (module.name, sides)
            if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
                text = node.value if isinstance(node.value, str) else node.value.decode()
                # Header names and request.cookies: only docstrings may mention cookies.
                assert text.strip().lower() not in ("cookie", "cookies"), module.name
            if isinstance(node, ast.Attribute):
                assert node.attr != "cookies", module.name


def test_metrics_never_show_job_arguments_errors_or_request_paths(live: Live) -> None:
    echo = live.client.post(
        "/jobs", json={"task": "t.echo", "args": [ARG_SECRET], "kwargs": {"secret": KWARG_SECRET}}
    ).json()["job_id"]
    shout = live.client.post("/jobs", json={"task": "t.shout", "args": [ARG_SECRET]}).json()[
        "job_id"
    ]
    live.wait_state(echo, "completed")
    live.wait_state(shout, "dead", "failed")
    # Unknown paths carrying the secret: a per-path label would record it.
    assert live.client.get(f"/jobs/{ARG_SECRET}").status_code == 404
    assert live.client.get(f"/{ARG_SECRET}").status_code == 404
    with httpx.Client(base_url=live.url, timeout=5) as anonymous:
        assert anonymous.get("/metrics").status_code == 401
        health = anonymous.get("/health", params={"counts": "true"}).text  # public
    metrics = live.client.get("/metrics").text
    assert 'task="t.echo"' in metrics  # per-task series exist: this is the scrape that matters
    for text in (metrics, health):
        for secret in (ARG_SECRET, KWARG_SECRET, echo, shout, TOKEN):
            assert secret not in text


def _bearer() -> dict[str, str]:
    return {"authorization": f"Bearer {TOKEN}"}


def _ws_status(live: Live, path: str, headers: dict[str, str]) -> int:
    """The handshake's HTTP status (101 if accepted)."""
    try:
        with ws_connect(f"ws://127.0.0.1:{live.port}{path}", additional_headers=headers):
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code
