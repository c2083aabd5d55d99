"""``conveyor worker MODULE[:APP]``: import the operator's task module, run a worker on its app."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import click

from conveyor.brokers import open_broker
from conveyor.cli.common import CliState, pass_state, split_csv
from conveyor.client import Conveyor
from conveyor.errors import ConfigurationError

if TYPE_CHECKING:
    from conveyor.worker import Worker

LOG_LEVELS = ("debug", "info", "warning", "error")


def load_app(spec: str) -> Conveyor:
    """Import ``MODULE[:ATTR]`` and return its Conveyor app (``ATTR`` defaults to ``app``).

    This is the one place conveyor imports a module by name, because the operator named it on
    the command line (job payloads never name code). ``ATTR`` may also be a function that takes
    no arguments and returns the app (a factory). The current directory is put on ``sys.path``
    first, as ``python -m`` would, so ``conveyor worker tasks`` finds ``./tasks.py``.
    """
    module_name, _, attr = spec.partition(":")
    attr = attr or "app"
    if not module_name or not all(part.isidentifier() for part in module_name.split(".")):
        raise ConfigurationError(
            f"invalid app {spec!r}; use MODULE[:APP], e.g. myproject.tasks:app"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a missing module named by the operator is a usage problem; a missing import
        # inside their module is their bug, and its traceback is what helps.
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise
        raise ConfigurationError(
            f"cannot import module {module_name!r} ({exc}); check the name and that it is on "
            "PYTHONPATH or in the current directory"
        ) from None
    try:
        found: Any = getattr(module, attr)
    except AttributeError:
        raise ConfigurationError(
            f"module {module_name!r} has no attribute {attr!r}; "
            f"name the app with {module_name}:NAME"
        ) from None
    if inspect.isfunction(found):  # a factory; a class or other callable is not called
        found = found()
    if not isinstance(found, Conveyor):
        raise ConfigurationError(
            f"{module_name}:{attr} is a {type(found).__name__}, not a Conveyor app "
            "(or a function returning one)"
        )
    return found


def _configure_logging(verbose: int, level: str | None) -> None:
    name = level or ("debug" if verbose else "info")
    logging.basicConfig(
        level=getattr(logging, name.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.command()
@click.argument("app_spec", metavar="MODULE[:APP]")
@click.option("--queues", help="Queues to serve, comma-separated (default: all the app's tasks').")
@click.option("--async-concurrency", type=click.IntRange(min=1), help="Coroutines at once.")
@click.option("--thread-concurrency", type=click.IntRange(min=1), help="Threads in the pool.")
@click.option("--process-concurrency", type=click.IntRange(min=1), help="Processes in the pool.")
@click.option(
    "--process-nice",
    type=click.IntRange(min=0, max=19),
    default=10,
    show_default=True,
    help="How much lower the process children's CPU priority is than the worker's (0: same).",
)
@click.option(
    "--grace-period",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="On shutdown, how long running jobs may finish before they are released.",
)
@click.option(
    "--lease",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="Lease length; a dead worker's jobs return to the queue after it.",
)
@click.option("--burst", is_flag=True, help="Exit once the queues are empty and nothing runs.")
@click.option(
    "--health-file",
    type=click.Path(dir_okay=False, writable=True),
    metavar="PATH",
    help="Write the worker's health as JSON to PATH every second (for liveness probes).",
)
@click.option("-v", "--verbose", count=True, help="Debug logging.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), help="Log level.")
@pass_state
def worker(
    state: CliState,
    app_spec: str,
    queues: str | None,
    async_concurrency: int | None,
    thread_concurrency: int | None,
    process_concurrency: int | None,
    process_nice: int,
    grace_period: float,
    lease: float,
    burst: bool,
    health_file: str | None,
    verbose: int,
    log_level: str | None,
) -> None:
    """Run a worker for the Conveyor app in MODULE (attribute APP, default `app`).

    The first SIGINT or SIGTERM shuts down gracefully (running jobs get --grace-period to
    finish, the rest are released without charging an attempt); a second one is immediate.

    With --health-file, a probe reads PATH: the worker is alive when the file is fresh (its
    ``updated_at``, epoch seconds, is at most a few seconds old) and says ``"healthy": true``.
    Health is progress-based: a fetch loop that died or is stuck makes it false within seconds.
    """
    _configure_logging(verbose, log_level)
    app = load_app(app_spec)
    if state.broker_from_command_line and state.broker_url != app.url:
        # --broker typed by the operator wins over the URL the module built its app with. The
        # broker is swapped on the module's own app (not a copy) so that tasks enqueuing
        # follow-up jobs through it reach the same broker; it is not connected yet, so this
        # is safe.
        app.broker = open_broker(state.broker_url)
        app.url = state.broker_url
    concurrency = {
        kind: n
        for kind, n in (
            ("async", async_concurrency),
            ("thread", thread_concurrency),
            ("process", process_concurrency),
        )
        if n is not None
    }
    from conveyor.worker import Worker  # the worker stack loads only for this command

    options: dict[str, Any] = {
        "queues": split_csv(queues),
        "lease_s": lease,
        # renew several times per lease, however short the operator made it
        "heartbeat_s": min(0.25, lease / 4),
        "grace_period_s": grace_period,
        "burst": burst,
        "install_signals": True,
        "process_nice": process_nice,
    }
    if concurrency:
        options["concurrency"] = concurrency
    runner = Worker(app, **options)
    _run_to_exit(_run(app, runner, health_file))


#: How long the command waits for tasks still pending after the worker stopped.
LEFTOVER_WAIT_S = 1.0


def _run_to_exit(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on a new loop; exit promptly even if a job ignored its cancellation.

    ``asyncio.run`` would cancel the leftover tasks and wait for them without a bound, so a job
    that swallows ``CancelledError`` (which the worker has already released or left to its lease)
    would keep the process alive forever (a thread job it gave up on is a daemon thread: no
    obstacle). The worker's own shutdown is bounded, so after it the command gives leftovers a
    moment and then leaves with ``os._exit`` once the logs and streams are flushed.
    """
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main)
    finally:
        leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.wait(leftovers, timeout=LEFTOVER_WAIT_S))
        stuck = [t for t in leftovers if not t.done()]
    if stuck:
        logging.getLogger(__name__).warning(
            "worker stopped; %d task(s) ignored cancellation: exiting anyway (their jobs were "
            "released, or are recovered when their lease expires)",
            len(stuck),
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


async def _run(app: Conveyor, runner: Worker, health_file: str | None = None) -> None:
    # The worker never closes the app's broker (the app owns it), so the command does.
    writer = None
    if health_file is not None:
        writer = asyncio.create_task(_write_health(runner, health_file), name="conveyor-health")
    try:
        await runner.run()
    finally:
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            _dump_health(runner, health_file)  # the last word: stopped, not healthy
        await app.close()


#: How often --health-file is rewritten.
HEALTH_PERIOD_S = 1.0


async def _write_health(runner: Worker, path: str) -> None:
    """Rewrite ``path`` every HEALTH_PERIOD_S (on the loop: a blocked loop leaves it stale)."""
    while True:
        _dump_health(runner, path)
        await asyncio.sleep(HEALTH_PERIOD_S)


def _dump_health(runner: Worker, path: str | None) -> None:
    if path is None:
        return
    report = {**runner.health(), "pid": os.getpid(), "updated_at": time.time()}
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as out:
            json.dump(report, out)
        os.replace(tmp, path)  # atomic: a probe never reads half a file
    except OSError as exc:
        logging.getLogger(__name__).warning("cannot write the health file %s: %s", path, exc)
