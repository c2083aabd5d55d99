"""``python -m conveyor.demo`` (``make demo``): a mixed batch of jobs run by an in-process worker.

It uses the embedded SQLite default (``./conveyor-demo.db``, recreated on every run, no server),
enqueues jobs that show priorities, a delay, retries with backoff, a dead letter, a process job
whose printed output is captured into its log, a thread job, and a long job cancelled while it
runs. A live table follows them; when every job has finished it prints a summary and exits 0.

Off a terminal (CI) there is no live redrawing: only one line per notable event, then the
summary. ``DEMO_FAST=1`` shortens every pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from conveyor import demo_tasks as tasks
from conveyor.brokers.base import EventKind, JobEvent
from conveyor.cli.common import progress_cell, state_text, stdout_console
from conveyor.client import Conveyor, JobRequest
from conveyor.job import Job, JobState, Priority

DB_PATH: Final = Path("conveyor-demo.db")
#: The demo gives up (exit 1) if the jobs have not all finished by then: something is broken.
DEADLINE_S: Final = 50.0
#: How often the table is re-read from the broker, besides the wake-ups events give.
REFRESH_S: Final = 0.25
#: The long job is cancelled once it has reported this much progress.
CANCEL_AT_PERCENT: Final = 25
GREETINGS: Final = ("greet high", "greet normal", "greet low")


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

    async def run(self) -> int:
        """Enqueue, start a worker, follow the jobs to the end; returns the exit code."""
        from conveyor.worker import Worker

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

        worker = Worker(
            self.app,
            concurrency={"async": 2, "thread": 2, "process": 1},
            lease_s=5,
            heartbeat_s=0.5,
            scan_interval_s=0.5,
            grace_period_s=2,
        )
        narrator = asyncio.create_task(narrate(), name="conveyor-demo-narrator")
        try:
            async with worker:
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


async def amain(*, fast: bool, console: Console | None = None) -> int:
    """Run the demo; returns the process exit code."""
    # The narration already tells what the worker does; its own INFO/WARNING lines (a retry, a
    # dead letter) would repeat it and tear the live table. Errors still show.
    logging.getLogger("conveyor").setLevel(logging.ERROR)
    _fresh_database(DB_PATH)
    app = tasks.make_app(f"sqlite:///{DB_PATH}", fast=fast)
    async with app:
        demo = Demo(app, console or stdout_console(), fast=fast)
        return await demo.run()


def main() -> None:
    """Entry point of ``python -m conveyor.demo``."""
    fast = os.environ.get("DEMO_FAST", "") not in ("", "0")
    sys.exit(asyncio.run(amain(fast=fast)))


if __name__ == "__main__":
    main()
