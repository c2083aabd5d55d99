"""The worker's job Reporter: buffers progress and log lines and writes them to the broker.

Jobs report from the event loop, from worker threads, or (through the process executor's pipe)
from children, and must never block on the broker. So reports only touch an in-memory buffer
under a lock; a flusher task on the loop writes them every ``flush_interval_s``: progress is
coalesced to the latest value per job (a loop reporting 10,000 times a second costs a handful of
``set_progress`` calls), and log lines are batched into one ``append_log`` per job.

Before a job's outcome is stored the runner flushes that job's buffer, so its last lines and
progress are recorded while its lease is still valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Final

from conveyor.brokers.base import Broker
from conveyor.errors import BrokerReadOnly, BrokerUnavailable, JobNotFound, LeaseLost
from conveyor.job import Job, Lease

logger = logging.getLogger(__name__)

DEFAULT_FLUSH_INTERVAL_S: Final = 0.2
#: Lines kept per job while the broker cannot take them; older ones are dropped first (and
#: counted: the broker adds them to the job's dropped-lines count).
MAX_BUFFERED_LINES: Final = 1000
#: Longest log line stored; the rest of a longer one is cut (one print must not store megabytes).
MAX_LINE_CHARS: Final = 16 * 1024


class _Progress:
    __slots__ = ("description", "lease", "progress")

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.progress: int | None = None
        self.description: str | None = None


class _Lines:
    __slots__ = ("dropped", "lease", "lines")

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.lines: list[str] = []
        self.dropped = 0  # older lines this buffer let go: the broker counts them as dropped


class BrokerReporter:
    """Buffers progress and log lines and writes them to the broker in the background.

    Thread-safe and non-blocking on the reporting side. Create it on the worker's loop.

    Args:
        broker: where progress and lines are written.
        flush_interval_s: how long reports are coalesced before a write.
        worker_id: for log lines.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        worker_id: str = "",
    ) -> None:
        self._broker = broker
        self.flush_interval_s = flush_interval_s
        self.worker_id = worker_id
        self._lock = threading.Lock()
        self._progress: dict[str, _Progress] = {}
        self._lines: dict[str, _Lines] = {}
        self._dirty = False
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.dropped_lines = 0

    # -- the Reporter protocol (any thread) -------------------------------------------------------

    def report_progress(self, job: Job, progress: int | None, description: str | None) -> None:
        """Record progress and/or description for ``job`` (the latest value wins)."""
        with self._lock:
            entry = self._progress.get(job.id)
            if entry is None:
                entry = self._progress[job.id] = _Progress(job.lease)
            if progress is not None:
                entry.progress = progress
            if description is not None:
                entry.description = description
            signal = not self._dirty
            self._dirty = True
        if signal:
            self._signal()

    def report_log(self, job: Job, line: str) -> None:
        """Record one log line for ``job`` (a line over ``MAX_LINE_CHARS`` is cut)."""
        if len(line) > MAX_LINE_CHARS:
            line = f"{line[:MAX_LINE_CHARS]} [... {len(line) - MAX_LINE_CHARS} more characters cut]"
        with self._lock:
            entry = self._lines.get(job.id)
            if entry is None:
                entry = self._lines[job.id] = _Lines(job.lease)
            entry.lines.append(line)
            if len(entry.lines) > MAX_BUFFERED_LINES:
                del entry.lines[0]
                entry.dropped += 1
                self.dropped_lines += 1
            signal = not self._dirty
            self._dirty = True
        if signal:
            self._signal()

    def _signal(self) -> None:
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing will flush
                self._loop.call_soon_threadsafe(self._wake.set)

    # -- writing (on the loop) --------------------------------------------------------------------

    def has_pending(self, job_id: str) -> bool:
        """Whether ``job_id`` has buffered progress or lines."""
        return job_id in self._progress or job_id in self._lines

    async def run(self) -> None:
        """Flush buffered reports every ``flush_interval_s`` while any arrive (until cancelled)."""
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.flush_interval_s)  # coalesce what arrives meanwhile
            self._wake.clear()
            await self.flush()

    async def flush(self, job_id: str | None = None) -> None:
        """Write what is buffered (for one job, or all); lines that cannot be written are kept."""
        with self._lock:
            if job_id is None:
                progress = list(self._progress.values())
                lines = list(self._lines.items())
                self._progress.clear()
                self._lines.clear()
                self._dirty = False
            else:
                one = self._progress.pop(job_id, None)
                progress = [one] if one is not None else []
                batch = self._lines.pop(job_id, None)
                lines = [(job_id, batch)] if batch is not None else []
        # Lines first: they are kept even from a just-cancelled job, progress needs the lease.
        for jid, entry in lines:
            await self._write_lines(jid, entry)
        for item in progress:
            await self._write_progress(item)

    async def _write_lines(self, job_id: str, entry: _Lines) -> None:
        try:
            await self._broker.append_log(entry.lease, entry.lines, dropped=entry.dropped)
        except JobNotFound:
            pass  # deleted: nothing to attach the lines to
        except (BrokerUnavailable, BrokerReadOnly):
            self._requeue_lines(job_id, entry)
        except Exception:
            logger.exception(
                "worker %s: could not store %d log line(s) of job %s",
                self.worker_id,
                len(entry.lines),
                job_id,
                extra={"action": "append_log", "job_id": job_id, "queue": entry.lease.queue},
            )

    async def _write_progress(self, item: _Progress) -> None:
        try:
            await self._broker.set_progress(item.lease, item.progress, item.description)
        except (LeaseLost, JobNotFound, BrokerUnavailable, BrokerReadOnly):
            pass  # progress is a hint: a stale or unwritable one is superseded by the outcome
        except Exception:
            logger.exception(
                "worker %s: could not store progress of job %s",
                self.worker_id,
                item.lease.job_id,
                extra={
                    "action": "set_progress",
                    "job_id": item.lease.job_id,
                    "queue": item.lease.queue,
                },
            )

    def _requeue_lines(self, job_id: str, entry: _Lines) -> None:
        """Put unwritten lines back in front of newer ones, within the per-job cap."""
        with self._lock:
            newer = self._lines.get(job_id)
            merged = entry.lines + (newer.lines if newer is not None else [])
            overflow = len(merged) - MAX_BUFFERED_LINES
            if overflow > 0:
                del merged[:overflow]
                self.dropped_lines += overflow
            entry.dropped += overflow + (newer.dropped if newer is not None else 0)
            entry.lines = merged
            self._lines[job_id] = entry
            signal = not self._dirty
            self._dirty = True
        if signal:
            self._signal()


__all__ = ["BrokerReporter"]
