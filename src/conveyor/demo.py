"""``python -m conveyor.demo`` (``make demo``): a mixed batch of jobs, live, with the dashboard.

It uses the embedded SQLite default (``./conveyor-demo.db``, recreated on every run, no server),
starts the HTTP service in this process (``create_app`` on uvicorn, on 127.0.0.1:8000 or a free
port when 8000 is taken) whose lifespan runs one worker, and enqueues jobs that show priorities,
a delay, retries with backoff, a dead letter, a process job whose printed output is captured into
its log, a thread job, and a long job cancelled while it runs. A live table follows them; when
every job has finished it prints a summary and the dashboard's URL, then keeps serving until
Ctrl-C (a second Ctrl-C stops at once).

Off a terminal (CI) there is no live redrawing: only one line per notable event, then the
summary. ``DEMO_FAST=1`` shortens every pause; ``DEMO_SECONDS=N`` ends the demo by itself N
seconds after it started (never before the summary), exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from conveyor import demo_tasks as tasks
from conveyor.brokers.base import EventKind, JobEvent
from conveyor.cli.common import progress_cell, state_text, stdout_console
from conveyor.client import Conveyor, JobRequest
from conveyor.errors import MissingDependencyError
from conveyor.job import Job, JobState, Priority

if TYPE_CHECKING:
    from fastapi import FastAPI

    from conveyor.worker import Worker

DB_PATH: Final = Path("conveyor-demo.db")
#: The demo gives up (exit 1) if the jobs have not all finished by then: something is broken.
DEADLINE_S: Final = 50.0
#: How often the table is re-read from the broker, besides the wake-ups events give.
REFRESH_S: Final = 0.25
#: The long job is cancelled once it has reported this much progress.
CANCEL_AT_PERCENT: Final = 25
GREETINGS: Final = ("greet high", "greet normal", "greet low")
#: The dashboard's port when it is free (else any free port).
PORT: Final = 8000
#: Longest wait for the server (its streams, then its worker's grace period) to stop.
STOP_TIMEOUT_S: Final = 15.0


@dataclass
class Tracked:
    """One demo job: its label and the latest record read."""

    label: str
    job: Job


@dataclass
class Plan:
    """The batch to enqueue, with a label per job (labels name the jobs in the table)."""

    requests: list[tuple[str, JobRequest]] = field(default_factory=list)

    def add(self, label: str, request: JobRequest) -> None:
        """Add one labelled job."""
        self.requests.append((label, request))


def build_plan(app: Conveyor, *, fast: bool) -> Plan:
    """The mixed batch. Greetings are enqueued low first, so priority visibly reorders them."""
    pause = 0.25 if fast else 1.0
    plan = Plan()
    for who, prio in (("Lin", Priority.LOW), ("Noor", Priority.NORMAL), ("Hana", Priority.HIGH)):
        plan.add(f"greet {prio.value}", app.request(tasks.GREET, args=[who], priority=prio))
    plan.add("greet delayed", app.request(tasks.GREET, args=["Dev"], delay_s=2.0 * pause))
    plan.add("flaky fetch", app.request(tasks.FLAKY_FETCH, args=["https://rates.example.com"]))
    plan.add("charge invoice", app.request(tasks.CHARGE_INVOICE, args=[17]))
    crunch = {"chunks": 5, "pause_s": 0.4 * pause}
    plan.add("crunch (process)", app.request(tasks.CRUNCH, args=[300_000], kwargs=crunch))
    resize = {"steps": 4, "step_s": 0.5 * pause}
    plan.add("resize (thread)", app.request(tasks.RESIZE_IMAGE, args=["cat.png"], kwargs=resize))
    plan.add("build report", app.request(tasks.BUILD_REPORT, args=[40, 0.25 * pause]))
    return plan


class Demo:
    """Runs the demo: enqueue, work, watch, cancel the long job, summarise."""

    def __init__(self, app: Conveyor, console: Console, *, fast: bool) -> None:
        self.app = app
        self.console = console
        self.fast = fast
        self.live_mode = console.is_terminal and not console.is_dumb_terminal
        self.jobs: dict[str, Tracked] = {}
        self.started = time.monotonic()
        self.changed = asyncio.Event()
        self.cancelled_at: int | None = None

    # -- narration -------------------------------------------------------------------------------

    def say(self, text: str, style: str = "") -> None:
        """One line of narration, prefixed with the time since the start."""
        stamp = f"+{time.monotonic() - self.started:4.1f}s "
        self.console.print(Text(stamp, style="dim") + Text(text, style=style))

    def on_event(self, event: JobEvent) -> None:
        """Narrate notable transitions (one line each, never a redraw) and wake the refresher."""
        tracked = self.jobs.get(event.job_id)
        if tracked is None:
            return
        self.changed.set()
        if event.kind is not EventKind.STATE:
            return
        name = tracked.label
        match event.transition:
            case "reserve":
                self.say(f"start  {name}")
            case "promote_scheduled":
                self.say(f"due    {name} (its delay has passed)", "blue")
            case "retry":
                self.say(f"retry  {name}: {event.error or 'failed'}; backing off", "yellow")
            case "ack":
                self.say(f"done   {name}", "green")
            case "dead_letter":
                self.say(f"dead   {name}: {event.error or 'failed'}", "red")
            case "cancel":
                self.say(f"stop   {name} (cancelled while running)", "bright_black")

    # -- the table -------------------------------------------------------------------------------

    def table(self) -> Table:
        """The jobs with state, attempts and progress bars."""
        table = Table(title="conveyor demo", title_justify="left", header_style="bold")
        for column in ("job", "task", "priority", "state", "attempts", "progress"):
            table.add_column(column, no_wrap=True)
        table.add_column("note", no_wrap=True, overflow="ellipsis", max_width=48)
        for tracked in self.jobs.values():
            job = tracked.job
            note = job.error if job.state is JobState.FAILED else job.description
            table.add_row(
                Text(tracked.label),
                Text(job.task.removeprefix("demo.")),
                job.priority.value,
                state_text(job.state),
                f"{job.attempts}/{job.max_attempts}",
                progress_cell(job.progress, job.state),
                Text(note or ""),
            )
        return table

    async def refresh(self) -> None:
        """Re-read every demo job (one query) into the table's rows."""
        page = await self.app.list_jobs(limit=len(self.jobs) + 10)
        for job in page.jobs:
            if job.id in self.jobs:
                self.jobs[job.id].job = job

    # -- the run ---------------------------------------------------------------------------------

    async def run(self, server: DemoServer) -> int:
        """Enqueue, start the server and its worker, follow the jobs to the end; the exit code."""
        plan = build_plan(self.app, fast=self.fast)
        # Subscribed, and the narrator running, before the worker starts: no transition that
        # the worker makes is missed (the table itself never depends on events, see refresh).
        events = self.app.broker.subscribe()
        handles = await self.app.enqueue_many(request for _, request in plan.requests)
        for (label, request), handle in zip(plan.requests, handles, strict=True):
            self.jobs[handle.id] = Tracked(label, request.job)
        self.say(f"enqueued {len(handles)} jobs on {self.app.url}")

        async def narrate() -> None:
            async for event in events:
                self.on_event(event)

        narrator = asyncio.create_task(narrate(), name="conveyor-demo-narrator")
        try:
            # The server's lifespan starts the worker only now, with the whole batch waiting, so
            # priorities decide the order (a worker already running would take the first job).
            await server.start()
            self.say(f"dashboard: {server.url}", "bold")
            finished = await self.follow()
        finally:
            narrator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await narrator
        await self.refresh()
        if not finished:
            self.console.print(self.table())
            self.console.print(f"[red]the jobs did not all finish within {DEADLINE_S:.0f} s[/]")
            return 1
        await self.summary()
        return 0

    async def follow(self) -> bool:
        """Refresh the table until every job has finished; False if the deadline passed."""
        live = Live(self.table(), console=self.console, refresh_per_second=8, transient=True)
        with live if self.live_mode else contextlib.nullcontext():
            try:
                async with asyncio.timeout(DEADLINE_S):
                    while True:
                        await self.refresh()
                        if self.live_mode:
                            live.update(self.table())
                        await self.maybe_cancel_report()
                        if all(t.job.state.is_finished for t in self.jobs.values()):
                            return True
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(REFRESH_S):
                                await self.changed.wait()
                        self.changed.clear()
            except TimeoutError:
                return False

    async def maybe_cancel_report(self) -> None:
        """Cancel the long job once it is visibly running (the point is to stop running work)."""
        if self.cancelled_at is not None:
            return
        for job_id, tracked in self.jobs.items():
            job = tracked.job
            running = job.task == tasks.BUILD_REPORT and job.state is JobState.RUNNING
            if running and job.progress >= CANCEL_AT_PERCENT:
                self.cancelled_at = job.progress
                self.say(f"cancel {tracked.label} at {job.progress}%", "magenta")
                await self.app.cancel(job_id)

    # -- the summary -----------------------------------------------------------------------------

    async def summary(self) -> None:
        """Counts per final state, retries, dead letter, process output, cancellation, time."""
        console = self.console
        elapsed = time.monotonic() - self.started
        console.print(self.table())
        by_state: dict[JobState, list[Tracked]] = {}
        for tracked in self.jobs.values():
            by_state.setdefault(tracked.job.state, []).append(tracked)
        counts = "  ".join(
            f"{state.value} {len(by_state.get(state, []))}"
            for state in (JobState.COMPLETED, JobState.FAILED, JobState.STOPPED)
        )
        lines: list[Text] = [Text("Summary", style="bold"), Text(f"  final states: {counts}")]
        # attempts counts charged runs, so every run beyond the first of a finished job was a retry
        retried = [t for t in self.jobs.values() if t.job.attempts > 1]
        retries = sum(t.job.attempts - 1 for t in retried)
        detail = ", ".join(f"{t.label} x{t.job.attempts - 1}" for t in retried)
        lines.append(Text(f"  retries: {retries} ({detail})"))
        for t in self.jobs.values():
            if t.job.task == tasks.FLAKY_FETCH:
                lines.append(Text(f"  {t.label}: {t.job.state.value}, result {t.job.result!r}"))
        greetings = sorted(
            (
                t
                for t in self.jobs.values()
                if t.label in ("greet high", "greet normal", "greet low")
            ),
            key=lambda t: (t.job.started_ms or 0, t.job.priority.rank),
        )
        order = " -> ".join(t.label.removeprefix("greet ") for t in greetings)
        lines.append(Text(f"  priority: started {order} (enqueued low, normal, high)"))
        for t in by_state.get(JobState.FAILED, []):
            lines.append(
                Text(
                    f"  dead letter: {t.label} after {t.job.attempts} attempts "
                    f"({t.job.failure_reason}): {t.job.error}",
                    style="red",
                )
            )
        for t in by_state.get(JobState.STOPPED, []):
            lines.append(
                Text(f"  stopped: {t.label}, cancelled while running at {t.job.progress}%")
            )
        for job_id, t in self.jobs.items():
            if t.job.task == tasks.CRUNCH:
                page = await self.app.logs(job_id)
                lines.append(
                    Text(
                        f"  {t.label} result {t.job.result}; captured output ({page.total} lines):"
                    )
                )
                lines.extend(Text(f"    | {line}", style="cyan") for line in page.lines)
        lines.append(Text(f"  elapsed: {elapsed:.1f} s"))
        lines.append(Text(f"  inspect: conveyor --broker {self.app.url} jobs list", style="dim"))
        console.print(Group(*lines))


def _fresh_database(path: Path) -> None:
    """Remove a previous run's database (and its WAL files) so every run starts empty."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{suffix}").unlink()


class DemoServer:
    """The HTTP service (REST, events, dashboard) on uvicorn in this event loop, with its worker.

    Args:
        app: the demo's app (its tasks are what the service's in-process worker runs).
        sock: the bound listening socket (bound by the caller, so the URL is known up front and
            no other process can take the port between choosing and binding it).
    """

    def __init__(self, app: Conveyor, sock: socket.socket) -> None:
        try:
            import uvicorn

            from conveyor.service import ServiceSettings, create_app
        except ImportError:
            raise MissingDependencyError(
                "the demo serves the dashboard: pip install 'conveyor[server]' (make demo does)"
            ) from None
        self.sock = sock
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}/"
        self.api: FastAPI = create_app(
            app, workers=1, worker_factory=make_worker, settings=ServiceSettings(worker_grace_s=5)
        )

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                # The demo owns SIGINT/SIGTERM (see amain): uvicorn would re-raise a signal once
                # it has stopped, turning a clean Ctrl-C into a KeyboardInterrupt traceback.
                yield

        config = uvicorn.Config(
            self.api,
            log_level="warning",
            access_log=False,
            lifespan="on",
            loop="asyncio",
            log_config=None,  # leave logging as the demo set it
            timeout_graceful_shutdown=3,  # the backstop if a client holds a connection open
        )
        self.server = Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Serve; returns once the lifespan (broker, event hub, worker) has started."""
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="demo-http")
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what went wrong, if anything did
                raise RuntimeError("the demo's HTTP server did not start")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Stop serving, bounded: end the event streams, then uvicorn stops the worker."""
        task, self._task = self._task, None
        if task is not None:
            # uvicorn waits for open responses before its lifespan shutdown, and an open
            # dashboard's event stream never ends by itself: end the streams first.
            self.api.state.service.hub.close()
            self.server.should_exit = True
            done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT_S)
            if not done:
                self.server.force_exit = True
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.sock.close()


def make_worker(app: Conveyor) -> Worker:
    """The service's in-process worker, with the demo's small pools and short intervals."""
    from conveyor.worker import Worker

    return Worker(
        app,
        concurrency={"async": 2, "thread": 2, "process": 1},
        lease_s=5,
        heartbeat_s=0.5,
        scan_interval_s=0.5,
        grace_period_s=2,
    )


def listen_socket(port: int = PORT) -> socket.socket:
    """A socket bound to 127.0.0.1: ``port`` when it is free, else any free port."""
    for candidate in (port, 0):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # As uvicorn does: a port left in TIME_WAIT by the previous run is free to reuse.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", candidate))
        except OSError:
            sock.close()
            continue
        return sock
    raise OSError("no free port on 127.0.0.1")


def _on_signals(stop: asyncio.Event) -> Callable[[], None]:
    """First SIGINT/SIGTERM sets ``stop`` (graceful); a second exits at once. Returns an undo."""
    loop = asyncio.get_running_loop()

    def handle() -> None:
        if stop.is_set():
            os._exit(130)  # a second signal: the user does not want to wait for the shutdown
        stop.set()

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals here
            loop.add_signal_handler(sig, handle)
            installed.append(sig)

    def undo() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return undo


async def _unless_stopped(work: Awaitable[int], stop: asyncio.Event) -> int | None:
    """``work``'s result, or None (``work`` cancelled) if ``stop`` is set first."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stopped
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


async def amain(*, fast: bool, seconds: float | None = None, console: Console | None = None) -> int:
    """Run the demo; returns the process exit code.

    Args:
        fast: shorten every pause (``DEMO_FAST``).
        seconds: stop this long after the start, once the summary is out (None: at Ctrl-C).
        console: where to print (default: stdout).
    """
    started = time.monotonic()
    # The narration already tells what the worker does; its own INFO/WARNING lines (a retry, a
    # dead letter) would repeat it and tear the live table. Errors still show.
    logging.getLogger("conveyor").setLevel(logging.ERROR)
    console = console or stdout_console()
    _fresh_database(DB_PATH)
    app = tasks.make_app(f"sqlite:///{DB_PATH}", fast=fast)
    stop = asyncio.Event()
    undo_signals = _on_signals(stop)
    try:
        async with app:
            server = DemoServer(app, listen_socket())
            try:
                code = await _unless_stopped(Demo(app, console, fast=fast).run(server), stop)
                if code is None:
                    console.print("interrupted: stopping the server and its worker")
                    return 130
                if code == 0:
                    await _serve(server, console, stop, started, seconds)
                return code
            finally:
                await server.stop()
    finally:
        undo_signals()


async def _serve(
    server: DemoServer, console: Console, stop: asyncio.Event, started: float, seconds: float | None
) -> None:
    """Keep serving the dashboard until Ctrl-C, or until ``seconds`` after ``started``."""
    if seconds is None:
        note, remaining = "serving until Ctrl-C", None
    else:
        remaining = max(0.0, seconds - (time.monotonic() - started))
        note = (
            f"serving for {remaining:.0f} s more (DEMO_SECONDS), or until Ctrl-C"
            if remaining >= 1
            else f"DEMO_SECONDS={seconds:g} has passed"
        )
    console.print(f"dashboard: {server.url}  ({note})", style="bold", soft_wrap=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(remaining):
            await stop.wait()
    console.print("stopping the server and its worker")


def _seconds(value: str | None) -> float | None:
    if value in (None, ""):
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses NaN
        raise SystemExit(f"DEMO_SECONDS must be a number of seconds >= 0, got {value!r}")
    return seconds


def main() -> None:
    """Entry point of ``python -m conveyor.demo``."""
    fast = os.environ.get("DEMO_FAST", "") not in ("", "0")
    seconds = _seconds(os.environ.get("DEMO_SECONDS"))
    sys.exit(asyncio.run(amain(fast=fast, seconds=seconds)))


if __name__ == "__main__":
    main()
