"""How the broker answers on the wire when started as a site starts it (``gpu-attach broker --port``)."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit


def _exchange(sock: socket.socket, path: str = "/healthz") -> float:
    t = time.perf_counter()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: broker\r\n\r\n".encode())
    buf = b""
    while b'{"ok":true}' not in buf:
        chunk = sock.recv(4096)
        assert chunk, "the broker closed the kept-alive connection"
        buf += chunk
    return time.perf_counter() - t


def test_kept_alive_requests_are_not_delayed_by_nagle(site):
    """Without TCP_NODELAY on accepted sockets, every request after the first on one connection
    waits ~40 ms for the client's delayed ACK. The delay is the server's, whatever the client sets."""
    parts = urlsplit(site.url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        _exchange(sock)  # the first request on a connection was never delayed
        later = sorted(_exchange(sock) for _ in range(7))
    # The median, so one scheduling hiccup on a busy 2-core machine does not fail the test.
    assert later[3] < 0.025, f"kept-alive requests took {[round(x * 1000, 1) for x in later]} ms"
