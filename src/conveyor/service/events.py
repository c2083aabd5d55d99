"""Live job events over SSE (``GET /events``) and WebSocket (``WS /events/ws``).

One shared broker subscription feeds every client (:class:`EventHub`): the hub appends each event
to a fixed ring of the last ``event_history`` events, and each client keeps only a cursor into it
and its filters (queue, job id). Publishing is O(1) whatever the number of clients, the hub never
waits for a client, and a client costs no buffer memory of its own. A client that stays more than
``event_max_lag`` events behind for longer than ``event_lag_grace_s`` (a burst it catches up with
is fine), whose socket takes longer than ``event_send_timeout_s`` for one write, or that falls out
of the ring, is dropped with a reason: SSE ends with ``event: dropped``, WebSocket closes with
1008. It reconnects with its last event id and misses nothing the broker still retains.

Resuming (SSE ``Last-Event-ID`` or ``?after=``, WebSocket ``?after=``): a cursor still in the ring
replays from the ring. An older one opens a direct broker subscription for that client (at most
``max_direct_clients`` at once), which hands over to the ring as soon as it reaches an event the
ring holds. Event ids are the broker's own, so they stay valid across server restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Final

import msgspec
from fastapi import APIRouter, Header, Query, Request, WebSocket
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from conveyor.brokers.base import Broker, JobEvent
from conveyor.errors import BrokerError, ConveyorError, InvalidJobError
from conveyor.job import validate_queue_name

if TYPE_CHECKING:
    from conveyor.service.operations import Service, ServiceSettings

logger = logging.getLogger(__name__)

READ_BATCH: Final = 256  # events per write: coalescing keeps a burst to a few syscalls
YIELD_EVERY: Final = 64  # events the hub takes from the broker before letting others run
_encode = msgspec.json.Encoder().encode


class StreamClosed(Exception):
    """The stream ends for this client; ``dropped`` says whether it was too slow."""

    def __init__(self, reason: str, *, dropped: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.dropped = dropped


class EventHub:
    """One broker subscription fanned out to every stream client through a shared ring.

    Args:
        broker: where events come from.
        settings: ring size, lag limits and client caps.
    """

    def __init__(self, broker: Broker, settings: ServiceSettings) -> None:
        self.broker = broker
        self.settings = settings
        self._cap = settings.event_history
        self._ring: list[JobEvent | None] = [None] * self._cap
        self._index: dict[str, int] = {}  # event id -> sequence number, for events in the ring
        self.head = 0  # sequence number of the newest event (the first is 1)
        self.last_id: str | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._wake_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.running = False
        self.error: str | None = None
        self.clients = 0
        self.direct_clients = 0
        self.dropped_clients = 0

    # -- the shared subscription -----------------------------------------------------------------

    async def run(self, connect: Callable[[], Awaitable[None]] | None = None) -> None:
        """Follow the broker's events until :meth:`close`; survives outages (resumes by id).

        Args:
            connect: awaited before each (re)subscription, e.g. the app's ``connect``.
        """
        self._loop = asyncio.get_running_loop()
        backoff_s = 0.1
        try:
            while not self.closed:
                try:
                    if connect is not None:
                        await connect()
                    await self._follow()
                    break  # the stream ends only when the broker closes
                except BrokerError as exc:
                    if self.error is None:
                        logger.warning("events: broker subscription failed, retrying: %s", exc)
                    self.error = str(exc)
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(2.0, backoff_s * 2)
        except Exception as exc:
            # A bug, not an outage: say so loudly, end the streams, and let /health report it.
            logger.exception("events: the shared subscription died")
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.close()

    async def _follow(self) -> None:
        stream = self.broker.subscribe(after=self.last_id)
        self.running = True
        try:
            async for event in stream:
                self._publish(event)
                if self.error is not None:
                    logger.info("events: broker subscription restored")
                    self.error = None
                if self.head % YIELD_EVERY == 0:
                    # A broker read can hand over hundreds of events without awaiting; decoding
                    # them in one go would stall every request for milliseconds.
                    await asyncio.sleep(0)
        finally:
            self.running = False
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    def _publish(self, event: JobEvent) -> None:
        self.head += 1
        slot = self.head % self._cap
        evicted = self._ring[slot]
        if evicted is not None:
            self._index.pop(evicted.id, None)
        self._ring[slot] = event
        self._index[event.id] = self.head
        self.last_id = event.id
        if not self._wake_pending:
            # One wake-up per loop turn, however many events a broker read delivered.
            self._wake_pending = True
            asyncio.get_running_loop().call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_pending = False
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        """End every client's stream (server shutdown, or the broker closed)."""
        self.closed = True
        self._wake()

    def close_threadsafe(self) -> None:
        """:meth:`close` from a signal handler or another thread (scheduled on the hub's loop)."""
        if self._loop is None:
            self.closed = True
        else:
            self._loop.call_soon_threadsafe(self.close)

    async def wait(self, timeout_s: float) -> None:
        """Wait until new events are published (or the hub closes), at most ``timeout_s``."""
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                # shield: a client giving up must not cancel the future every client shares
                await asyncio.shield(self._waiter)

    def read(self, after: int, limit: int) -> list[JobEvent]:
        """Events with sequence numbers in (after, after + limit], oldest first."""
        end = min(self.head, after + limit)
        ring, cap = self._ring, self._cap
        return [e for seq in range(after + 1, end + 1) if (e := ring[seq % cap]) is not None]

    @property
    def oldest(self) -> int:
        """Sequence number of the oldest event still in the ring."""
        return max(1, self.head - self._cap + 1)

    def seq_of(self, event_id: str) -> int | None:
        """The ring position of an event id, if the ring still holds it."""
        return self._index.get(event_id)

    # -- clients ---------------------------------------------------------------------------------

    def attach(self, *, queue: str | None, job_id: str | None, after: str | None) -> ClientStream:
        """A new client's stream, replaying after ``after`` if given.

        Raises HTTPException (503) when the client limit is reached, and InvalidJobError for a
        bad queue name or cursor (before anything is sent, so the client gets a 422).
        """
        if queue is not None:
            validate_queue_name(queue)
        if self.clients >= self.settings.max_event_clients:
            raise _busy(f"the server has {self.clients} event clients, its limit")
        direct: AsyncIterator[JobEvent] | None = None
        cursor = self.head
        if after is not None:
            seq = self.seq_of(after)
            if seq is not None:
                cursor = seq
            else:
                if self.direct_clients >= self.settings.max_direct_clients:
                    raise _busy("too many clients are replaying old events from the broker")
                # Validates the cursor now (InvalidJobError -> 422), before any byte is sent.
                direct = self.broker.subscribe(queue=queue, job_id=job_id, after=after)
        return ClientStream(self, queue=queue, job_id=job_id, cursor=cursor, direct=direct)


def _busy(reason: str) -> HTTPException:
    return HTTPException(503, f"{reason}; retry in a few seconds", headers={"Retry-After": "5"})


class ClientStream:
    """One client's cursor and filters; :meth:`next_batch` yields what it should be sent next."""

    def __init__(
        self,
        hub: EventHub,
        *,
        queue: str | None,
        job_id: str | None,
        cursor: int,
        direct: AsyncIterator[JobEvent] | None,
    ) -> None:
        self.hub = hub
        self.queue = queue
        self.job_id = job_id
        self.cursor = cursor
        self._over_since: float | None = None
        # The direct queue carries events, then the ring position to continue from (an int),
        # or the StreamClosed that ends the client's stream.
        self._direct: asyncio.Queue[JobEvent | int | StreamClosed] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._closed = False
        hub.clients += 1
        if direct is not None:
            hub.direct_clients += 1
            settings = hub.settings
            self._direct = asyncio.Queue(maxsize=settings.event_max_lag)
            self._pump = asyncio.create_task(self._follow(direct), name="conveyor-events-direct")

    def _matches(self, event: JobEvent) -> bool:
        return (self.queue is None or event.queue == self.queue) and (
            self.job_id is None or event.job_id == self.job_id
        )

    async def next_batch(self, timeout_s: float) -> list[JobEvent]:
        """The next events for this client, or [] after ``timeout_s`` of silence (a heartbeat).

        Raises :class:`StreamClosed` when the client was dropped or the server is stopping.
        """
        if self._direct is not None:
            return await self._next_direct(timeout_s)
        hub = self.hub
        deadline = time.monotonic() + timeout_s
        while True:
            if hub.closed:
                raise StreamClosed(hub.error or "the server is shutting down", dropped=False)
            if self.cursor < hub.head:
                self._check_lag()
                events = hub.read(self.cursor, READ_BATCH)
                self.cursor = min(hub.head, self.cursor + READ_BATCH)
                matched = [e for e in events if self._matches(e)]
                if matched:
                    return matched
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            await hub.wait(remaining)

    def _check_lag(self) -> None:
        hub, settings = self.hub, self.hub.settings
        if self.cursor < hub.oldest - 1:
            self._drop(f"fell more than {settings.event_history} events behind")
        if hub.head - self.cursor <= settings.event_max_lag:
            self._over_since = None
            return
        now = time.monotonic()
        if self._over_since is None:
            self._over_since = now
        elif now - self._over_since > settings.event_lag_grace_s:
            self._drop(
                f"more than {settings.event_max_lag} events behind for over "
                f"{settings.event_lag_grace_s:g} s"
            )

    def _drop(self, why: str) -> None:
        self.hub.dropped_clients += 1
        raise StreamClosed(f"slow consumer: {why}; reconnect with the last event id", dropped=True)

    async def _follow(self, source: AsyncIterator[JobEvent]) -> None:
        """Pump a direct broker subscription into the bounded queue until it reaches the ring."""
        assert self._direct is not None
        try:
            async for event in source:
                await self._direct.put(event)  # blocks when the client is slow: nothing piles up
                seq = self.hub.seq_of(event.id)
                # Hand over only near the ring's head: joining at its tail would be evicted at once.
                if seq is not None and self.hub.head - seq <= self.hub.settings.event_max_lag:
                    await self._direct.put(seq)  # caught up: continue from the shared ring
                    return
            await self._direct.put(StreamClosed("the broker closed", dropped=False))
        except ConveyorError as exc:
            await self._direct.put(StreamClosed(f"event replay failed: {exc}", dropped=False))
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _next_direct(self, timeout_s: float) -> list[JobEvent]:
        assert self._direct is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if self.hub.closed:
                raise StreamClosed("the server is shutting down", dropped=False)
            try:
                # In slices, so a server shutdown is noticed within half a second.
                async with asyncio.timeout(min(0.5, deadline - time.monotonic())):
                    item = await self._direct.get()
                break
            except TimeoutError:
                if time.monotonic() >= deadline:
                    return []
        batch: list[JobEvent] = []
        while True:
            if isinstance(item, StreamClosed):
                raise item
            if isinstance(item, int):
                self._leave_direct(item)
                return batch
            if self._matches(item):
                batch.append(item)
            if len(batch) >= READ_BATCH or self._direct.empty():
                return batch
            item = self._direct.get_nowait()

    def _leave_direct(self, seq: int) -> None:
        self.cursor = seq
        self._direct = None
        self.hub.direct_clients -= 1

    def close(self) -> None:
        """Detach from the hub (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.hub.clients -= 1
        if self._direct is not None:
            self.hub.direct_clients -= 1
        if self._pump is not None:
            self._pump.cancel()


# -- transports ------------------------------------------------------------------------------------


def _sse(event: JobEvent) -> bytes:
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (
        event.id.encode(),
        event.kind.encode(),
        _encode(event),
    )


def _sse_final(kind: str, reason: str) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), _encode({"reason": reason}))


class EventStreamResponse(Response):
    """A response streaming one client's events as ``text/event-stream``.

    Not starlette's StreamingResponse: each write is bounded by the send timeout (a client that
    stops reading is dropped instead of pinning the task), and a disconnect ends the stream at
    once.
    """

    media_type = "text/event-stream"

    def __init__(self, stream: ClientStream, settings: ServiceSettings) -> None:
        super().__init__(media_type=self.media_type)
        self.stream = stream
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream until the client disconnects, is dropped, or the server stops."""
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),  # proxies must not hold events back
        ]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            writer = asyncio.create_task(self._write(send))
            watcher = asyncio.create_task(_until_disconnect(receive, "http.disconnect"))
            await _first_of(writer, watcher)
        finally:
            self.stream.close()

    async def _write(self, send: Send) -> None:
        async def body(chunk: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": more})

        async def batch(events: list[JobEvent]) -> None:
            await body(b"".join(map(_sse, events)) if events else b": keep-alive\n\n")

        # The reconnection delay for EventSource, and a first byte so clients see the stream open.
        await body(b"retry: 2000\n: connected\n\n")
        closed = await _relay(self.stream, self.settings, batch)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                kind = "dropped" if closed.dropped else "end"
                await body(_sse_final(kind, closed.reason), more=False)


async def _relay(
    stream: ClientStream,
    settings: ServiceSettings,
    send_batch: Callable[[list[JobEvent]], Awaitable[None]],
) -> StreamClosed:
    """Send the client's batches until its stream ends; why it ended.

    An empty batch is a heartbeat. Each write is bounded by the send timeout.
    """
    try:
        while True:
            batch = await stream.next_batch(settings.event_heartbeat_s)
            async with asyncio.timeout(settings.event_send_timeout_s):
                await send_batch(batch)
    except StreamClosed as closed:
        return closed
    except TimeoutError:
        stream.hub.dropped_clients += 1
        return StreamClosed("slow consumer: a write timed out", dropped=True)


def _close_reason(reason: str) -> str:
    """A WebSocket close reason fits in 123 bytes of UTF-8."""
    return reason.encode()[:120].decode(errors="ignore")


async def _until_disconnect(receive: Receive, kind: str) -> None:
    while (await receive())["type"] != kind:
        pass


async def _first_of(main: asyncio.Task[None], watcher: asyncio.Task[None]) -> None:
    """Run until either task ends; cancel the other; re-raise what ``main`` raised."""
    try:
        await asyncio.wait({main, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (main, watcher):
            task.cancel()
        await asyncio.gather(main, watcher, return_exceptions=True)
    error = main.exception() if main.done() and not main.cancelled() else None
    if error is not None:
        raise error


async def _serve_websocket(
    websocket: WebSocket, stream: ClientStream, settings: ServiceSettings
) -> None:
    async def batch(events: list[JobEvent]) -> None:
        if not events:
            await websocket.send_text('{"kind":"heartbeat"}')
        for event in events:
            await websocket.send_text(_encode(event).decode())

    async def write() -> None:
        closed = await _relay(stream, settings, batch)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await websocket.close(
                    1008 if closed.dropped else 1001, _close_reason(closed.reason)
                )

    watcher = asyncio.create_task(_until_disconnect(websocket.receive, "websocket.disconnect"))
    await _first_of(asyncio.create_task(write()), watcher)


# -- routes ----------------------------------------------------------------------------------------

router = APIRouter(tags=["events"])

QueueFilter = Annotated[str | None, Query(max_length=128, description="Only this queue's events.")]
JobFilter = Annotated[str | None, Query(max_length=128, description="Only this job's events.")]
AfterCursor = Annotated[
    str | None, Query(max_length=256, description="Resume after this event id.")
]


_JSON_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}


@router.get(
    "/events",
    summary="Live job events (Server-Sent Events)",
    response_class=EventStreamResponse,
    status_code=200,
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
        # Explicit content: with the SSE response class, `model=` would be documented as
        # text/event-stream, but these answers are JSON.
        422: {"content": _JSON_ERROR, "description": "Invalid filter or cursor."},
        503: {"content": _JSON_ERROR, "description": "Too many event clients; retry later."},
    },
)
async def events_sse(
    request: Request,
    queue: QueueFilter = None,
    job_id: JobFilter = None,
    after: AfterCursor = None,
    last_event_id: Annotated[str | None, Header(max_length=256)] = None,
) -> EventStreamResponse:
    """State changes, progress and log lines as SSE; ``id:`` is the resume cursor.

    A reconnecting EventSource sends ``Last-Event-ID`` (it wins over ``?after=``). The stream
    ends with ``event: dropped`` (too slow) or ``event: end`` (server stopping), each with a
    ``reason``; reconnect with the last id to continue.
    """
    service: Service = request.app.state.service
    stream = service.hub.attach(queue=queue, job_id=job_id, after=last_event_id or after)
    return EventStreamResponse(stream, service.settings)


@router.websocket("/events/ws")
async def events_ws(
    websocket: WebSocket,
    queue: QueueFilter = None,
    job_id: JobFilter = None,
    after: AfterCursor = None,
) -> None:
    """Job events as JSON text messages (``{"kind": "heartbeat"}`` when idle).

    Closes with 1008 (too slow, or a bad filter), 1013 (too many clients) or 1001 (server
    stopping), each with a reason; reconnect with ``?after=`` the last event id.
    """
    service: Service = websocket.app.state.service
    offered = websocket.scope.get("subprotocols") or []
    subprotocol = "bearer" if "bearer" in offered else None
    try:
        stream = service.hub.attach(queue=queue, job_id=job_id, after=after)
    except (InvalidJobError, HTTPException) as exc:
        await websocket.accept(subprotocol=subprotocol)
        busy = isinstance(exc, HTTPException)
        reason = str(exc.detail) if isinstance(exc, HTTPException) else exc.message
        await websocket.close(1013 if busy else 1008, _close_reason(reason))
        return
    try:
        await websocket.accept(subprotocol=subprotocol)
        await _serve_websocket(websocket, stream, service.settings)
    finally:
        stream.close()
