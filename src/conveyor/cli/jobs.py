"""``conveyor jobs``: list, show, follow the logs of, cancel, retry and delete jobs."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

import click
from rich.text import Text

from conveyor.brokers.base import EventKind
from conveyor.cli.common import (
    CliState,
    connected_app,
    echo_json,
    job_detail_table,
    job_to_dict,
    jobs_table,
    json_option,
    page_to_dict,
    parse_states,
    pass_state,
    run,
    stderr_console,
    stdout_console,
)
from conveyor.client import Conveyor
from conveyor.errors import BrokerError, JobNotFound

#: While following logs, how often to re-read even without an event (a missed event only delays).
FOLLOW_REREAD_S: Final = 1.0


@click.group()
def jobs() -> None:
    """Inspect and control jobs."""


@jobs.command("list")
@click.option("--queue", help="Only this queue.")
@click.option("--state", "states", multiple=True, help="Only these states (repeat or a,b).")
@click.option("--task", help="Only this task name.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--cursor", help="Continue from the cursor a previous page printed.")
@json_option
@pass_state
def list_jobs(
    state: CliState,
    queue: str | None,
    states: tuple[str, ...],
    task: str | None,
    limit: int,
    cursor: str | None,
    as_json: bool,
) -> None:
    """List jobs, newest first."""
    wanted = parse_states(states)

    async def fetch() -> None:
        async with connected_app(state) as app:
            page = await app.list_jobs(
                queue=queue, states=wanted, task=task, limit=limit, cursor=cursor
            )
        if as_json:
            echo_json(page_to_dict(page))
            return
        if not page.jobs:
            stderr_console().print("no jobs match")
            return
        stdout_console().print(jobs_table(page.jobs))
        if page.next_cursor:
            stderr_console().print(Text(f"more: --cursor {page.next_cursor}", style="dim"))

    run(fetch())


@jobs.command()
@click.argument("job_id")
@json_option
@pass_state
def show(state: CliState, job_id: str, as_json: bool) -> None:
    """Show every field of a job, with its error and traceback."""

    async def fetch() -> None:
        async with connected_app(state) as app:
            job = await app.handle(job_id).status()
        if as_json:
            echo_json(job_to_dict(job))
            return
        console = stdout_console()
        console.print(job_detail_table(job))
        if job.traceback:
            console.print()
            console.print(Text("traceback:", style="bold"))
            console.print(Text(job.traceback.rstrip()), soft_wrap=True)

    run(fetch())


@jobs.command()
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the job ends.")
@pass_state
def logs(state: CliState, job_id: str, follow: bool) -> None:
    """Print a job's captured log lines (its output and ctx.log lines)."""
    run(_logs(state, job_id, follow))


async def _logs(state: CliState, job_id: str, follow: bool) -> None:
    async with connected_app(state) as app:
        printer = _LogPrinter(app, job_id)
        if not follow:
            await printer.print_new()
            return
        changed = asyncio.Event()
        # Subscribe before the first read (for brokers that start the stream at this call), so a
        # line appended in between still wakes us; the periodic re-read covers the others.
        stream = app.broker.subscribe(job_id=job_id)

        async def wake_on_events() -> None:
            async for event in stream:
                if event.kind in (EventKind.LOG, EventKind.STATE, EventKind.DELETED):
                    changed.set()

        follower = asyncio.create_task(wake_on_events(), name=f"conveyor-cli-logs-{job_id}")
        try:
            while True:
                await printer.print_new()
                job = await app.get_job(job_id)
                if job is None or job.state.is_finished:
                    await printer.print_new_if_exists()  # lines written just before the end
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FOLLOW_REREAD_S):
                        await changed.wait()
                changed.clear()
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await follower


class _LogPrinter:
    """Prints each log line once, across reads, even while the broker drops the oldest lines.

    Lines are counted from the first ever appended: a page starting at kept-offset ``o`` with
    ``dropped`` older lines gone holds lines ``dropped + o`` onwards.
    """

    def __init__(self, app: Conveyor, job_id: str) -> None:
        self.app = app
        self.job_id = job_id
        self.printed = 0  # lines printed, counted from the first line ever appended
        self.dropped = 0  # the broker's dropped count at the last read

    async def print_new(self) -> None:
        """Print the lines appended since the last call (JobNotFound if the job is gone)."""
        offset = max(0, self.printed - self.dropped)
        page = await self.app.logs(self.job_id, offset=offset)
        first = page.dropped + offset
        if first > self.printed:
            lost = first - self.printed
            click.echo(f"... {lost} older lines were dropped by the log cap", err=True)
            self.printed = first
        for line in page.lines[self.printed - first :]:
            click.echo(line)
        self.printed = first + len(page.lines)
        self.dropped = page.dropped

    async def print_new_if_exists(self) -> None:
        """Like :meth:`print_new`, but a job deleted meanwhile just ends the output."""
        with contextlib.suppress(JobNotFound):
            await self.print_new()


@jobs.command()
@click.argument("job_id")
@pass_state
def cancel(state: CliState, job_id: str) -> None:
    """Cancel a job (a running one is stopped by its worker)."""

    async def act() -> None:
        async with connected_app(state) as app:
            job = await app.cancel(job_id)
        click.echo(f"{job.id} {job.state.value}")

    run(act())


@jobs.command()
@click.argument("job_id")
@pass_state
def retry(state: CliState, job_id: str) -> None:
    """Re-drive one failed (dead-letter) or stopped job back to its queue."""

    async def act() -> None:
        async with connected_app(state) as app:
            moved = await app.retry_job(job_id)
            if not moved:
                job = await app.get_job(job_id)
                current = job.state.value if job is not None else "deleted"
                raise BrokerError(
                    f"job {job_id} is {current}; only failed or stopped jobs can be retried"
                )
        click.echo(f"{job_id} queued")

    run(act())


@jobs.command()
@click.argument("job_id")
@pass_state
def delete(state: CliState, job_id: str) -> None:
    """Delete a job and its logs (a running one loses its lease)."""

    async def act() -> None:
        async with connected_app(state) as app:
            await app.delete(job_id)
        click.echo(f"{job_id} deleted")

    run(act())
