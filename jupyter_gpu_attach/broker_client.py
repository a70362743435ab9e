"""The kernel's HTTP client for the broker: request, renew and release leases; read the pool."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Any, Callable
from urllib.parse import urlencode, urlsplit

from .errors import AuthError, BrokerUnreachable, GPUAttachError, LeaseLost, NoCapacity
from .slices import SliceRequest


#: How long a %%gpu cell waits in the queue unless told otherwise (``--wait``); the broker caps it.
DEFAULT_WAIT_S = 600.0
#: One long-poll's length: well under the HTTP timeout, so a silent broker is still noticed.
POLL_S = 20.0

QueuedCallback = Callable[[int, int, float], None]


class BrokerClient:
    """A keep-alive HTTP client on ``http.client``: a cell pays two broker round trips (lease,
    release), so the client's own overhead matters; ``requests`` adds about a millisecond each."""

    def __init__(self, url: str, token: str, timeout: float = 30.0):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"broker URL must look like http://HOST:PORT, got {url!r}")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._parts = parts
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()  # the renewal thread shares the connection

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(self._parts.hostname, self._parts.port, timeout=self.timeout)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _send(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        with self._lock:
            for attempt in (0, 1):
                fresh = self._conn is None
                try:
                    if fresh:
                        self._conn = self._connect()
                    self._conn.request(method, self._parts.path.rstrip("/") + path, body=body, headers=headers)
                    r = self._conn.getresponse()
                    return r.status, r.read()
                except (http.client.HTTPException, ConnectionError, socket.timeout, OSError) as e:
                    if self._conn is not None:
                        self._conn.close()
                    self._conn = None
                    # A kept-alive connection the server closed fails once; a fresh one failing is real.
                    if fresh or attempt == 1 or isinstance(e, socket.timeout):
                        raise BrokerUnreachable(
                            f"cannot reach the broker at {self.url} ({type(e).__name__}: {e}); is it running? "
                            "Check GPU_ATTACH_BROKER_URL, or unset it to use the embedded broker."
                        ) from None
        raise AssertionError("unreachable")

    def _call(self, method: str, path: str, json_body: Any = None, params: dict | None = None) -> Any:
        if params:
            path += "?" + urlencode(params)
        status, raw = self._send(method, path, None if json_body is None else json.dumps(json_body).encode())
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"detail": raw[:300].decode(errors="replace")}
        if status < 300:
            return body
        detail = body.get("detail", body) if isinstance(body, dict) else body
        if status == 401:
            raise AuthError(f"the broker at {self.url} refused the token: {detail}")
        if status == 403:
            raise AuthError(f"not allowed: {detail}")
        if status == 409 and body.get("reason") in ("busy", "too_large", "over_quota"):
            raise NoCapacity(str(detail), body["reason"])
        if status == 409 and "state" in body:
            raise LeaseLost(str(detail))
        if status == 422:
            raise ValueError(_describe_422(detail))
        raise GPUAttachError(f"broker error {status} on {method} {path}: {detail}")

    def request_lease(self, request: SliceRequest, session: str, label: str = "", wait_s: float | None = None,
                      on_queued: QueuedCallback | None = None) -> dict:
        """Lease ``request``; the grant (with its token) once granted.

        With ``wait_s`` > 0 a request the pool cannot meet now waits in the broker's queue for up to
        that long: ``on_queued(position, of, eta_s)`` is called when it is queued and whenever the
        broker reports again (at least every ``POLL_S``), and the grant arrives by long-poll the
        moment it is made. Raises :class:`NoCapacity` (``reason`` busy, too_large, over_quota or
        timed_out) when it cannot be had; an interrupt while waiting leaves the queue.
        """
        body = dict(request.to_json(), session=session, label=label[:256])
        if wait_s:
            body["wait_s"] = float(wait_s)
        lease = self._call("POST", "/v1/leases", body)
        if lease.get("state") != "queued":
            return lease
        deadline = time.monotonic() + float(wait_s)
        try:
            while True:
                if on_queued is not None:
                    on_queued(int(lease["position"]), int(lease["of"]), float(lease["eta_s"]))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoCapacity(f"waited {wait_s:g} s in the queue for {request.describe()} and no GPU freed "
                                     "up; wait longer (--wait), ask for less, or try later", "timed_out")
                poll = min(left, POLL_S, max(self.timeout * 0.66, 0.1))  # answered well within the HTTP timeout
                lease = self._call("GET", f"/v1/leases/{lease['id']}", params={"wait": round(poll, 3)})
                state = lease.get("state")
                if state == "granted":
                    return lease
                if state != "queued":
                    raise NoCapacity(f"the queued request ended ({state}): {lease.get('end_reason', '')}",
                                     "timed_out" if state == "timed_out" else "busy")
        except BaseException:
            if lease.get("state") == "queued":
                try:  # leave the queue, so the GPU is not granted to a cell that is gone
                    self.release(lease["id"])
                except Exception:
                    pass
            raise

    def renew(self, lease_id: str) -> dict:
        return self._call("POST", f"/v1/leases/{lease_id}/renew")

    def release(self, lease_id: str) -> dict:
        return self._call("DELETE", f"/v1/leases/{lease_id}")

    def lease(self, lease_id: str) -> dict:
        return self._call("GET", f"/v1/leases/{lease_id}")

    def leases(self, **params) -> list[dict]:
        return self._call("GET", "/v1/leases", params={k: v for k, v in params.items() if v is not None})["leases"]

    def pool(self) -> dict:
        return self._call("GET", "/v1/pool")

    def whoami(self) -> dict:
        return self._call("GET", "/v1/whoami")

    def session_alive(self, session: str) -> dict:
        """Say the notebook session still lives (its kernel beats this every ``beat_s`` of the answer);
        a session that stops beating is ended and its sandboxes reclaimed."""
        return self._call("POST", f"/v1/sessions/{session}/alive")

    def end_session(self, session: str) -> dict:
        """The kernel shuts down: the agents reclaim this session's sandboxes now."""
        return self._call("DELETE", f"/v1/sessions/{session}")


def _describe_422(detail) -> str:
    if isinstance(detail, list):
        parts = []
        for item in detail:
            loc = ".".join(str(x) for x in item.get("loc", []) if x != "body")
            parts.append(f"{loc or 'request'}: {item.get('msg', item)}")
        return "the broker rejected the request: " + "; ".join(parts)
    return f"the broker rejected the request: {detail}"
