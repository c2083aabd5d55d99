"""``conveyor enqueue``: add one job by task name, optionally waiting for it with a progress bar."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import click
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from conveyor.brokers.base import EventKind
from conveyor.cli.common import CliState, connected_app, pass_state, run, stderr_console
from conveyor.client import Conveyor, JobHandle
from conveyor.errors import JobFailed, JobNotFound, JobTimeout
from conveyor.job import Job, JobState

#: How often the job is re-read while waiting, in case an event was missed.
REREAD_S = 1.0


def _parse_json(value: str, option: str, kind: type[list[Any]] | type[dict[str, Any]]) -> Any:
    """Parse an option's JSON, refusing anything but the expected container type."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc})", param_hint=f"'{option}'") from None
    if not isinstance(parsed, kind):
        expected = "an array, e.g. '[1, \"a\"]'" if kind is list else "an object, e.g. '{\"n\": 1}'"
        raise click.BadParameter(f"must be a JSON {expected}", param_hint=f"'{option}'")
    return parsed


@click.command()
@click.argument("task")
@click.option("--args", "args_json", default="[]", metavar="JSON", help="Positional arguments.")
@click.option("--kwargs", "kwargs_json", default="{}", metavar="JSON", help="Keyword arguments.")
@click.option("--queue", help="Queue to use (default: 'default').")
@click.option("--priority", type=click.Choice(["high", "normal", "low"]), help="Job priority.")
@click.option("--delay", type=click.FloatRange(min=0), metavar="SECONDS", help="Run no sooner.")
@click.option("--dedup-key", help="Skip the enqueue if a live job of the queue has this key.")
@click.option("--max-attempts", type=click.IntRange(min=1), help="Runs before dead letters.")
@click.option("--pending", is_flag=True, help="Hold the job until `conveyor` starts it.")
@click.option("--wait", is_flag=True, help="Wait for the job, show its progress, print result.")
@click.option("--timeout", type=click.FloatRange(min=0), metavar="SECONDS", help="With --wait.")
@pass_state
def enqueue(
    state: CliState,
    task: str,
    args_json: str,
    kwargs_json: str,
    queue: str | None,
    priority: str | None,
    delay: float | None,
    dedup_key: str | None,
    max_attempts: int | None,
    pending: bool,
    wait: bool,
    timeout: float | None,
) -> None:
    """Enqueue a job of TASK (a registered task name) and print its id.

    With --wait, show its progress on stderr and print its result as JSON on stdout; a job
    that ends failed or stopped exits 1.
    """
    if timeout is not None and not wait:
        raise click.UsageError("--timeout only applies with --wait")
    args = _parse_json(args_json, "--args", list)
    kwargs = _parse_json(kwargs_json, "--kwargs", dict)
    options: dict[str, Any] = {
        "queue": queue,
        "priority": priority,
        "delay_s": delay,
        "dedup_key": dedup_key,
        "max_attempts": max_attempts,
        "pending": pending,
    }
    run(_enqueue(state, task, args, kwargs, options, wait=wait, timeout_s=timeout))


async def _enqueue(
    state: CliState,
    task: str,
    args: list[Any],
    kwargs: dict[str, Any],
    options: dict[str, Any],
    *,
    wait: bool,
    timeout_s: float | None,
) -> None:
    async with connected_app(state) as app:
        handle: JobHandle[Any] = await app.enqueue(task, args=args, kwargs=kwargs, **options)
        click.echo(handle.id)
        if not wait:
            return
        job = await wait_with_progress(app, handle.id, timeout_s)
    if job.state is not JobState.COMPLETED:
        detail = f": {job.error}" if job.error else ""
        raise JobFailed(f"job {job.id} ended {job.state.value}{detail}")
    click.echo(json.dumps(job.result))


async def wait_with_progress(app: Conveyor, job_id: str, timeout_s: float | None) -> Job:
    """Wait for a job to finish, drawing a progress bar on stderr fed by the job's events.

    Progress events update the bar directly; a state event wakes the loop to re-read the job,
    which it also does every second so a missed event only delays the answer.
    """
    changed = asyncio.Event()
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    console = stderr_console()
    # transient: the bar disappears when done; off a terminal nothing is drawn at all.
    with Progress(
        *columns, console=console, transient=True, disable=not console.is_terminal
    ) as progress:
        bar = progress.add_task(f"{job_id[:8]} queued", total=100)

        async def follow() -> None:
            async for event in app.broker.subscribe(job_id=job_id):
                if event.kind is EventKind.PROGRESS:
                    _show(progress, bar, job_id, None, event.progress, event.description)
                else:
                    changed.set()

        follower = asyncio.create_task(follow(), name=f"conveyor-cli-follow-{job_id}")
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    job = await app.get_job(job_id)
                    if job is None:
                        raise JobNotFound(f"job {job_id} was deleted while waiting for it")
                    _show(progress, bar, job_id, job.state, job.progress, job.description)
                    if job.state.is_finished:
                        return job
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(REREAD_S):
                            await changed.wait()
                    changed.clear()
        except TimeoutError:
            raise JobTimeout(
                f"job {job_id} did not finish within {timeout_s} s; it may still be running "
                f"(see `conveyor jobs show {job_id}`)"
            ) from None
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await follower


def _show(
    progress: Progress,
    bar: TaskID,
    job_id: str,
    state: JobState | None,
    percent: int | None,
    description: str | None,
) -> None:
    """Update the bar; ``None`` fields keep their previous value."""
    fields: dict[str, Any] = {}
    if state is not None or description is not None:
        label = state.value if state is not None else "running"
        fields["description"] = f"{job_id[:8]} {label}" + (f" {description}" if description else "")
    if state is JobState.COMPLETED:
        percent = 100  # a task need not report its last step; done is done
    if percent is not None:
        fields["completed"] = percent
    progress.update(bar, **fields)
