"""``conveyor dead-letters``: list failed jobs with their errors, and re-drive them."""

from __future__ import annotations

import click

from conveyor.cli.common import (
    CliState,
    connected_app,
    echo_json,
    jobs_table,
    json_option,
    page_to_dict,
    pass_state,
    run,
    stderr_console,
    stdout_console,
)
from conveyor.job import JobState, validate_queue_name


@click.group("dead-letters")
def dead_letters() -> None:
    """Jobs that exhausted their attempts (state failed)."""


@dead_letters.command("list")
@click.option("--queue", help="Only this queue.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--cursor", help="Continue from the cursor a previous page printed.")
@json_option
@pass_state
def list_dead_letters(
    state: CliState, queue: str | None, limit: int, cursor: str | None, as_json: bool
) -> None:
    """List dead letters, newest first, with why they failed."""

    async def fetch() -> None:
        async with connected_app(state) as app:
            page = await app.list_jobs(
                queue=queue, states=[JobState.FAILED], limit=limit, cursor=cursor
            )
        if as_json:
            echo_json(page_to_dict(page))
            return
        if not page.jobs:
            stderr_console().print("no dead letters")
            return
        stdout_console().print(jobs_table(page.jobs, errors=True))
        if page.next_cursor:
            stderr_console().print(f"more: --cursor {page.next_cursor}", style="dim")

    run(fetch())


@dead_letters.command()
@click.argument("queue")
@click.argument("job_ids", nargs=-1, metavar="[IDS]...")
@pass_state
def redrive(state: CliState, queue: str, job_ids: tuple[str, ...]) -> None:
    """Put dead letters of QUEUE back to work (all of them, or only IDS).

    Attempts, error and traceback are reset. Given ids, stopped jobs are re-driven too.
    """
    validate_queue_name(queue)

    async def act() -> int:
        async with connected_app(state) as app:
            return await app.broker.redrive(queue, list(job_ids) or None)

    moved = run(act())
    click.echo(f"re-drove {moved} job{'s' if moved != 1 else ''} to {queue}")
    if job_ids and moved < len(job_ids):
        skipped = len(job_ids) - moved
        stderr_console().print(
            f"{skipped} id{'s were' if skipped != 1 else ' was'} not failed or stopped in {queue}",
            style="yellow",
        )
