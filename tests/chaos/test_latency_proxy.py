"""The B6 latency proxy delays every chunk by the set latency, with chunks in flight overlapping."""

from __future__ import annotations

import socket
import threading
import time

from conveyor.testing.chaos.latency_proxy import LatencyProxy


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(1024):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def test_latency_applies_each_way_without_pacing_chunks() -> None:
    server, thread = _echo_server()
    with server, LatencyProxy.threaded(server.getsockname()) as proxy:
        proxy.set_latency(150)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            started = time.monotonic()
            sock.sendall(b"a")
            time.sleep(0.05)
            sock.sendall(b"b")
            assert sock.recv(1) == b"a"
            first = time.monotonic() - started
            assert sock.recv(1) == b"b"
            second = time.monotonic() - started
        assert first >= 0.28  # 150 ms each way
        # The second chunk is 50 ms behind the first, not one more full delay (0.3 s) behind.
        assert second - first < 0.2
    thread.join(5)
