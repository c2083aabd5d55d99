"""X7: the SQLite database is created 0600 whatever the umask, and no HTTP request can choose it."""

from __future__ import annotations

import ast
import json
import stat
import subprocess
import sys
from pathlib import Path

import httpx

from conveyor.service import security

from .conftest import TOKEN, Live

SERVICE_DIR = Path(security.__file__).parent

CREATE = """
import asyncio, json, os, stat, sys
os.umask(0)  # the most permissive: every file would be world-writable unless set explicitly
from conveyor import Conveyor

async def main(path):
    app = Conveyor(f"sqlite:///{path}")
    async with app:
        await app.enqueue("t.any", args=["private"])
        modes = {
            suffix: oct(stat.S_IMODE(os.stat(path + suffix).st_mode))
            for suffix in ("", "-wal", "-shm")
            if os.path.exists(path + suffix)
        }
    print(json.dumps(modes))

asyncio.run(main(sys.argv[1]))
"""


def test_the_database_and_its_wal_files_are_0600_even_with_umask_0(tmp_path: Path) -> None:
    path = tmp_path / "private.db"
    done = subprocess.run(
        [sys.executable, "-c", CREATE, str(path)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    modes = json.loads(done.stdout)
    assert set(modes) == {"", "-wal", "-shm"}  # WAL mode: the side files existed while open
    assert set(modes.values()) == {"0o600"}, modes
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_service_never_builds_a_broker_from_a_request() -> None:
    # The only broker the service has is the one create_app was given (or built from its own
    # url argument): nothing in the service opens a broker, or connects one to an address.
    found = []
    for module in SERVICE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func).split(".")[-1]
            opens = name in ("open_broker", "Conveyor") or name.endswith("Broker")
            if opens or (name == "connect" and (node.args or node.keywords)):
                found.append(f"{module.name}: {ast.unparse(node)}")
    assert found == ["app.py: Conveyor(url)"]


def test_no_request_parameter_reaches_the_broker_url(live: Live, tmp_path: Path) -> None:
    evil = tmp_path / "evil.db"
    evil_url = f"sqlite:///{evil}"
    url_before = live.api.state.service.app.url
    smuggled = {"broker": evil_url, "url": evil_url, "db": str(evil), "path": str(evil)}
    headers = {"x-conveyor-url": evil_url, "x-broker": evil_url}
    with httpx.Client(
        base_url=live.url, timeout=5, headers={"authorization": f"Bearer {TOKEN}", **headers}
    ) as client:
        for path in ("/jobs", "/queues", "/dead-letters", "/health", "/metrics"):
            assert client.get(path, params=smuggled).status_code < 500
        body = {"task": "t.echo", "args": [1], **smuggled}
        refused = client.post("/jobs", params=smuggled, json=body)
        assert refused.status_code == 422  # unknown fields are refused, not ignored
        assert {e["loc"][-1] for e in refused.json()["error"]["fields"]} == set(smuggled)
        call = {"jsonrpc": "2.0", "method": "queue_add_job", "params": body, "id": 1}
        assert client.post("/rpc", json=call).json()["error"]["code"] == -32602
    assert not evil.exists()
    assert live.api.state.service.app.url == url_before
