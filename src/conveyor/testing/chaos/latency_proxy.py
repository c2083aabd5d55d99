"""A loopback TCP proxy that adds network latency with jitter, for the B6 scenario.

:class:`~conveyor.testing.faults.FaultProxy`'s ``DELAY`` mode sleeps before forwarding each chunk,
so a link carries at most one chunk per delay: with 200 ms that is 5 replies a second, a
bandwidth cap a real slow link does not have. Here every chunk is due ``delay`` after it
arrived (drawn from ``mean +/- spread`` per chunk, never before the chunk ahead of it, so order
is kept) and chunks in flight overlap, as on a long-haul link::

    with LatencyProxy.threaded(("127.0.0.1", redis.port)) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        proxy.set_latency(200, 100)  # ms each way; set_latency(0, 0) for none
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Iterator

from conveyor.testing.redis_server import free_port

_CHUNK = 65536


class LatencyProxy:
    """Forwards TCP connections to ``target`` with a per-direction latency (see the module doc)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.mean_s = 0.0
        self.spread_s = 0.0

    def set_latency(self, mean_ms: float, spread_ms: float = 0.0) -> None:
        """Latency of chunks arriving from now on (thread-safe: two floats)."""
        self.mean_s, self.spread_s = mean_ms / 1000, spread_ms / 1000

    def _delay(self) -> float:
        if self.mean_s <= 0:
            return 0.0
        return max(0.0, random.uniform(self.mean_s - self.spread_s, self.mean_s + self.spread_s))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
            )
        finally:
            writer.transport.abort()
            up_writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(send())
        last_due = 0.0
        try:
            with contextlib.suppress(OSError):
                while data := await reader.read(_CHUNK):
                    last_due = max(last_due, loop.time() + self._delay())
                    queue.put_nowait((last_due, data))
        finally:
            queue.put_nowait((0.0, b""))
            with contextlib.suppress(OSError):
                await sender
            # The far side ended: end this direction too (a proxy must not keep half a link).
            writer.transport.abort()

    @classmethod
    @contextlib.contextmanager
    def threaded(cls, target: tuple[str, int]) -> Iterator[LatencyProxy]:
        """Run a proxy on its own loop in a daemon thread for the ``with`` block."""
        proxy = cls(target)
        loop = asyncio.new_event_loop()
        started = threading.Event()
        server: list[asyncio.Server] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            server.append(
                loop.run_until_complete(
                    asyncio.start_server(proxy._accept, "127.0.0.1", proxy.port)
                )
            )
            started.set()
            loop.run_forever()
            server[0].close()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        thread = threading.Thread(target=run, name="conveyor-latency-proxy", daemon=True)
        thread.start()
        if not started.wait(10.0):
            raise RuntimeError("the latency proxy did not start")
        try:
            yield proxy
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5.0)


__all__ = ["LatencyProxy"]
