"""The service's guards: token auth, body cap, content type, rate limit, broker breaker.

The breaker answers 503 at once while the broker is known to be down.

Order in :class:`SecurityMiddleware` is cheapest-first and never reads a body it will refuse:
rate limit (floods, token guessing) -> auth -> content type -> body cap. ``/health`` is the one
public path with data (probes carry no token), beside the dashboard's two static files, which hold
code only; everything else, the dashboard page ``/``, ``/docs``, ``/metrics`` and the event streams
included, needs the token once one is configured. Credentials come only from the ``Authorization``
header (or, where a browser cannot set headers - opening the dashboard, EventSource, WebSocket -
``?token=``, stripped from the request before anything logs it, or a ``bearer, TOKEN`` WebSocket
subprotocol); cookies are never read, so there is no CSRF surface.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.errors import BrokerUnavailable, ConfigurationError

logger = logging.getLogger(__name__)

TOKEN_ENV: Final = "CONVEYOR_TOKEN"
#: No token needed: the health probe, and the dashboard's static code (no data in it).
PUBLIC_PATHS: Final = frozenset({"/health", "/static/app.js", "/static/style.css"})
#: Paths where a token may travel in the query string: a browser opening the dashboard, and
#: EventSource and WebSocket, cannot set an Authorization header.
QUERY_TOKEN_PATHS: Final = frozenset({"/", "/events", "/events/ws"})
RPC_PATH: Final = "/rpc"
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback interface only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_token(host: str, token: str | None) -> None:
    """Refuse (ConfigurationError) to listen beyond loopback without a bearer token."""
    if not token and not is_loopback(host):
        raise ConfigurationError(
            f"refusing to listen on {host} without a token: anyone who can reach it could run "
            f"any registered task. Set {TOKEN_ENV} (or pass --token), or bind 127.0.0.1"
        )


def token_matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison (hmac.compare_digest), so timing reveals nothing of the token."""
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())


# -- rate limit ------------------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per client address: ``rate_per_s`` sustained, ``burst`` at once.

    Memory is bounded: at most ``max_clients`` buckets, least recently seen evicted first (an
    evicted client starts again with a full bucket, which only ever favours it).
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ConfigurationError("rate limit needs rate_per_s > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def acquire(self, key: str) -> float:
        """Take one token for ``key``: 0.0 if allowed, else the seconds until one is available."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [float(self.burst), now]
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate_per_s)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / self.rate_per_s


# -- broker breaker --------------------------------------------------------------------------------


class BrokerGuard:
    """Answers 503 at once for ``cooldown_s`` after the broker was found unreachable.

    Without it every request would wait out the broker timeout while the broker is down. After
    the cool-down, requests go through again (the first success closes the breaker). Changes of
    state are logged once each, never per request.
    """

    def __init__(self, cooldown_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._open_until = 0.0
        self.is_open = False
        self.failures = 0
        self.last_error: str | None = None

    def check(self) -> None:
        """Raise BrokerUnavailable while the breaker is open and cooling down."""
        if self.is_open and self._clock() < self._open_until:
            raise BrokerUnavailable(
                f"the broker is unreachable ({self.last_error}); retry after "
                f"{self.retry_after_s()} s"
            )

    def failure(self, exc: BaseException) -> None:
        """Record an unreachable broker: open (or keep open) the breaker."""
        self.failures += 1
        self.last_error = str(exc) or type(exc).__name__
        self._open_until = self._clock() + self.cooldown_s
        if not self.is_open:
            self.is_open = True
            logger.warning(
                "service: broker unavailable, answering 503 until it is back: %s",
                self.last_error,
                extra={"action": "circuit_open"},
            )

    def success(self) -> None:
        """Record a broker answer: close the breaker."""
        if self.is_open:
            self.is_open = False
            logger.info(
                "service: broker reachable again after %d failed calls",
                self.failures,
                extra={"action": "circuit_closed"},
            )
            self.failures = 0

    def retry_after_s(self) -> int:
        """Seconds a client should wait before retrying (at least 1)."""
        return max(1, math.ceil(self._open_until - self._clock()))


# -- responses ---------------------------------------------------------------------------------


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a streamed body passes the cap (FastAPI re-raises it as is)."""

    def __init__(self, cap: int) -> None:
        super().__init__(413, f"request body is over the {cap}-byte cap; send less per request")


def error_document(
    path: str, status: int, code: str, message: str, type_: str, **extra: Any
) -> dict[str, Any]:
    """An error body: JSON-RPC's shape on the RPC path, ``{"error": {...}}`` everywhere else."""
    if path == RPC_PATH:
        data = {"type": type_, "http_status": status, **extra}
        return {
            "jsonrpc": "2.0",
            "error": {"code": -32600, "message": message, "data": data},
            "id": None,
        }
    return {"error": {"code": code, "message": message, "type": type_, **extra}}


async def send_error(
    send: Send,
    path: str,
    status: int,
    code: str,
    message: str,
    *,
    headers: Iterable[tuple[str, str]] = (),
) -> None:
    """Send a whole JSON error response from ASGI middleware."""
    body = json.dumps(error_document(path, status, code, message, _TYPES[code])).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


_TYPES: Final = {
    "unauthorized": "Unauthorized",
    "token_required": "TokenRequired",
    "rate_limited": "RateLimited",
    "payload_too_large": "PayloadTooLarge",
    "unsupported_media_type": "UnsupportedMediaType",
    "bad_request": "BadRequest",
}


# -- middleware --------------------------------------------------------------------------------


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def route_path(scope: Scope) -> str:
    """The request path inside this app (without the mount prefix, when mounted)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def _is_json(content_type: str) -> bool:
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if not (media in ("application/json", "application/json-rpc") or media.endswith("+json")):
        return False
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            return False
    return True


class SecurityMiddleware:
    """Pure ASGI middleware applying the guards to every HTTP request and WebSocket handshake.

    Args:
        app: the wrapped application.
        token: the bearer token; None disables auth (allowed only on loopback, see below).
        limiter: per-client rate limit, or None.
        max_body_bytes: the request body cap.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        limiter: RateLimiter | None,
        max_body_bytes: int,
    ) -> None:
        self.app = app
        self.token = token
        self.limiter = limiter
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse the request with a JSON error, or pass it on (with a capped body)."""
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        # Taken out even when auth is off, so it never reaches the app (or the access log).
        query_token = _pop_query_token(scope) if path in QUERY_TOKEN_PATHS else None
        refusal = self._refusal(scope, path, query_token)
        if refusal is not None:
            status, code, message, headers = refusal
            if kind == "websocket":
                await _deny_websocket(scope, receive, send, status, code, message)
            else:
                await send_error(send, path, status, code, message, headers=headers)
            return
        if kind == "http" and scope.get("method") in _BODY_METHODS:
            receive = self._capped(receive)
        await self.app(scope, receive, send)

    def _refusal(
        self, scope: Scope, path: str, query_token: str | None
    ) -> tuple[int, str, str, list[tuple[str, str]]] | None:
        if path in PUBLIC_PATHS:
            return None
        if self.limiter is not None:
            client = scope.get("client")
            wait_s = self.limiter.acquire(client[0] if client else "unknown")
            if wait_s > 0:
                retry = str(max(1, math.ceil(wait_s)))
                message = f"too many requests from this client; retry after {retry} s"
                return 429, "rate_limited", message, [("retry-after", retry)]
        if self.token is None:
            server = scope.get("server")
            if server and _is_ip(server[0]) and not is_loopback(server[0]):
                # Defence in depth for apps run by plain `uvicorn --host 0.0.0.0`: the CLI
                # already refuses to bind like this without a token.
                message = (
                    f"this server is reachable on {server[0]} without a token; "
                    f"restart it with {TOKEN_ENV} set"
                )
                return 403, "token_required", message, []
        elif not token_matches(self._presented_token(scope, query_token), self.token):
            message = (
                "missing or invalid bearer token; send 'Authorization: Bearer <token>' with the "
                f"token the server was started with ({TOKEN_ENV} or --token)"
            )
            if path == "/":
                message += "; in a browser, open /?token=<token>"
            return 401, "unauthorized", message, [("www-authenticate", "Bearer")]
        if scope["type"] == "http" and scope.get("method") in _BODY_METHODS:
            return self._body_refusal(scope, path)
        return None

    def _body_refusal(
        self, scope: Scope, path: str
    ) -> tuple[int, str, str, list[tuple[str, str]]] | None:
        length = _header(scope, b"content-length")
        chunked = _header(scope, b"transfer-encoding") is not None
        if length is not None:
            if not length.isdigit():
                return 400, "bad_request", "invalid Content-Length header", []
            if int(length) > self.max_body_bytes:
                message = (
                    f"request body of {length} bytes is over the {self.max_body_bytes}-byte cap; "
                    "send fewer or smaller jobs per request"
                )
                return 413, "payload_too_large", message, []
        if chunked or (length is not None and int(length) > 0):
            content_type = _header(scope, b"content-type")
            if content_type is None or not _is_json(content_type):
                message = (
                    f"unsupported content type {content_type!r}; send JSON with "
                    "'Content-Type: application/json' (UTF-8)"
                )
                return 415, "unsupported_media_type", message[:300], []
        return None

    def _presented_token(self, scope: Scope, query_token: str | None) -> str | None:
        auth = _header(scope, b"authorization")
        if auth is not None:
            scheme, _, value = auth.partition(" ")
            return value.strip() if scheme.lower() == "bearer" else None
        if scope["type"] == "websocket":
            offered = [
                p.strip() for p in (_header(scope, b"sec-websocket-protocol") or "").split(",")
            ]
            if len(offered) >= 2 and offered[0].lower() == "bearer":
                return offered[1]
        return query_token

    def _capped(self, receive: Receive) -> Receive:
        cap = self.max_body_bytes
        seen = 0

        async def capped_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise BodyTooLarge(cap)
            return message

        return capped_receive


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _pop_query_token(scope: Scope) -> str | None:
    """Take ``token`` out of the query string, in place, and return it.

    The scope is the server's own dict, so uvicorn's access log (written from it afterwards)
    never shows the token either.
    """
    raw: bytes = scope.get("query_string", b"")
    if b"token=" not in raw:
        return None
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    token = next((value for key, value in pairs if key == "token"), None)
    scope["query_string"] = urlencode([(k, v) for k, v in pairs if k != "token"]).encode()
    return token


async def _deny_websocket(
    scope: Scope, receive: Receive, send: Send, status: int, code: str, message: str
) -> None:
    """Refuse a WebSocket handshake: an HTTP error if the server can send one, else close 1008."""
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        body = json.dumps(error_document(route_path(scope), status, code, message, _TYPES[code]))
        headers = [(b"content-type", b"application/json")]
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body.encode()})
        return
    await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
