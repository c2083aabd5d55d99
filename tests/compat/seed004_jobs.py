# ruff: noqa: E402, I001, W293
"""Job classes for tests/compat/test_seed004.py, imported by name in spawned process children.

Between the ``--- seed 004 Example N ---`` markers are the seed's Examples 2, 3 and 4 verbatim
except for their import lines (the test checks them against the seed document when present);
the lint and format exemptions above are for that region only. ``process_item``, which the seed's
Example 2 calls without defining, and the imports Example 4 relies on come first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any

from conveyor.compat.seed004 import JobBase

#: Seconds process_item takes, so that a test sees progress move.
ITEM_S = 0.05


def process_item(item: Any) -> Any:
    """What Example 2 does per item: a little work, then the item doubled."""
    time.sleep(ITEM_S)
    return item * 2


# fmt: off
# --- seed 004 Example 2 ---
from conveyor.compat.seed004 import QueueJobBase

class DataProcessingJob(QueueJobBase):
    def run(self):
        data = self.mcp_params.get("data", [])
        total = len(data)
        
        self.set_status("running")
        self.set_description(f"Processing {total} items...")
        
        results = []
        for i, item in enumerate(data):
            # Update progress
            progress = int((i + 1) / total * 100)
            self.set_progress(progress)
            self.set_description(f"Processing item {i + 1}/{total}")
            
            # Process item
            result = process_item(item)
            results.append(result)
        
        # Store result
        self.set_mcp_result({
            "processed": len(results),
            "results": results,
            "status": "completed"
        })
# --- seed 004 Example 3 ---
from conveyor.compat.seed004 import get_global_queue_manager
import uuid

async def process_data_async(data: list):
    queue_manager = await get_global_queue_manager()
    job_id = str(uuid.uuid4())
    
    await queue_manager.add_job(
        job_class=DataProcessingJob,
        job_id=job_id,
        params={"data": data}
    )
    
    await queue_manager.start_job(job_id)
    
    return job_id
# --- seed 004 Example 4 ---
async def wait_for_job_completion(job_id: str, timeout: int = 300):
    queue_manager = await get_global_queue_manager()
    start_time = time.time()
    
    while time.time() - start_time < timeout:
        status = await queue_manager.get_job_status(job_id)
        
        if status.status == "completed":
            return status.result
        elif status.status == "failed":
            raise Exception(f"Job failed: {status.error}")
        
        await asyncio.sleep(1)  # Poll every second
    
    raise TimeoutError(f"Job {job_id} did not complete within {timeout} seconds")
# --- end of seed 004 examples ---
# fmt: on


class FailingJob(JobBase):
    """Reports a failure through the seed's ``set_mcp_error`` (and returns normally)."""

    def run(self) -> None:
        self.set_progress(30)
        self.set_mcp_error(f"cannot process {self.params['path']}", status="failed")


class RaisingJob(JobBase):
    """Raises from ``run()``."""

    def run(self) -> None:
        raise ValueError(f"bad input {self.params['value']!r}")


class SleepingJob(JobBase):
    """Prints its pid, then sleeps (in short steps) for ``seconds``, unless stopped first."""

    def run(self) -> dict[str, Any]:
        print(f"pid {os.getpid()}")
        self.set_description("sleeping")
        deadline = time.monotonic() + float(self.params.get("seconds", 60))
        while time.monotonic() < deadline:
            time.sleep(0.02)
        return {"slept": True}


class TimedJob(JobBase):
    """Sleeps ``seconds`` and returns when it started and ended, and in which process."""

    def run(self) -> None:
        start = time.time()
        time.sleep(float(self.params.get("seconds", 0.0)))
        self.set_result({"start": start, "end": time.time(), "pid": os.getpid()})


class ChattyJob(JobBase):
    """Prints, writes to stderr, and logs through its own logger and a library's."""

    def run(self) -> str:
        print("first stdout line")
        print("an error line", file=sys.stderr)
        self.logger.info("a log record")
        print("second stdout line")
        self.logger.warning("a warning record")
        logging.getLogger("some.library").warning("a library record")
        return "done"


class LimitedJob(TimedJob):
    """A job of type ``limited`` (for per_job_type_limits)."""

    job_type = "limited"


class OtherJob(TimedJob):
    """A job of type ``other``."""

    job_type = "other"


class ImpatientJob(SleepingJob):
    """A sleeping job with a time limit of its own."""

    timeout_s = 0.3
