"""What every subcommand shares: the CLI state (--broker), running the async client, rendering."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import click
import msgspec
from rich.console import Console
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from conveyor.brokers import DEFAULT_URL
from conveyor.brokers.base import JobPage
from conveyor.client import URL_ENV, Conveyor
from conveyor.job import Job, JobState

T = TypeVar("T")

#: Width used when stdout is not a terminal: rich would assume 80 columns and wrap job ids.
PIPE_WIDTH: Final = 200

STATE_STYLES: Final[Mapping[JobState, str]] = {
    JobState.PENDING: "magenta",
    JobState.QUEUED: "cyan",
    JobState.SCHEDULED: "blue",
    JobState.RUNNING: "yellow",
    JobState.COMPLETED: "green",
    JobState.FAILED: "red",
    JobState.STOPPED: "bright_black",
}


@dataclass(frozen=True)
class CliState:
    """The options of the root command, handed to every subcommand through the click context.

    Attributes:
        broker_url: the broker URL (``--broker``, ``$CONVEYOR_URL`` or the SQLite default).
        broker_from_command_line: whether ``--broker`` was typed (then it overrides a worker
            module's own URL).
    """

    broker_url: str
    broker_from_command_line: bool


pass_state = click.make_pass_decorator(CliState)


def broker_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The root command's ``--broker URL`` option."""
    return click.option(
        "--broker",
        "broker_url",
        envvar=URL_ENV,
        default=DEFAULT_URL,
        show_default=True,
        show_envvar=True,
        metavar="URL",
        help="Broker URL: sqlite:///PATH, redis://HOST:PORT/DB or memory://.",
    )(fn)


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A ``--json`` flag: machine-readable output instead of tables."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON instead of a table (for scripts)."
    )(fn)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one command's coroutine on a fresh event loop."""
    return asyncio.run(coro)


@asynccontextmanager
async def connected_app(state: CliState) -> AsyncIterator[Conveyor]:
    """An app on the CLI's broker, connected for the duration of one command.

    The CLI is a producer and an inspector: it needs no tasks, so jobs are enqueued by task name
    and the worker's code is never imported here.
    """
    app = Conveyor(state.broker_url)
    try:
        await app.connect()
        yield app
    finally:
        await app.close()


# -- parsing ---------------------------------------------------------------------------------------


def parse_states(values: Iterable[str]) -> list[JobState] | None:
    """``--state`` values (repeatable, comma-separated) as states; None when none were given."""
    names = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if not names:
        return None
    states: list[JobState] = []
    for name in names:
        try:
            states.append(JobState(name.lower()))
        except ValueError:
            accepted = ", ".join(s.value for s in JobState)
            raise click.BadParameter(
                f"unknown state {name!r}; use one of: {accepted}", param_hint="'--state'"
            ) from None
    return states


def split_csv(value: str | None) -> list[str] | None:
    """``a,b`` -> ``["a", "b"]``; None or blank -> None."""
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",") if p.strip()]
    return parts or None


# -- output ----------------------------------------------------------------------------------------


def stdout_console() -> Console:
    """The console for results; wide when piped so ids and names are not wrapped."""
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=PIPE_WIDTH if piped else None, highlight=False)


def stderr_console() -> Console:
    """The console for progress and notes, so stdout stays clean for scripts."""
    return Console(stderr=True, highlight=False)


def job_to_dict(job: Job) -> dict[str, Any]:
    """Every field of a job as JSON-ready builtins (defaults included, unlike the stored form)."""
    fields = {name: getattr(job, name) for name in job.__struct_fields__}
    out: dict[str, Any] = msgspec.to_builtins(fields)
    return out


def page_to_dict(page: JobPage) -> dict[str, Any]:
    """A page of jobs as JSON-ready builtins: ``{"jobs": [...], "next_cursor": ...}``."""
    return {"jobs": [job_to_dict(j) for j in page.jobs], "next_cursor": page.next_cursor}


def echo_json(value: Any) -> None:
    """Print ``value`` as indented JSON on stdout."""
    click.echo(json.dumps(msgspec.to_builtins(value), indent=2, sort_keys=False))


def state_text(state: JobState) -> Text:
    """A job state, coloured."""
    return Text(state.value, style=STATE_STYLES.get(state, ""))


def progress_cell(progress: int, state: JobState, width: int = 12) -> Table:
    """A small progress bar with its percentage, for table cells."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=width)
    grid.add_column(justify="right", width=4)
    done = state is JobState.COMPLETED
    pct = 100 if done else progress
    bar = ProgressBar(
        total=100,
        completed=pct,
        width=width,
        complete_style="green" if done else "yellow",
        finished_style="green",
    )
    grid.add_row(bar, f"{pct}%")
    return grid


def _span(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def format_age(since_ms: int, now_ms: int | None = None) -> str:
    """How long ago ``since_ms`` was, in its largest unit: ``4s``, ``12m``, ``3h``, ``2d``."""
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    return _span(max(0, (now - since_ms) // 1000))


def format_ms(epoch_ms: int | None) -> str:
    """An epoch-ms timestamp as local time, with how long ago (or from now) it is; or ``-``."""
    if not epoch_ms:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch_ms / 1000))
    delta_s = (epoch_ms - time.time_ns() // 1_000_000) // 1000
    relative = f"in {_span(delta_s)}" if delta_s > 0 else f"{_span(-delta_s)} ago"
    return f"{stamp}.{epoch_ms % 1000:03d} ({relative})"


def jobs_table(jobs: Sequence[Job], *, title: str | None = None, errors: bool = False) -> Table:
    """The ``jobs list`` table: id, task, queue, state, priority, attempts, progress, age."""
    table = Table(title=title, header_style="bold", title_justify="left")
    table.add_column("id", no_wrap=True)
    table.add_column("task", overflow="fold")
    table.add_column("queue")
    table.add_column("state")
    table.add_column("priority")
    table.add_column("attempts", justify="right")
    if errors:
        table.add_column("reason")
        table.add_column("error", overflow="fold", max_width=60)
    else:
        table.add_column("progress")
    table.add_column("age", justify="right")
    now = time.time_ns() // 1_000_000
    for job in jobs:
        # Text(), not str: a task name or error message must never be read as rich markup.
        row: list[Any] = [
            Text(job.id),
            Text(job.task),
            Text(job.queue),
            state_text(job.state),
            job.priority.value,
            f"{job.attempts}/{job.max_attempts}",
        ]
        if errors:
            row += [Text(job.failure_reason or "-"), Text(job.error or "-")]
        else:
            row.append(progress_cell(job.progress, job.state))
        row.append(format_age(job.enqueued_ms, now))
        table.add_row(*row)
    return table


def job_detail_table(job: Job) -> Table:
    """Every field of one job as a two-column grid (``jobs show``); long texts are printed after."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    timestamps = {"enqueued_ms", "run_at_ms", "started_ms", "finished_ms", "lease_expires_ms"}
    for name, value in job_to_dict(job).items():
        if name in ("traceback",):
            continue
        shown: Any
        if name == "state":
            shown = state_text(job.state)
        elif name in timestamps:
            shown = format_ms(value)
        elif name == "progress":
            shown = progress_cell(job.progress, job.state, width=20)
        elif isinstance(value, dict | list) or value is None:
            shown = Text(json.dumps(value))
        else:
            shown = Text(str(value))
        grid.add_row(name.removesuffix("_ms") if name in timestamps else name, shown)
    return grid
