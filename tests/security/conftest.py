"""Security-check fixtures: a live service on a real port, test certificates, a TLS Redis.

The live server is uvicorn in a thread of this process on a free loopback port (as in
tests/service), serving ``create_app`` on the memory broker with one in-process worker, a token,
and no rate limit. Certificates are made with the ``openssl`` command (the ``cryptography``
package is not a dependency), once per session.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from conveyor.client import Conveyor
from conveyor.context import JobContext
from conveyor.service import ServiceSettings, create_app
from conveyor.testing.redis_server import TlsFiles, free_port

TOKEN = "tok-9f3b2c7e1d"
#: Secret-looking values a job carries; they must never show outside the job's own record.
ARG_SECRET = "sk_live_ARG_4f1d9a7c"
KWARG_SECRET = "pw_KWARG_8e2b6d0f"


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """create_app and `conveyor serve` read $CONVEYOR_TOKEN: each test decides about auth."""
    monkeypatch.delenv("CONVEYOR_TOKEN", raising=False)


# -- a live service ------------------------------------------------------------------------------


async def echo(ctx: JobContext, value: Any, secret: str | None = None) -> Any:
    """Returns its argument (the secret keyword is only carried)."""
    return value


async def shout(ctx: JobContext, text: str) -> None:
    """Logs ``text``, reports it as progress, then fails with it."""
    ctx.log(text)
    ctx.progress(50, text)
    raise ValueError(text)


@dataclass
class Live:
    """A running service: its base URL, an authenticated client, and the app."""

    url: str
    port: int
    api: FastAPI
    client: httpx.Client

    def wait_state(self, job_id: str, *states: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """Poll GET /jobs/{id} until the job is in one of ``states``."""
        deadline = time.monotonic() + timeout_s
        while True:
            job: dict[str, Any] = self.client.get(f"/jobs/{job_id}").json()
            if job["state"] in states:
                return job
            assert time.monotonic() < deadline, f"job stayed {job['state']}, wanted {states}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    """The service with a token and one worker (tasks ``t.echo``, ``t.shout``) on uvicorn."""
    import uvicorn

    app = Conveyor("memory://")
    app.task(name="t.echo")(echo)
    app.task(name="t.shout", max_attempts=1)(shout)
    api = create_app(
        app,
        workers=1,
        settings=ServiceSettings(token=TOKEN, rate_limit_per_s=None, worker_grace_s=5),
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),))
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped while starting"
        assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=5)
    try:
        yield Live(url, port, api, client)
    finally:
        client.close()
        api.state.service.hub.close_threadsafe()  # open streams would hold uvicorn's shutdown
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "uvicorn did not stop within 15 s"
        loop.close()


# -- certificates --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """A CA and two server certificates it signed: one for 127.0.0.1 and localhost, one for
    another name only; and an unrelated second CA."""

    server: TlsFiles
    wrong_name: TlsFiles
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN=conveyor {name}",
        cwd=directory,
    )  # fmt: skip
    return key, cert


def _make_server(directory: Path, name: str, ca: tuple[Path, Path], names: str) -> TlsFiles:
    key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    extensions = directory / f"{name}.ext"
    extensions.write_text(
        f"subjectAltName={names}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(extensions),
        cwd=directory,
    )  # fmt: skip
    return TlsFiles(cert=cert, key=key, ca=ca[1])


def make_certificates(directory: Path) -> Certificates:
    """Make the files with the ``openssl`` command (EC keys: fast)."""
    ca = _make_ca(directory, "test-ca")
    _, other_ca = _make_ca(directory, "other-ca")
    return Certificates(
        server=_make_server(directory, "server", ca, "IP:127.0.0.1,DNS:localhost"),
        wrong_name=_make_server(directory, "elsewhere", ca, "DNS:redis.elsewhere.example"),
        other_ca=other_ca,
    )


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """Test certificates, made once per session."""
    if shutil.which("openssl") is None:
        pytest.fail(
            "the openssl command is needed to make test certificates (apt-get install openssl)"
        )
    return make_certificates(tmp_path_factory.mktemp("certs"))


def conveyor_env(**extra: str) -> dict[str, str]:
    """This environment without a token or broker URL, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("CONVEYOR_TOKEN", "CONVEYOR_URL")}
    return {**env, **extra}
