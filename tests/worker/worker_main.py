"""Run one Worker over ``fault_tasks.app`` until a signal stops it (the fault tests' subject).

    CONVEYOR_URL=... CONVEYOR_TEST_LEDGER=... python -m worker_main --lease 2 --scan 0.5

Prints ``ready`` once consuming and ``exited <seconds>`` (time from the first signal to the end
of the shutdown) when done. Signals are the worker's own handlers (install_signals=True).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import fault_tasks

from conveyor.worker import Worker


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lease", type=float, default=10.0)
    parser.add_argument("--heartbeat", type=float, default=0.5)
    parser.add_argument("--scan", type=float, default=2.0)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()

    async def run() -> None:
        async with fault_tasks.app:
            worker = Worker(
                fault_tasks.app,
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
    print("exited", flush=True)
    sys.stderr.flush()
    # Threads a job abandoned (it ignored cancellation) must not keep the process alive.
    os._exit(0)


if __name__ == "__main__":
    main()
