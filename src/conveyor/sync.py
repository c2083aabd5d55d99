"""The sync client: drives an app's async API from sync code through a private event-loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from conveyor.errors import ConfigurationError
from conveyor.job import Job, JobState

if TYPE_CHECKING:
    from conveyor.brokers.base import JobPage, LogPage
    from conveyor.client import Conveyor

T = TypeVar("T")


class SyncClient:
    """Blocking versions of the app's calls for scripts, Flask or Django.

    It is not a second implementation: it runs the same async client on an event loop in a
    daemon thread, with its own broker connection built from the app's URL (a broker's
    connections belong to one event loop). ``memory://`` brokers live in a single loop and
    cannot be shared this way.

    Args:
        app: the application whose tasks and broker URL to use.
        call_timeout_s: the longest any one call may take before TimeoutError.
    """

    def __init__(self, app: Conveyor, *, call_timeout_s: float = 60.0) -> None:
        if app.url.startswith("memory:"):
            raise ConfigurationError(
                "the sync client needs a broker it can share between event loops; memory:// "
                "lives in one loop: use sqlite:///PATH or redis://, or call the async API"
            )
        from conveyor.client import Conveyor

        self._app = Conveyor(app.url, default_queue=app.default_queue)
        self._app.registry = app.registry  # same tasks, for argument checks and defaults
        self.call_timeout_s = call_timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="conveyor-sync-client", daemon=True
        )
        self._thread.start()
        self._closed = False

    def _run(self, coro: Coroutine[Any, Any, T] | Awaitable[T]) -> T:
        if self._closed:
            raise ConfigurationError("this sync client is closed; make a new one")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise ConfigurationError("the sync client cannot be called from its own loop")

        async def wrap() -> T:
            return await coro

        future = asyncio.run_coroutine_threadsafe(wrap(), self._loop)
        try:
            return future.result(self.call_timeout_s)
        except TimeoutError:
            future.cancel()
            raise

    def call(self, fn: Callable[[Conveyor], Awaitable[T]]) -> T:
        """Run ``fn(app)`` on the client's loop, with the app it drives there, and wait for it.

        The way to use any async API of conveyor from sync code without a second implementation.
        """

        async def run() -> T:
            await self._app.connect()
            return await fn(self._app)

        return self._run(run())

    def enqueue(
        self,
        task: str,
        *,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> str:
        """Enqueue one job and return its id (the live job's id if deduplicated)."""
        handle: Any = self._run(self._app.enqueue(task, args=args, kwargs=kwargs, **options))
        return str(handle.id)

    def enqueue_many(self, calls: Sequence[tuple[str, Sequence[Any], dict[str, Any]]]) -> list[str]:
        """Enqueue ``(task, args, kwargs)`` triples in one broker call; returns ids."""
        requests = [self._app.request(t, args=a, kwargs=k) for t, a, k in calls]
        return [h.id for h in self._run(self._app.enqueue_many(requests))]

    def get_job(self, job_id: str) -> Job | None:
        """The job record, or None."""
        return self._run(self._app.get_job(job_id))

    def result(self, job_id: str, timeout_s: float | None = None) -> Any:
        """Wait for the job's result (JobFailed / JobTimeout as in the async API)."""
        timeout = None if timeout_s is None else timeout_s + 5
        saved, self.call_timeout_s = self.call_timeout_s, timeout or 10**9
        try:
            return self._run(self._app.handle(job_id).result(timeout_s))
        finally:
            self.call_timeout_s = saved

    def cancel(self, job_id: str) -> Job:
        """Cancel a job."""
        return self._run(self._app.cancel(job_id))

    def start(self, job_id: str) -> Job:
        """Start a pending job."""
        return self._run(self._app.start(job_id))

    def delete(self, job_id: str) -> None:
        """Delete a job."""
        self._run(self._app.delete(job_id))

    def logs(self, job_id: str) -> LogPage:
        """A job's captured log lines."""
        return self._run(self._app.logs(job_id))

    def list_jobs(self, **filters: Any) -> JobPage:
        """Jobs by queue, state and task."""
        return self._run(self._app.list_jobs(**filters))

    def counts(self, queue: str | None = None) -> dict[str, dict[JobState, int]]:
        """Jobs per state, per queue."""
        return self._run(self._app.counts(queue))

    def purge(self, queue: str) -> int:
        """Remove the pending, queued and scheduled jobs of ``queue``."""

        async def purge() -> int:
            await self._app.connect()
            return await self._app.broker.purge(queue)

        return self._run(purge())

    def close(self) -> None:
        """Close the broker connection and stop the loop thread (idempotent)."""
        if self._closed:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._app.close(), self._loop).result(10)
        except Exception:
            pass
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
