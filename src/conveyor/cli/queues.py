"""``conveyor queues`` (job counts per state per queue) and ``conveyor purge`` (drop work)."""

from __future__ import annotations

import click
from rich.table import Table
from rich.text import Text

from conveyor.brokers.base import PURGEABLE_STATES
from conveyor.cli.common import (
    STATE_STYLES,
    CliState,
    connected_app,
    echo_json,
    json_option,
    parse_states,
    pass_state,
    run,
    stderr_console,
    stdout_console,
)
from conveyor.job import JobState, validate_queue_name


@click.command()
@json_option
@pass_state
def queues(state: CliState, as_json: bool) -> None:
    """Show how many jobs each queue has in each state."""

    async def fetch() -> dict[str, dict[JobState, int]]:
        async with connected_app(state) as app:
            return await app.counts()

    counts = run(fetch())
    if as_json:
        echo_json({queue: {s.value: n for s, n in row.items()} for queue, row in counts.items()})
        return
    if not counts:
        stderr_console().print("no queues yet: enqueue a job to create one")
        return
    table = Table(header_style="bold")
    table.add_column("queue")
    for job_state in JobState:
        table.add_column(Text(job_state.value, style=STATE_STYLES[job_state]), justify="right")
    table.add_column("total", justify="right")
    for queue, row in sorted(counts.items()):
        cells = [str(row.get(s, 0)) if row.get(s, 0) else Text("0", style="dim") for s in JobState]
        table.add_row(Text(queue), *cells, str(sum(row.values())))
    stdout_console().print(table)


@click.command()
@click.argument("queue")
@click.option(
    "--state",
    "states",
    multiple=True,
    help="States to delete (repeat or a,b); default: pending, queued, scheduled.",
)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_state
def purge(state: CliState, queue: str, states: tuple[str, ...], yes: bool) -> None:
    """Delete the jobs of QUEUE that are waiting (or in the given states). Never running ones."""
    validate_queue_name(queue)  # refuse a bad name before asking anything
    wanted = parse_states(states)
    if wanted is not None and JobState.RUNNING in wanted:
        raise click.BadParameter(
            "running jobs are never purged; stop them with `conveyor jobs cancel ID`",
            param_hint="'--state'",
        )
    shown = wanted if wanted is not None else sorted(PURGEABLE_STATES)
    if not yes:
        names = ", ".join(s.value for s in shown)
        click.confirm(f"Delete every {names} job of queue {queue!r}?", abort=True, err=True)

    async def act() -> int:
        async with connected_app(state) as app:
            return await app.broker.purge(queue, wanted)

    removed = run(act())
    click.echo(f"purged {removed} job{'s' if removed != 1 else ''} from {queue}")
