"""The per-cell routes without the framework's overhead.

Every ``%%gpu`` cell costs one ``POST /v1/leases`` and one ``DELETE /v1/leases/{id}`` (a long cell
also renews). Through FastAPI each of those spent about as long in routing, dependency solving
and response encoding as in the broker itself (``benchmarks/broker_throughput.py``), and the
broker serves a whole site from one event loop.

:class:`FastPath` is an ASGI middleware that answers exactly those requests when they are
well-formed and authorised, by calling the same handlers the FastAPI routes call (``LeaseCalls``).
Anything else goes on to FastAPI unchanged: other routes; a missing, unknown or non-user token;
a body that is not a valid ``LeaseRequest`` (it is handed on as read); a body without a length or
over :data:`MAX_FAST_BODY`. So every refusal the framework makes (401, 403, 413, 422), and the
OpenAPI document, still come from one place, and the fast path adds no behaviour of its own:
``tests/broker/test_fast_path.py`` sends the same requests both ways and compares the answers.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import orjson
from fastapi import HTTPException
from pydantic import ValidationError

from .auth import Principal
from .errors import BrokerError
from .models import LeaseRequest

log = logging.getLogger("gpu_attach.broker")

#: A lease request is a few hundred bytes; anything longer is left to the framework's limits.
MAX_FAST_BODY = 64 * 1024
_LEASE_PATH = re.compile(r"^/v1/leases/(L[0-9a-f]{12})(/renew)?$")
_JSON = b"application/json"


@dataclass
class LeaseCalls:
    """What the lease routes do, shared by the FastAPI routes and :class:`FastPath`: each takes the
    caller and its validated input and answers ``(status, body)``; domain errors raise."""

    grant: Callable[[Principal, LeaseRequest], tuple[int, dict]]
    release: Callable[[Principal, str], tuple[int, dict]]
    renew: Callable[[Principal, str], tuple[int, dict]]
    #: token -> Principal or None; read at each request (the agent-trust module replaces it).
    lookup: Callable[[], Callable[[str], Principal | None]]


def error_body(exc: BrokerError) -> dict[str, Any]:
    """The JSON a domain error answers with (the FastAPI exception handler uses it too)."""
    return {"detail": str(exc), "reason": exc.reason, **exc.extra}


#: What the fast path takes a request for, decided from its head: (kind, caller, lease id).
Taken = tuple[str, Principal, "str | None"]
#: A response: status, headers (content-type and content-length included), body.
Response = tuple[int, list[tuple[bytes, bytes]], bytes]


class FastPath:
    """Decides from a request's head whether to answer it (:meth:`take`), then answers it from
    its body (:meth:`answer`). Two front ends share it: this ASGI middleware (in front of FastAPI,
    for every ASGI server and in-process tests), and :func:`http_protocol` (the broker's own
    server, ``gpu-attach broker``), which answers in the HTTP protocol itself."""

    def __init__(self, app, calls: LeaseCalls):
        self.app, self.calls = app, calls

    def take(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> Taken | None:
        """What to call for a request with this method, path (no query) and headers (lower-case
        names); None for everything FastAPI must answer."""
        if method == "POST" and path == "/v1/leases":
            length = _header(headers, b"content-length")
            ctype = _header(headers, b"content-type") or b""
            if (length is None or not length.isdigit() or int(length) > MAX_FAST_BODY
                    or _header(headers, b"transfer-encoding") is not None
                    or not ctype.split(b";")[0].strip().lower() == _JSON):
                return None
            who = self._user(headers)
            return None if who is None else ("grant", who, None)
        if method in ("DELETE", "POST") and path.startswith("/v1/leases/"):
            m = _LEASE_PATH.match(path)
            if m is not None and (method == "DELETE") == (m.group(2) is None) and _no_body(headers):
                who = self._user(headers)
                if who is not None:
                    return ("release" if method == "DELETE" else "renew", who, m.group(1))
        return None

    def answer(self, taken: Taken, body: bytes) -> Response | None:
        """The response to a request :meth:`take` took, given its body; None when the body is not
        a valid lease request (FastAPI answers it then, with the 422 that names the field)."""
        kind, who, lease_id = taken
        if kind == "grant":
            try:
                request = LeaseRequest.model_validate(orjson.loads(body))  # what FastAPI does with a JSON body
            except (orjson.JSONDecodeError, ValidationError, ValueError, TypeError):
                return None
            return respond(lambda: self.calls.grant(who, request))
        call = self.calls.release if kind == "release" else self.calls.renew
        return respond(lambda: call(who, lease_id))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        taken = self.take(scope["method"], scope["path"], scope["headers"])
        if taken is None:
            return await self.app(scope, receive, send)
        chunks, more = [], taken[0] == "grant"
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        out = self.answer(taken, body)
        if out is None:
            return await self.app(scope, _replay(body, receive), send)
        status, headers, payload = out
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def _user(self, headers) -> Principal | None:
        auth = _header(headers, b"authorization")
        if auth is None:
            return None
        scheme, _, token = auth.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        who = self.calls.lookup()(token)
        return who if who is not None and who.role in ("user", "admin") else None


def http_protocol(fast: FastPath):
    """uvicorn's HTTP protocol (httptools) for ``gpu-attach broker``, except that a request the
    fast path takes is answered in the protocol itself, with no ASGI cycle at all.

    A request costs uvicorn about 0.15 ms of the broker's one core on its own (a scope, a
    request-response cycle, a task, the messages), against 0.05 ms in a bare protocol
    (benchmarks/broker_throughput.py measures the broker's CPU per grant+release). Everything
    else goes through uvicorn unchanged, and so does a taken request whose body is not a valid
    lease request, replayed into uvicorn's own callbacks. A request is taken only when uvicorn
    would start it at once anyway: HTTP/1.1, no request of the connection still in flight
    (pipelined ones stay in order), no ``Expect: 100-continue``, no query string or escapes.

    This overrides uvicorn's parser callbacks and reads a few of its attributes, none of them a
    public API. Where the callbacks are missing, uvicorn's own protocol is returned (and a
    warning logged). A release that kept them but changed what they do or the attributes read
    here would fail ``tests/broker/test_fast_http.py``, which runs this over a socket against
    the FastAPI answers, in CI with the newest uvicorn the project allows."""
    try:
        from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
    except ImportError:  # no httptools: uvicorn chooses its own
        log.warning("the broker's HTTP fast path needs httptools; serving every request through ASGI")
        return "auto"
    needed = ("on_message_begin", "on_headers_complete", "on_body", "on_message_complete",
              "on_response_complete", "_unset_keepalive_if_required")
    if not all(callable(getattr(HttpToolsProtocol, n, None)) for n in needed):
        log.warning("uvicorn's HTTP protocol is not the one the broker's fast path knows; serving "
                    "every request through ASGI")
        return HttpToolsProtocol

    class FastHttpProtocol(HttpToolsProtocol):
        _taken: Taken | None = None

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._taken = None

        def on_headers_complete(self) -> None:
            url = self.url
            if (b"?" not in url and b"%" not in url and url.startswith(b"/v1/leases")
                    and not self.pipeline and (self.cycle is None or self.cycle.response_complete)
                    and not self.expect_100_continue and not self.parser.should_upgrade()
                    and self.parser.get_http_version() == "1.1"):
                taken = fast.take(self.parser.get_method().decode("ascii"), url.decode("ascii"), self.headers)
                if taken is not None:
                    self._taken, self._chunks = taken, []
                    return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if self._taken is not None:
                self._chunks.append(body)  # at most MAX_FAST_BODY: take() read its length
            else:
                super().on_body(body)

        def on_message_complete(self) -> None:
            taken = self._taken
            if taken is None:
                return super().on_message_complete()
            self._taken = None
            body = b"".join(self._chunks)
            out = fast.answer(taken, body)
            if out is None:  # FastAPI's after all: replayed as uvicorn would have seen it
                super().on_headers_complete()
                if body:
                    super().on_body(body)
                super().on_message_complete()
                return
            status, headers, payload = out
            keep_alive = self.parser.should_keep_alive()
            parts = [STATUS_LINE[status]]
            for name, value in (*self.server_state.default_headers, *headers):
                parts += [name, b": ", value, b"\r\n"]
            if not keep_alive:
                parts.append(b"connection: close\r\n")
            parts += [b"\r\n", payload]
            self.transport.write(b"".join(parts))
            if keep_alive:
                self.on_response_complete()  # counts it, resumes reading, arms the keep-alive timer
            else:
                self.server_state.total_requests += 1
                self.transport.close()

    return FastHttpProtocol


def respond(call: Callable[[], tuple[int, dict]]) -> Response:
    """Run a shared handler and encode its answer, or its error, as the FastAPI route would."""
    headers: list[tuple[bytes, bytes]] = []
    ctype = _JSON
    try:
        status, out = call()
        body = orjson.dumps(out)
    except BrokerError as e:
        status, body = e.status, orjson.dumps(error_body(e))
    except HTTPException as e:  # raised by a shared handler: answered as FastAPI would
        status, body = e.status_code, orjson.dumps({"detail": e.detail})
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (e.headers or {}).items()]
    except Exception:  # a bug: answered as Starlette's ServerErrorMiddleware would, and logged
        log.exception("the fast path failed to answer a lease request")
        status, body, ctype = 500, b"Internal Server Error", b"text/plain; charset=utf-8"
    return status, [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), *headers], body


def _header(headers, name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _no_body(headers) -> bool:
    length = _header(headers, b"content-length")
    return _header(headers, b"transfer-encoding") is None and length in (None, b"0")


def _replay(body: bytes, receive) -> Callable[[], Awaitable[dict]]:
    """A receive() that gives ``body`` (already read) once, then whatever the client sends next."""
    given = False

    async def again():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again
