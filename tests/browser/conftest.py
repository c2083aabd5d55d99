"""Real-browser fixtures: headless Chromium (Debian's, driven by Playwright) and a live server.

The server is uvicorn on a free loopback port, in a thread with its own event loop, serving
``create_app`` on a SQLite broker in ``tmp_path`` with one in-process worker running the tasks
below. Chromium is ``/usr/bin/chromium`` (or ``$CONVEYOR_CHROMIUM``); when it is missing and we
are root with apt-get, it is installed (bounded in time). Otherwise the tests skip with the
reason, except under ``CI=true`` or ``CONVEYOR_REQUIRE_BROWSER=1``, where they fail: CI must not
pass by skipping them. ``playwright install`` (which downloads browsers) is never run.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi import FastAPI

from conveyor.client import Conveyor
from conveyor.context import JobContext
from conveyor.service import ServiceSettings, create_app
from conveyor.testing.redis_server import free_port

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = "/usr/bin/chromium"
INSTALL_TIMEOUT_S = 180
REQUIRED = (
    os.environ.get("CI", "").lower() in ("1", "true", "yes")
    or os.environ.get("CONVEYOR_REQUIRE_BROWSER") == "1"
)
#: The per-test limit for browser tests (``pytest.mark.timeout``): raised only because the first
#: test may install Chromium; every wait inside a test is bounded by Playwright's own timeouts.
TEST_TIMEOUT_S = INSTALL_TIMEOUT_S + 60


def unavailable(reason: str) -> None:
    """Skip with ``reason``; fail instead when the browser tests are required (CI)."""
    if REQUIRED:
        pytest.fail(f"{reason} (CI=true or CONVEYOR_REQUIRE_BROWSER=1: the browser tests must run)")
    pytest.skip(reason)


def _find_chromium() -> str | None:
    override = os.environ.get("CONVEYOR_CHROMIUM")
    if override:
        return override if os.access(override, os.X_OK) else None
    for candidate in (CHROMIUM, shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _install_chromium() -> str:
    """apt-get install chromium, bounded in time; why it could not be done, or ''."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "not root with apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + INSTALL_TIMEOUT_S
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        try:
            done = subprocess.run(
                command,
                env=env,
                capture_output=True,
                text=True,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"{' '.join(command)} took over {INSTALL_TIMEOUT_S} s"
        if done.returncode != 0:
            return f"{' '.join(command)} failed: {done.stderr.strip()[-300:]}"
    return ""


@pytest.fixture(scope="package")
def chromium_path() -> str:
    """Chromium's executable: found, installed with apt-get, or the test skips (fails in CI)."""
    path = _find_chromium()
    override = os.environ.get("CONVEYOR_CHROMIUM")
    if path is None and override:
        unavailable(f"CONVEYOR_CHROMIUM={override} is not an executable")
    if path is None:
        why = _install_chromium()
        path = _find_chromium()
        if path is None:
            unavailable(f"no Chromium at {CHROMIUM} and it could not be installed ({why})")
    assert path is not None
    return path


@pytest.fixture(scope="package")
def browser(chromium_path: str) -> Iterator[Browser]:
    """One headless Chromium for the package's tests (each test gets its own context)."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        unavailable("playwright is not installed (it is in the 'test' dependency group)")
        raise  # unreachable: unavailable() always raises
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=chromium_path, headless=True)
        except Error as exc:
            unavailable(f"Chromium at {chromium_path} did not start: {str(exc)[:300]}")
            raise
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page (own context: no shared storage) with short timeouts."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    context.set_default_timeout(10_000)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()  # closes the page's event stream before the server stops


@pytest.fixture
def shot(request: pytest.FixtureRequest) -> Callable[[Page, str], Path]:
    """``shot(page, name)``: save a numbered screenshot under test-artifacts/browser/<test>/."""
    folder = request.config.rootpath / "test-artifacts" / "browser"
    folder /= re.sub(r"[^\w.-]+", "_", request.node.name)
    shutil.rmtree(folder, ignore_errors=True)
    taken: list[Path] = []

    def take(page: Page, name: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{len(taken) + 1:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        taken.append(path)
        return path

    return take


# -- the tasks the server's worker runs ----------------------------------------------------------


async def steps(ctx: JobContext, n: int, step_s: float) -> str:
    """Reports progress in ``n`` steps and logs a line after each."""
    for i in range(1, n + 1):
        await asyncio.sleep(step_s)
        ctx.log(f"step {i} of {n} done")
        ctx.progress(i * 100 // n, f"step {i}/{n}")
    return f"{n} steps done"


async def long(ctx: JobContext, seconds: float) -> str:
    """Runs for ``seconds`` unless stopped, ticking its progress."""
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        ctx.progress(elapsed * 100 / seconds, "working")
        await asyncio.sleep(0.2)
    return "finished"


async def fail(ctx: JobContext, message: str, after_s: float = 0.0) -> None:
    """Logs ``message``, then fails with it (after ``after_s``, so a rerun is visibly running)."""
    ctx.log(message)
    await asyncio.sleep(after_s)
    raise ValueError(message)


async def echo(ctx: JobContext, value: Any) -> Any:
    """Logs and returns its argument."""
    ctx.log(str(value))
    return value


def make_app(url: str) -> Conveyor:
    """An app with the test tasks; ``t.fail`` dead-letters on its first failure."""
    app = Conveyor(url)
    app.task(name="t.steps")(steps)
    app.task(name="t.long")(long)
    app.task(name="t.fail", max_attempts=1)(fail)
    app.task(name="t.echo")(echo)
    return app


# -- the server ----------------------------------------------------------------------------------


@dataclass
class Server:
    """A running dashboard server (uvicorn in its own thread and loop) and a client for its API."""

    url: str
    port: int
    client: httpx.Client
    api: FastAPI
    uvicorn_server: Any
    thread: threading.Thread
    loop: asyncio.AbstractEventLoop

    def enqueue(self, task: str, *args: Any, **options: Any) -> str:
        """POST /jobs; the new job's id."""
        response = self.client.post("/jobs", json={"task": task, "args": list(args), **options})
        assert response.status_code == 201, response.text
        job_id: str = response.json()["job_id"]
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        """GET /jobs/{id}."""
        response = self.client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        return job

    def wait_state(self, job_id: str, *states: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """Poll the job until it is in one of ``states``."""
        deadline = time.monotonic() + timeout_s
        while (job := self.job(job_id))["state"] not in states:
            assert time.monotonic() < deadline, f"job stayed {job['state']}, wanted {states}"
            time.sleep(0.05)
        return job

    def stop(self) -> None:
        """Stop the server (idempotent): streams, then uvicorn, its worker and broker."""
        if self.loop.is_closed():
            return
        self.client.close()
        # uvicorn waits for open responses before the lifespan shutdown, and an event stream
        # never ends by itself: end the streams first (as `conveyor serve` does on a signal).
        self.api.state.service.hub.close_threadsafe()
        self.uvicorn_server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive(), "uvicorn did not stop within 15 s"
        self.loop.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``start_server(token=None, port=None)``: the service with one worker, on uvicorn.

    Every server of a test shares one SQLite file, so a restarted server finds the jobs (and
    the event log) of the one before.
    """
    import uvicorn

    from conveyor.worker import Worker

    running: list[Server] = []

    def start(token: str | None = None, port: int | None = None) -> Server:
        app = make_app(f"sqlite:///{tmp_path / 'dashboard.db'}")
        api = create_app(
            app,
            workers=1,
            settings=ServiceSettings(token=token, rate_limit_per_s=None, worker_grace_s=5),
            worker_factory=lambda a: Worker(
                a,
                concurrency={"async": 8, "thread": 2},
                lease_s=5,
                heartbeat_s=0.5,
                scan_interval_s=0.5,
                grace_period_s=1,
            ),
        )
        port = port or free_port()
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
        headers = {"authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(base_url=url, headers=headers, timeout=5)
        running.append(Server(url, port, client, api, server, thread, loop))
        return running[-1]

    yield start
    for server in running:
        server.stop()
