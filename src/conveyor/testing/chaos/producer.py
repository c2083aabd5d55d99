"""The chaos scenarios' producer program: enqueue ``chaos.sleep`` batches, recording each outcome.

    CONVEYOR_FAILPOINT=enqueue:after:2 python -m conveyor.testing.chaos.producer --batches 3

(with ``CONVEYOR_URL`` and ``CONVEYOR_CHAOS_LEDGER`` set as for the worker program).

Before each batch its ids are recorded as ``unknown`` (the outcome of a call the process may not
survive), after the broker answered as ``acked``: a producer killed at an enqueue failpoint
leaves exactly that batch unknown. Prints ``done`` after the last batch.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from conveyor.job import new_job_id
from conveyor.testing import failpoints
from conveyor.testing.chaos import tasks
from conveyor.testing.ledger import Producer


def main(argv: list[str] | None = None) -> None:
    """Enqueue ``--batches`` batches of ``--batch-size`` jobs sleeping ``--seconds``."""
    parser = argparse.ArgumentParser(prog="python -m conveyor.testing.chaos.producer")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.02)
    parser.add_argument("--queue", default=None, help="default: the task's queue")
    args = parser.parse_args(argv)
    failpoints.install_from_env(tasks.app.broker)
    producer = Producer(os.environ[tasks.LEDGER_ENV])

    async def run() -> None:
        async with tasks.app:
            for _ in range(args.batches):
                requests = [
                    tasks.app.request(
                        tasks.sleep, args=[args.seconds], job_id=new_job_id(), queue=args.queue
                    )
                    for _ in range(args.batch_size)
                ]
                for r in requests:
                    producer.unknown(r.job.id)
                handles = await tasks.app.enqueue_many(requests)
                producer.acked_many(h.id for h in handles)

    asyncio.run(run())
    producer.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
