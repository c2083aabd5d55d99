"""X6: the Redis broker over ``rediss://`` with certificate verification, as an ACL user.

A private redis-server serves TLS only (no plain port) with a certificate signed by a CA made for
the test, and requires an ACL user with a password (the ``default`` user is off). A job runs end
to end through it. A wrong CA, no CA, a plain ``redis://`` URL and a wrong password each fail
with a conveyor error that says what is wrong; the password never shows in ``repr(broker)``, in
an error message or its chain, in a log record, or in a worker's output.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import traceback
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from conveyor.brokers import open_broker
from conveyor.brokers.base import Broker
from conveyor.client import Conveyor
from conveyor.context import JobContext
from conveyor.errors import BrokerUnavailable, ConfigurationError, ConveyorError
from conveyor.job import JobState
from conveyor.testing.redis_server import RedisServer, RedisUser, redis_server_binary
from conveyor.worker import Worker

from .conftest import Certificates, conveyor_env

pytestmark = pytest.mark.redis

#: URL-special characters on purpose: the URL must carry it percent-encoded, and it must still
#: never appear, encoded or not.
PASSWORD = "Zq8-s3cr3t@p:w/d"
WRONG_PASSWORD = "Wr0ng-pa55word-77"
USER = RedisUser("conveyor-app", PASSWORD)
SECRETS = (PASSWORD, quote(PASSWORD, safe=""), WRONG_PASSWORD)


@pytest.fixture(scope="module")
def tls_server(certificates: Certificates) -> Iterator[RedisServer]:
    """A TLS-only, ACL-only redis-server for this module."""
    if redis_server_binary() is None:
        if os.environ.get("CONVEYOR_REQUIRE_REDIS") == "1":
            pytest.fail("CONVEYOR_REQUIRE_REDIS=1 but redis-server is not installed")
        pytest.skip("redis-server is not installed; Redis cases skipped (CI requires them)")
    with RedisServer(tls=certificates.server, users=[USER]) as server:
        yield server


def _assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, text


def _chain(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


async def double(ctx: JobContext, n: int) -> int:
    """The job run end to end."""
    return 2 * n


async def test_a_job_runs_end_to_end_over_tls_as_an_acl_user(tls_server: RedisServer) -> None:
    url = tls_server.url
    assert url.startswith("rediss://conveyor-app:")
    assert "ssl_ca_certs=" in url
    app = Conveyor(url)
    app.task(name="t.double")(double)
    _assert_no_secret(repr(app.broker), str(app.broker))
    async with app:
        handle = await app.enqueue("t.double", args=[21])
        await Worker(app, burst=True, burst_wait_s=0.2).run()
        job = await app.get_job(handle.id)
    assert job is not None
    assert job.state is JobState.COMPLETED
    assert job.result == 42


async def _connect_and_close(broker: Broker) -> None:
    try:
        await broker.connect()
        await broker.ping()
    finally:
        await broker.close()


async def _connect_error(url: str, caplog: pytest.LogCaptureFixture) -> ConveyorError:
    broker = open_broker(url, connect_timeout_s=3, socket_timeout_s=3)
    _assert_no_secret(repr(broker))
    with caplog.at_level(logging.DEBUG), pytest.raises(ConveyorError) as raised:
        await _connect_and_close(broker)
    logged = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    _assert_no_secret(str(raised.value), repr(raised.value), _chain(raised.value), *logged)
    return raised.value


async def test_a_server_certificate_from_another_ca_is_refused(
    tls_server: RedisServer, certificates: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    wrong_ca = tls_server.url.replace(
        quote(str(certificates.server.ca)), quote(str(certificates.other_ca))
    )
    system_ca = tls_server.url.split("?")[0]  # the system's trust store: our CA is not in it
    for url in (wrong_ca, system_ca):
        error = await _connect_error(url, caplog)
        assert isinstance(error, BrokerUnavailable)
        assert "certificate verify failed" in str(error).lower(), error
        assert f"127.0.0.1:{tls_server.port}" in str(error)


async def test_a_certificate_for_another_host_name_is_refused(
    certificates: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    # Signed by the trusted CA, but for another name: only host name checking refuses it.
    with RedisServer(tls=certificates.wrong_name, users=[USER]) as elsewhere:
        error = await _connect_error(elsewhere.url, caplog)
    assert isinstance(error, BrokerUnavailable)
    assert "certificate verify failed" in str(error).lower(), error
    assert "hostname" in str(error).lower() or "ip address mismatch" in str(error).lower(), error


async def test_plain_redis_to_a_tls_port_fails_clearly(
    tls_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    plain = tls_server.url.replace("rediss://", "redis://").split("?")[0]
    error = await _connect_error(plain, caplog)
    assert isinstance(error, BrokerUnavailable)
    assert f"127.0.0.1:{tls_server.port}" in str(error)


@pytest.mark.parametrize("who", ["wrong-password", "no-credentials", "unknown-user"])
async def test_bad_credentials_fail_naming_authentication(
    tls_server: RedisServer, caplog: pytest.LogCaptureFixture, who: str
) -> None:
    url = {
        "wrong-password": tls_server.url_for(USER, password=WRONG_PASSWORD),
        "no-credentials": tls_server.url_for(None),
        "unknown-user": tls_server.url_for(RedisUser("intruder", WRONG_PASSWORD)),
    }[who]
    error = await _connect_error(url, caplog)
    assert isinstance(error, ConfigurationError)
    assert "refused the credentials" in str(error)
    assert "AuthenticationError" in str(error)


def test_a_worker_with_a_wrong_password_exits_with_one_clear_line(
    tls_server: RedisServer, tmp_path: Path
) -> None:
    (tmp_path / "x6_tasks.py").write_text(
        textwrap.dedent(
            """
            from conveyor import Conveyor

            app = Conveyor()


            @app.task(name="t.noop")
            async def noop(ctx):
                return None
            """
        )
    )
    url = tls_server.url_for(USER, password=WRONG_PASSWORD)
    done = subprocess.run(
        [str(Path(sys.executable).with_name("conveyor")), "--broker", url, "worker", "x6_tasks"],
        cwd=tmp_path,
        env=conveyor_env(PYTHONPATH=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=45,
    )
    assert done.returncode == 1, done.stderr
    assert "refused the credentials" in done.stderr
    assert "Traceback" not in done.stderr
    _assert_no_secret(done.stdout, done.stderr)
