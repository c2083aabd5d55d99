"""A worker program for X4: runs jobs on the SQLite broker and reports which pickle-like modules
were imported, and by whom.

Phase 1 runs a Worker with the async and thread executors (the default install's worker) and
records ``sys.modules`` from inside each job and after. Phase 2 (``--process``) then runs a job in
the process executor, which is built on ``multiprocessing`` (whose ``spawn`` start-up pickles the
child's bootstrap arguments), and records the same in the parent and in the child.

Prints one JSON document on stdout.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import sys
from typing import Any

PICKLE_LIKE = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "shelve", "jsonpickle")

#: The modules that ran an ``import`` of a pickle-like module, in this process.
IMPORTERS: set[str] = set()
_import = builtins.__import__


def _recording_import(name: str, globals: Any = None, *args: Any, **kwargs: Any) -> Any:
    if name.split(".")[0] in PICKLE_LIKE:
        IMPORTERS.add((globals or {}).get("__name__", "?"))
    return _import(name, globals, *args, **kwargs)


def loaded() -> list[str]:
    """The pickle-like modules in ``sys.modules`` now."""
    return sorted(m for m in PICKLE_LIKE if m in sys.modules)


async def in_async(ctx: Any) -> list[str]:
    """Runs in the async executor."""
    return loaded()


def in_thread(ctx: Any) -> list[str]:
    """Runs in the thread executor."""
    return loaded()


def in_process() -> list[str]:
    """Runs in a process-executor child."""
    return loaded()


async def _run(url: str, with_process: bool) -> dict[str, Any]:
    from conveyor import Conveyor
    from conveyor.worker import Worker

    app = Conveyor(url)
    app.task(name="probe.async")(in_async)
    app.task(name="probe.thread", executor="thread")(in_thread)
    app.task(name="probe.process", executor="process")(in_process)
    report: dict[str, Any] = {}
    async with app:
        jobs = [await app.enqueue("probe.async"), await app.enqueue("probe.thread")]
        worker_options: dict[str, Any] = {"burst": True, "burst_wait_s": 0.2}
        await Worker(app, **worker_options, executors=["async", "thread"]).run()
        report["async_job"] = (await app.get_job(jobs[0].id)).result  # type: ignore[union-attr]
        report["thread_job"] = (await app.get_job(jobs[1].id)).result  # type: ignore[union-attr]
        report["after_worker"] = loaded()
        report["importers_before_process"] = sorted(IMPORTERS)
        if with_process:
            job = await app.enqueue("probe.process")
            await Worker(app, **worker_options, executors=["process"]).run()
            report["process_job"] = (await app.get_job(job.id)).result  # type: ignore[union-attr]
            report["parent_after_process"] = loaded()
            report["importers_after_process"] = sorted(IMPORTERS)
    return report


def main() -> None:
    """``python pickle_probe.py SQLITE_URL [--process]``."""
    builtins.__import__ = _recording_import
    report = asyncio.run(_run(sys.argv[1], "--process" in sys.argv))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
