"""The chaos scenarios' worker program: one Worker over :mod:`.tasks`, stopped by signals.

    CONVEYOR_URL=... CONVEYOR_CHAOS_LEDGER=DIR python -m conveyor.testing.chaos.worker --lease 2

Prints ``ready`` once consuming. The worker installs its own SIGINT/SIGTERM handlers (first:
graceful, second: immediate); SIGUSR1 dumps every thread's stack to stderr, which is how a
driver gets a post-mortem of a process that overstays its exit budget before killing it.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import signal
import sys

from conveyor.testing.chaos import tasks
from conveyor.worker import Worker


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run the worker until a signal stops it, then exit at once."""
    parser = argparse.ArgumentParser(prog="python -m conveyor.testing.chaos.worker")
    parser.add_argument("--lease", type=float, default=10.0)
    parser.add_argument("--heartbeat", type=float, default=0.5)
    parser.add_argument("--scan", type=float, default=2.0)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    async def run() -> None:
        async with tasks.app:
            worker = Worker(
                tasks.app,
                lease_s=args.lease,
                heartbeat_s=args.heartbeat,
                scan_interval_s=args.scan,
                grace_period_s=args.grace,
                concurrency={"async": args.concurrency},
                install_signals=True,
            )
            await worker.start()
            print("ready", flush=True)
            await worker.wait_closed()

    asyncio.run(run())
    sys.stderr.flush()
    # A thread a job abandoned must not keep the process alive past its shutdown.
    os._exit(0)


if __name__ == "__main__":
    main()
