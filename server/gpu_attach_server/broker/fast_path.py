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


class FastPath:
    def __init__(self, app, calls: LeaseCalls):
        self.app, self.calls = app, calls

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        if method == "POST" and path == "/v1/leases":
            return await self._grant(scope, receive, send)
        if method in ("DELETE", "POST") and path.startswith("/v1/leases/"):
            m = _LEASE_PATH.match(path)
            if m is not None and (method == "DELETE") == (m.group(2) is None):
                who = self._user(scope)
                if who is not None and _no_body(scope):
                    call = self.calls.release if method == "DELETE" else self.calls.renew
                    return await _answer(send, lambda: call(who, m.group(1)))
        return await self.app(scope, receive, send)

    def _user(self, scope) -> Principal | None:
        auth = _header(scope, b"authorization")
        if auth is None:
            return None
        scheme, _, token = auth.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        who = self.calls.lookup()(token)
        return who if who is not None and who.role in ("user", "admin") else None

    async def _grant(self, scope, receive, send):
        length = _header(scope, b"content-length")
        ctype = _header(scope, b"content-type") or b""
        who = self._user(scope)
        if (who is None or length is None or not length.isdigit() or int(length) > MAX_FAST_BODY
                or not ctype.split(b";")[0].strip().lower() == _JSON):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        try:
            parsed = orjson.loads(body)
            request = LeaseRequest.model_validate(parsed)  # what FastAPI does with a JSON body
        except (orjson.JSONDecodeError, ValidationError, ValueError, TypeError):
            return await self.app(scope, _replay(body, receive), send)
        return await _answer(send, lambda: self.calls.grant(who, request))


async def _answer(send, call: Callable[[], tuple[int, dict]]) -> None:
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
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", ctype), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return v
    return None


def _no_body(scope) -> bool:
    length = _header(scope, b"content-length")
    return _header(scope, b"transfer-encoding") is None and length in (None, b"0")


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
