"""Server-wide admission control: a bound on the HTTP requests the service works on at once.

The per-client rate limit (:mod:`conveyor.service.security`) does not protect the server from
many clients at once: past its capacity every request waits longer on the one event loop, until
clients time out, retry and add to the pile. Here, once ``max_in_flight`` requests are being
handled, the next one is answered ``503`` with ``Retry-After`` at once, without reading its body
or touching the broker: a refusal costs microseconds, so the requests already admitted keep
their normal latency and the process its bounded memory (at most ``max_in_flight`` bodies).

Exempt: ``/health`` (a supervisor must see the process is alive, not overloaded into a restart),
``/metrics`` (the operator's view of the overload itself) and the SSE stream ``/events``, which
stays open for minutes and has its own bound (``max_event_clients``). WebSockets are not counted
for the same reason.

The default bound (``ServiceSettings.max_in_flight``, 128) is far above what one event loop
serves at its best latency (tens of requests in flight) and far below what exhausts memory (each
admitted request may hold a body up to the cap).
"""

from __future__ import annotations

import json
from typing import Final

from starlette.types import ASGIApp, Receive, Scope, Send

from conveyor.service.security import error_document, route_path

#: Never refused here: probes, metrics, and the long-lived event stream (bounded elsewhere).
EXEMPT_PATHS: Final = frozenset({"/health", "/metrics", "/events"})


class AdmissionControl:
    """ASGI middleware refusing HTTP requests beyond ``max_in_flight`` with 503 + Retry-After.

    Args:
        app: the wrapped application.
        max_in_flight: requests handled at once; the next one is refused until one finishes.
        retry_after_s: the ``Retry-After`` sent with a refusal (whole seconds, at least 1).
    """

    def __init__(self, app: ASGIApp, *, max_in_flight: int, retry_after_s: int = 1) -> None:
        if max_in_flight < 1 or retry_after_s < 1:
            raise ValueError("max_in_flight and retry_after_s must be >= 1")
        self.app = app
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse the request if the server is full, else pass it on and count it while it runs."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if path in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            self.refused += 1
            await self._refuse(path, send)
            return
        # One event loop: the check above and this increment run without a switch between them.
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _refuse(self, path: str, send: Send) -> None:
        message = (
            f"the server is handling {self.max_in_flight} requests already; "
            f"retry after {self.retry_after_s} s"
        )
        document = error_document(path, 503, "overloaded", message, "Overloaded")
        body = json.dumps(document).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(self.retry_after_s).encode()),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
