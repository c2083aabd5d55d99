"""A private redis-server on a free loopback port that tests can stop, restart and kill.

It can also require TLS (``rediss://``, with certificates the test made) and ACL users with
passwords, to test the broker's secure connection options against a real server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote


def redis_server_binary() -> str | None:
    """The path of ``redis-server``, or None if it is not installed."""
    return shutil.which("redis-server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for a TLS-only server: its certificate and key, and the CA that signed it.

    Clients verify the server against ``ca``; the server asks clients for no certificate.
    """

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True, slots=True)
class RedisUser:
    """An ACL user: a name, a password, and its ACL rules (all keys, channels and commands)."""

    name: str
    password: str
    rules: tuple[str, ...] = ("~*", "&*", "+@all")


class RedisServer:
    """Runs ``redis-server`` on 127.0.0.1 with no persistence (unless ``appendfsync`` is given).

    The port stays the same across :meth:`stop`/:meth:`start`, so clients can reconnect.

    Args:
        port: the port (default: a free one).
        appendfsync: ``always`` or ``everysec`` turns on AOF in a private directory.
        extra_args: more ``redis-server`` arguments.
        tls: serve TLS only, on ``port``, with these files (the plain port is closed).
        users: ACL users; when any is given the passwordless ``default`` user is turned off, so
            every client must authenticate. :attr:`url` carries the first user's credentials.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        appendfsync: str | None = None,
        extra_args: list[str] | None = None,
        tls: TlsFiles | None = None,
        users: Sequence[RedisUser] = (),
    ) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed (Debian: apt-get install redis-server)"
            )
        self.binary = binary
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.extra_args = list(extra_args or [])
        self.tls = tls
        self.users = tuple(users)
        self._dir = tempfile.mkdtemp(prefix="conveyor-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``.

        With TLS: ``rediss://`` and ``?ssl_ca_certs=`` naming the CA (certificates verified);
        with users: the first user's name and password.
        """
        return self.url_for(self.users[0] if self.users else None)

    def url_for(self, user: RedisUser | None, *, password: str | None = None) -> str:
        """A URL for this server as ``user`` (None: no credentials); ``password`` overrides."""
        auth = ""
        if user is not None:
            secret = user.password if password is None else password
            auth = f"{quote(user.name, safe='')}:{quote(secret, safe='')}@"
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={quote(str(self.tls.ca))}"

    def _args(self) -> list[str]:
        access = ["--port", str(self.port)]
        if self.tls is not None:
            access = [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert),
                "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        if self.users:
            access += ["--user", "default", "off"]
            for user in self.users:
                access += ["--user", user.name, "on", f">{user.password}", *user.rules]
        args = [
            self.binary,
            *access,
            "--bind", "127.0.0.1",
            "--save", "",
            "--dir", self._dir,
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(Path(self._dir) / "redis.log"),
        ]  # fmt: skip
        if self.appendfsync:
            args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        else:
            args += ["--appendonly", "no"]
        return args + self.extra_args

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it accepts connections."""
        if self.process is not None and self.process.poll() is None:
            return
        self.process = subprocess.Popen(
            self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            with contextlib.suppress(OSError):
                if self._ping():
                    return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not start on port {self.port} in {timeout_s} s")

    def _ping(self) -> bool:
        """One PING over a fresh connection (TLS and AUTH as configured); True on +PONG."""
        with contextlib.ExitStack() as closing:
            sock = closing.enter_context(socket.create_connection(("127.0.0.1", self.port), 0.5))
            if self.tls is not None:
                context = ssl.create_default_context(cafile=str(self.tls.ca))
                # Readiness only: a test may serve a certificate for another name on purpose.
                context.check_hostname = False
                # The TLS socket takes the plain one's descriptor over: close it, too.
                sock = closing.enter_context(context.wrap_socket(sock, server_hostname="127.0.0.1"))
            commands = [[b"PING"]]
            if self.users:
                user = self.users[0]
                commands.insert(0, [b"AUTH", user.name.encode(), user.password.encode()])
            for command in commands:
                sock.sendall(_resp(command))
                reply = sock.recv(64)
                if not reply.startswith((b"+OK", b"+PONG")):
                    return False
            return True

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server with SIGTERM (a clean shutdown) and wait for it."""
        self._signal(signal.SIGTERM, timeout_s)

    def kill(self) -> None:
        """Stop the server with SIGKILL (a crash)."""
        self._signal(signal.SIGKILL, 10.0)

    def restart(self) -> None:
        """Stop, then start again on the same port."""
        self.stop()
        self.start()

    def _signal(self, sig: int, timeout_s: float) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def close(self) -> None:
        """Kill the server and remove its directory."""
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _resp(command: list[bytes]) -> bytes:
    """``command`` as a RESP array (inline commands would split a password at its spaces)."""
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)
