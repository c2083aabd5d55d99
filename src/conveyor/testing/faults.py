"""Fault toolkit: a loopback TCP fault proxy, and bounded process signalling helpers.

:class:`FaultProxy` sits between clients and a TCP server (Redis): clients connect to
``proxy.port`` and every byte is forwarded to the target until you switch the mode::

    with FaultProxy.threaded(("127.0.0.1", redis.port)) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        ...
        proxy.set_mode(Mode.HALF_OPEN, apply_to="existing")  # live links go silent
        proxy.set_mode(Mode.PASS)

Modes (``apply_to`` picks whether they hit the connections open now, new ones, or both):

* ``PASS``: forward both ways.
* ``DELAY``: forward each chunk after ``delay_ms`` (order kept).
* ``DROP``: accept but blackhole: bytes are read and discarded both ways, nothing is closed,
  new connections are accepted and never connected upstream.
* ``RESET``: close connections with an RST (SO_LINGER 0); new ones are reset on accept.
* ``HALF_OPEN``: stop forwarding one direction (``direction="downstream"``: the server's
  replies, by default) while both sockets stay open: what a dead NAT entry or a peer that lost
  power looks like to the client.

The process helpers send real signals and always bound their waits: :func:`wait_exit` returns
the exit code or None, and :class:`Child` runs a program that prints ``ready`` and kills it
(after a stack dump, for the post-mortem) when it overstays its budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

from conveyor.testing.redis_server import free_port

Direction = Literal["upstream", "downstream"]
ApplyTo = Literal["all", "existing", "new"]
_CHUNK = 65536


class Mode(enum.Enum):
    """What the proxy does with traffic (see the module docstring)."""

    PASS = "pass"
    DELAY = "delay"
    DROP = "drop"
    RESET = "reset"
    HALF_OPEN = "half_open"


class _Link:
    """One proxied connection: client side, upstream side (None while blackholed), its mode."""

    def __init__(self, client: asyncio.StreamWriter, mode: Mode, delay_ms: float) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.mode = mode
        self.delay_ms = delay_ms
        self.half_open: Direction = "downstream"
        self.tasks: list[asyncio.Task[None]] = []

    def forwards(self, direction: Direction) -> bool:
        if self.mode is Mode.DROP:
            return False
        return not (self.mode is Mode.HALF_OPEN and direction == self.half_open)

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                _abort_with_rst(writer)
        for task in self.tasks:
            task.cancel()


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close so that the peer sees ECONNRESET, not an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """An asyncio TCP proxy on 127.0.0.1 whose behaviour can be switched at run time.

    Use :meth:`start`/:meth:`close` on a running loop, or :meth:`threaded` from sync code (the
    proxy then runs on a loop of its own in a daemon thread; :meth:`set_mode` is thread-safe).

    Args:
        target: the ``(host, port)`` to forward to.
        port: the port to listen on (default: a free one).
    """

    def __init__(self, target: tuple[str, int], *, port: int | None = None) -> None:
        self.target = target
        self.port = port or free_port()
        self.mode = Mode.PASS
        self.delay_ms = 0.0
        self.half_open: Direction = "downstream"
        self.accepted = 0
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect."""
        return ("127.0.0.1", self.port)

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._links)

    async def start(self) -> None:
        """Listen (returns once accepting)."""
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def close(self) -> None:
        """Stop listening and reset every connection (bounded)."""
        if self._server is not None:
            self._server.close()
            for link in list(self._links):
                link.reset()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
            self._server = None

    def set_mode(
        self,
        mode: Mode,
        *,
        delay_ms: float = 0.0,
        apply_to: ApplyTo = "all",
        direction: Direction = "downstream",
    ) -> None:
        """Switch the mode for ``apply_to`` connections (safe to call from any thread)."""
        loop = self._loop
        if loop is not None and loop.is_running() and not _on_loop(loop):
            done = threading.Event()

            def apply() -> None:
                try:
                    self._set_mode(mode, delay_ms, apply_to, direction)
                finally:
                    done.set()

            loop.call_soon_threadsafe(apply)
            if not done.wait(5.0):
                raise TimeoutError("the fault proxy's loop did not apply the mode within 5 s")
            return
        self._set_mode(mode, delay_ms, apply_to, direction)

    def _set_mode(
        self, mode: Mode, delay_ms: float, apply_to: ApplyTo, direction: Direction
    ) -> None:
        if apply_to in ("all", "new"):
            self.mode, self.delay_ms, self.half_open = mode, delay_ms, direction
        if apply_to in ("all", "existing"):
            for link in list(self._links):
                if mode is Mode.RESET:
                    link.reset()
                    self._links.discard(link)
                    continue
                link.mode, link.delay_ms, link.half_open = mode, delay_ms, direction

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode is Mode.RESET:
            _abort_with_rst(writer)
            return
        link = _Link(writer, self.mode, self.delay_ms)
        link.half_open = self.half_open
        self._links.add(link)
        try:
            if link.mode is Mode.DROP:
                # Blackhole: read and discard; never connect upstream.
                await self._pump(reader, None, link, "upstream")
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.target), timeout=5.0
                )
            except (OSError, TimeoutError):
                _abort_with_rst(writer)
                return
            link.upstream = up_writer
            link.tasks = [
                asyncio.create_task(self._pump(reader, up_writer, link, "upstream")),
                asyncio.create_task(self._pump(up_reader, writer, link, "downstream")),
            ]
            # When one side ends, end the other too (a proxy must not keep half a link).
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._links.discard(link)
            for task in link.tasks:
                task.cancel()
            for w in (writer, link.upstream):
                if w is not None:
                    w.transport.abort()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter | None,
        link: _Link,
        direction: Direction,
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(_CHUNK):
                if writer is None or not link.forwards(direction):
                    continue  # blackholed: the sender sees its bytes accepted, nothing else
                if link.mode is Mode.DELAY and link.delay_ms > 0:
                    await asyncio.sleep(link.delay_ms / 1000)
                writer.write(data)
                await writer.drain()

    @classmethod
    @contextlib.contextmanager
    def threaded(cls, target: tuple[str, int], *, port: int | None = None) -> Iterator[FaultProxy]:
        """Run a proxy on its own loop in a daemon thread for the ``with`` block."""
        proxy = cls(target, port=port)
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(proxy.start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(proxy.close())
            loop.close()

        thread = threading.Thread(target=run, name="conveyor-fault-proxy", daemon=True)
        thread.start()
        if not ready.wait(10.0) or failure:
            raise RuntimeError(f"the fault proxy did not start: {failure[:1]}")
        try:
            yield proxy
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5.0)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


# -- processes -------------------------------------------------------------------------------------


def send(pid: int, sig: int) -> bool:
    """Send ``sig`` to ``pid``; False if the process is already gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def sigkill(pid: int) -> bool:
    """Kill ``pid`` (a crash: no cleanup runs)."""
    return send(pid, signal.SIGKILL)


def sigterm(pid: int) -> bool:
    """Ask ``pid`` to stop gracefully."""
    return send(pid, signal.SIGTERM)


def sigstop(pid: int) -> bool:
    """Freeze ``pid`` (it keeps its sockets and leases but runs nothing)."""
    return send(pid, signal.SIGSTOP)


def sigcont(pid: int) -> bool:
    """Thaw a frozen ``pid``."""
    return send(pid, signal.SIGCONT)


def wait_exit(
    proc: subprocess.Popen[str] | subprocess.Popen[bytes], timeout_s: float
) -> int | None:
    """Wait at most ``timeout_s`` for ``proc`` to exit; its exit code, or None if it did not."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None


class Child:
    """A program run as a child process that prints ``ready`` on stdout once it serves.

    Stdout is watched by a thread (``ready`` sets :attr:`ready_at`, a wall-clock time comparable
    with ledger times); stderr goes to ``stderr_path``. :meth:`stop` bounds every wait; a
    process that overstays gets SIGUSR1 first (programs that ``faulthandler.register`` it dump
    their stacks to stderr), then SIGKILL.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stderr_path: Path,
        cwd: Path | None = None,
    ) -> None:
        environ = dict(os.environ)
        environ.update(env or {})
        self.stderr_path = stderr_path
        self._stderr = stderr_path.open("ab")
        self.proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.ready = threading.Event()
        self.ready_at = 0.0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip() == "ready" and not self.ready.is_set():
                self.ready_at = time.time()
                self.ready.set()

    @property
    def pid(self) -> int:
        """The child's pid."""
        return self.proc.pid

    @property
    def alive(self) -> bool:
        """Whether the child has not exited yet."""
        return self.proc.poll() is None

    def wait_ready(self, timeout_s: float = 20.0) -> bool:
        """Wait (bounded) for ``ready``; False if it did not come (or the child died)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready.wait(0.05):
                return True
            if not self.alive:
                return False
        return False

    def signal(self, sig: int) -> bool:
        """Send ``sig``; False if the child is gone."""
        return send(self.pid, sig)

    def wait_exit(self, timeout_s: float) -> int | None:
        """The exit code, or None if the child is still running after ``timeout_s``."""
        return wait_exit(self.proc, timeout_s)

    def terminate_and_time(self, budget_s: float) -> tuple[float, bool]:
        """SIGTERM, wait up to ``budget_s``: (seconds to exit, whether it hung and was killed)."""
        t0 = time.monotonic()
        self.signal(signal.SIGTERM)
        code = self.wait_exit(budget_s)
        elapsed = time.monotonic() - t0
        if code is None:
            self.kill(dump=True)
            return elapsed, True
        return elapsed, False

    def kill(self, *, dump: bool = False) -> None:
        """SIGKILL (after a SIGUSR1 stack dump if ``dump``), then reap (bounded)."""
        if not self.alive:
            return
        if dump:
            self.signal(signal.SIGCONT)  # a frozen process cannot dump its stacks
            self.signal(signal.SIGUSR1)
            time.sleep(0.3)
        self.signal(signal.SIGKILL)
        wait_exit(self.proc, 10.0)

    def close(self) -> None:
        """Kill if still running and release the pipes."""
        self.kill()
        self._reader.join(5.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()

    def stderr(self) -> str:
        """What the child wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")


__all__ = [
    "Child",
    "FaultProxy",
    "Mode",
    "send",
    "sigcont",
    "sigkill",
    "sigstop",
    "sigterm",
    "wait_exit",
]
