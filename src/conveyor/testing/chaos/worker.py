"""The chaos scenarios' worker program: one Worker over :mod:`.tasks`, stopped by signals.

    CONVEYOR_URL=... CONVEYOR_CHAOS_LEDGER=DIR python -m conveyor.testing.chaos.worker --lease 2

Prints ``ready`` once consuming. The worker installs its own SIGINT/SIGTERM handlers (first:
graceful, second: immediate); SIGUSR1 dumps every thread's stack to stderr, which is how a
driver gets a post-mortem of a process that overstays its exit budget before killing it.

By default it serves the queues of the registered tasks with the async and thread executors;
``--executors async,process`` (with ``--process N`` children) adds the process executor and its
queue. ``$CONVEYOR_FAILPOINT`` (see :mod:`conveyor.testing.failpoints`) arms a failpoint on the
app's broker: the worker then dies (or fails) at that broker step.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import signal
import sys

from conveyor.task import EXECUTOR_KINDS, ExecutorKind
from conveyor.testing import failpoints
from conveyor.testing.chaos import (
    blocking_tasks,  # noqa: F401  (registers the L1/L2/L4 tasks)
    poison_tasks,  # noqa: F401  (registers P1-P6 tasks)
    tasks,
)
from conveyor.worker import Worker


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run the worker until a signal stops it, then exit at once."""
    parser = argparse.ArgumentParser(prog="python -m conveyor.testing.chaos.worker")
    parser.add_argument("--lease", type=float, default=10.0)
    parser.add_argument("--heartbeat", type=float, default=0.5)
    parser.add_argument("--scan", type=float, default=2.0)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=100, help="async slots")
    parser.add_argument("--threads", type=int, default=8, help="thread executor slots")
    parser.add_argument("--process", type=int, default=2, help="process executor children")
    parser.add_argument("--executors", default="async,thread", help="comma-separated kinds")
    parser.add_argument("--queues", default="", help="comma-separated (default: the tasks' own)")
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    executors = [k for k in args.executors.split(",") if k]
    queues = [q for q in args.queues.split(",") if q] or sorted(
        # Only queues whose tasks this worker can run: a job of a task whose executor is not
        # started would go to dead letters (system_error) instead of waiting for a worker.
        {t.options.queue for t in tasks.app.registry if t.options.executor in executors}
    )
    failpoints.install_from_env(tasks.app.broker)

    async def run() -> None:
        async with tasks.app:
            worker = Worker(
                tasks.app,
                queues=queues,
                executors=executors,
                lease_s=args.lease,
                heartbeat_s=args.heartbeat,
                scan_interval_s=args.scan,
                grace_period_s=args.grace,
                concurrency={
                    "async": args.concurrency,
                    "thread": args.threads,
                    "process": args.process,
                },
                install_signals=True,
            )
            # With executors named, the Worker lets every queue need every one of them, and a
            # queue reserves only while each has a free slot: one busy process child would then
            # stall the async jobs. A queue's tasks tell which kinds it really needs.
            worker.queue_kinds = {q: _kinds_of(q, executors) for q in queues}
            await worker.start()
            print("ready", flush=True)
            await worker.wait_closed()

    # Not asyncio.run: on the way out it cancels every task left and waits for them all, so a
    # job that swallows CancelledError (S3) would keep the process alive after the worker
    # stopped and released it. The loop is dropped instead, and the process exits below.
    asyncio.new_event_loop().run_until_complete(run())
    sys.stderr.flush()
    # A thread a job abandoned must not keep the process alive past its shutdown.
    os._exit(0)


def _kinds_of(queue: str, executors: list[str]) -> list[ExecutorKind]:
    """The started executor kinds the tasks registered on ``queue`` use (all if none is)."""
    started = [k for k in EXECUTOR_KINDS if k in executors]
    kinds = {t.options.executor for t in tasks.app.registry if t.options.queue == queue}
    return [k for k in started if k in kinds] or started


if __name__ == "__main__":
    main()
