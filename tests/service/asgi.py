"""Streaming ASGI drivers for tests: httpx's ASGITransport buffers whole responses, so SSE and
WebSocket streams are driven here directly, in the test's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

from starlette.types import ASGIApp, Message


def _scope(
    kind: str, path: str, query: dict[str, Any] | None, headers: dict[str, str]
) -> dict[str, Any]:
    return {
        "type": kind,
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http" if kind == "http" else "ws",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": urlencode(query or {}, doseq=True).encode(),
        "headers": [(b"host", b"testserver")]
        + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


@dataclass
class SSEEvent:
    event: str
    data: dict[str, Any]
    id: str | None = None


@dataclass
class SSEStream:
    """One ``GET /events`` (or any streaming GET) driven over ASGI; parse events as they come.

    ``send_delay_s`` makes each body write slow (a client that reads slowly).
    """

    app: ASGIApp
    path: str = "/events"
    query: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    send_delay_s: float = 0.0
    status: int | None = None
    body: bytes = b""
    events: asyncio.Queue[SSEEvent | None] = field(default_factory=asyncio.Queue)
    comments: list[str] = field(default_factory=list)

    async def __aenter__(self) -> SSEStream:
        self._started = asyncio.Event()
        self._disconnect = asyncio.Event()
        self._buffer = b""
        self._sent_request = False
        scope = _scope("http", self.path, self.query, self.headers)
        self._task = asyncio.create_task(self.app(scope, self._receive, self._send))
        done, _ = await asyncio.wait(
            {self._task, asyncio.create_task(self._started.wait())},
            timeout=5,
            return_when=asyncio.FIRST_COMPLETED,
        )
        assert done, "no response within 5 s"
        if self._task in done:
            self._task.result()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._disconnect.set()
        async with asyncio.timeout(5):
            await self._task

    async def _receive(self) -> Message:
        if not self._sent_request:
            self._sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._disconnect.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self._started.set()
            return
        chunk = message.get("body", b"")
        if self.send_delay_s:
            await asyncio.sleep(self.send_delay_s)
        self.body += chunk
        self._buffer += chunk
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            self._parse(block.decode())
        if not message.get("more_body", False):
            self.events.put_nowait(None)

    def _parse(self, block: str) -> None:
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        if "data" in fields:
            self.events.put_nowait(
                SSEEvent(
                    fields.get("event", "message"), json.loads(fields["data"]), fields.get("id")
                )
            )

    async def next(self, timeout_s: float = 5.0) -> SSEEvent | None:
        """The next event, or None once the stream has ended."""
        async with asyncio.timeout(timeout_s):
            return await self.events.get()


@dataclass
class WSSession:
    """One WebSocket session driven over ASGI (``send_delay_s``: each message is slow to go)."""

    app: ASGIApp
    path: str = "/events/ws"
    query: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    subprotocols: list[str] = field(default_factory=list)
    denial_extension: bool = True
    send_delay_s: float = 0.0
    accepted: bool = False
    subprotocol: str | None = None
    close_code: int | None = None
    close_reason: str = ""
    denied_status: int | None = None
    denied_body: bytes = b""
    messages: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)

    async def __aenter__(self) -> WSSession:
        self._ready = asyncio.Event()
        self._disconnect = asyncio.Event()
        self._connected = False
        scope = _scope("websocket", self.path, self.query, self.headers)
        scope["subprotocols"] = self.subprotocols
        if self.denial_extension:
            scope["extensions"] = {"websocket.http.response": {}}
        self._task = asyncio.create_task(self.app(scope, self._receive, self._send))
        waiter = asyncio.create_task(self._ready.wait())
        await asyncio.wait({self._task, waiter}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._disconnect.set()
        async with asyncio.timeout(5):
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _receive(self) -> Message:
        if not self._connected:
            self._connected = True
            return {"type": "websocket.connect"}
        await self._disconnect.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            self.accepted = True
            self.subprotocol = message.get("subprotocol")
        elif kind == "websocket.send":
            if self.send_delay_s:
                await asyncio.sleep(self.send_delay_s)  # a peer that reads slowly
            self.messages.put_nowait(json.loads(message.get("text") or message["bytes"]))
        elif kind == "websocket.close":
            self.close_code = message.get("code", 1000)
            self.close_reason = message.get("reason") or ""
            self.messages.put_nowait(None)
        elif kind == "websocket.http.response.start":
            self.denied_status = message["status"]
        elif kind == "websocket.http.response.body":
            self.denied_body += message.get("body", b"")
            if not message.get("more_body", False):
                self.messages.put_nowait(None)
        self._ready.set()

    async def next(self, timeout_s: float = 5.0) -> dict[str, Any] | None:
        """The next message, or None once the server closed (or denied) the session."""
        async with asyncio.timeout(timeout_s):
            return await self.messages.get()
