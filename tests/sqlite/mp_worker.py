"""A worker process for the multi-process tests: enqueue its share, then reserve and ack until done.

Run as ``python mp_worker.py URL NAME N_JOBS TOTAL OUT``; writes a JSON report to OUT. Any
exception (a "database is locked" included) ends the process with a traceback and exit code 1.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from conveyor.brokers import open_broker
from conveyor.job import Job, JobState


async def main(url: str, name: str, n_jobs: int, total: int, out: str) -> None:
    broker = open_broker(url)
    reserved: list[str] = []
    enqueued: list[str] = []
    async with broker:

        async def produce() -> None:
            for i in range(0, n_jobs, 25):
                jobs = [
                    Job(id=f"{name}-{k}", task="tests.mp", queue="mp", args=[k])
                    for k in range(i, min(i + 25, n_jobs))
                ]
                enqueued.extend(await broker.enqueue(jobs))
                await asyncio.sleep(0)

        async def consume() -> None:
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                jobs = await broker.reserve("mp", 7, lease_s=60, worker_id=name)
                if jobs:
                    reserved.extend(job.id for job in jobs)
                    # alternate the single and the batched ack paths
                    if len(reserved) % 2:
                        flags = await broker.ack_many([(job.lease, name) for job in jobs])
                        assert all(flags), flags
                    else:
                        for job in jobs:
                            await broker.ack(job.lease, name)
                    continue
                counts = (await broker.counts("mp"))["mp"]
                if counts[JobState.COMPLETED] >= total:
                    return
                await broker.wait_for_jobs(["mp"], 0.2)
            raise TimeoutError(f"{name}: jobs still not all completed after 40 s")

        await asyncio.gather(produce(), consume())
    with open(out, "w") as f:
        json.dump({"reserved": reserved, "enqueued": enqueued}, f)


if __name__ == "__main__":
    url, name, n_jobs, total, out = sys.argv[1:6]
    asyncio.run(main(url, name, int(n_jobs), int(total), out))
