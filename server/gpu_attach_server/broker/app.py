"""The broker's HTTP API: a thin table of routes over :class:`Broker`.

Every route but ``/healthz`` needs a bearer token. Users act on their own leases; the admin on
any; agents only register and beat. Domain errors map to HTTP codes in one place.
"""

from __future__ import annotations

import asyncio
import functools
import math
import logging
import threading
from contextlib import asynccontextmanager
from typing import Annotated, Optional

import orjson
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.openapi.utils import get_openapi

from .. import __version__
from . import agents, listing_worker, schemas
from .background import in_background
from .fast_path import FastPath, LeaseCalls, error_body
from .auth import Principal, TokenBook
from .core import LEASE_STATES, Broker, BrokerError
from .models import AgentRegistration, Heartbeat, LeaseRequest

log = logging.getLogger("gpu_attach.broker")

MAX_BODY_BYTES = 1024 * 1024
CHECKPOINT_INTERVAL_S = 0.2
LeaseId = Annotated[str, Path(pattern=r"^L[0-9a-f]{12}$")]
CURSOR = r"^[0-9]{1,12}(\.[0-9]{1,20})?(e[+-]?[0-9]{1,3})?_L[0-9a-f]{12}$"
#: The longest one long-poll holds a connection; clients poll again (the queue keeps their place).
MAX_POLL_S = 60.0
AgentId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:@-]{1,128}$")]


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, whether or not Content-Length is sent."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                return await _too_large(send, self.limit)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body is over {self.limit} bytes")
            return msg

        return await self.app(scope, limited, send)


class BrokerApp(FastAPI):
    """FastAPI with the per-cell fast path (``fast_path.py``) in front of its whole middleware
    stack: a grant or release that the fast path answers skips FastAPI's own per-request work
    (telemetry checks, the error and body-limit middleware) as well as its routing."""

    fast_path: FastPath | None = None

    async def __call__(self, scope, receive, send):
        if self.fast_path is not None and scope["type"] == "http":
            return await self.fast_path(scope, receive, send)
        return await super().__call__(scope, receive, send)


async def _too_large(send, limit):
    body = b'{"detail":"request body is over %d bytes"}' % limit
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(broker: Broker, tokens: TokenBook, reap_interval_s: float | None = None,
               metrics_token: str | None = None) -> FastAPI:
    stop = threading.Event()

    def reaper():
        interval = reap_interval_s or max(broker.settings.heartbeat_interval_s / 2, 0.05)
        while not stop.wait(interval):
            try:
                ended = broker.reap()
                if any(ended.values()):
                    log.info("reaped %s", ended)
            except Exception:  # keep reaping; one failed pass must not stop expiry for good
                log.exception("reaper pass failed")

    def checkpointer():
        # Copies the WAL back into the database often enough to keep up with a busy site (a
        # grant+release appends ~18 KiB), off the request path. At normal priority: starved
        # (by a listing at low priority, say), the WAL grows and every grant slows down.
        while not stop.wait(CHECKPOINT_INTERVAL_S):
            try:
                broker.store.checkpoint()
            except Exception:
                log.exception("WAL checkpoint failed")

    @asynccontextmanager
    async def lifespan(app):
        t = threading.Thread(target=reaper, name="lease-reaper", daemon=True)
        t.start()
        threading.Thread(target=checkpointer, name="wal-checkpoint", daemon=True).start()
        yield
        stop.set()
        listing_worker.shutdown()

    app = BrokerApp(title="jupyter-gpu-attach broker", version=__version__, lifespan=lifespan)
    app.add_middleware(BodyLimit)
    # The 413 of a body over the limit found while reading it (no Content-Length) is raised from
    # inside the request; HTTPException carries it out as a 413, not a 500.

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        # FastAPI's own handler echoes each bad input, and a NaN or Infinity in it (Python's json
        # reads them) made that answer unencodable: a 500 instead of the 422 that names the field.
        return JSONResponse({"detail": _finite(jsonable_encoder(exc.errors()))}, status_code=422)

    @app.exception_handler(BrokerError)
    async def _domain_error(request: Request, exc: BrokerError):
        return JSONResponse(error_body(exc), status_code=exc.status)

    def _who(request: Request) -> Principal:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        who = tokens.lookup(token) if scheme.lower() == "bearer" and token else None
        if who is None:
            raise HTTPException(401, "missing or unknown bearer token (set GPU_ATTACH_TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})
        return who

    # One plain dependency per role: FastAPI's dependency solving is a measurable part of a
    # sub-millisecond request, so no chains of Depends on the per-cell routes.
    async def principal(request: Request) -> Principal:
        return _who(request)

    async def user(request: Request) -> Principal:
        who = _who(request)
        if who.role not in ("user", "admin"):
            raise HTTPException(403, "this token is an agent's; it cannot use leases")
        return who

    async def agent(request: Request) -> Principal:
        who = _who(request)
        if who.role != "agent":
            raise HTTPException(403, "only agents (the agent token) may register and send heartbeats")
        return who

    # Routes are `async def` and call the broker directly on the event loop. Each is one short
    # transaction (a grant is ~0.3 ms on SQLite), serialised by the store's write lock anyway,
    # while handing it to the thread pool cost ~0.3 ms more per request. A deployment whose
    # database is far away (PostgreSQL over a network) should revisit this.

    E = schemas.errors

    # What the per-cell routes do, shared with the fast path (fast_path.py), which answers the
    # well-formed, authorised ones without the framework.
    calls = LeaseCalls(
        grant=lambda who, body: _granted(broker.grant(who, body.slice(), body.session, body.label, body.wait_s)),
        release=lambda who, lease_id: (200, broker.release(who, lease_id)),
        renew=lambda who, lease_id: (200, broker.renew(who, lease_id)),
        lookup=lambda: tokens.lookup)
    app.fast_path = FastPath(functools.partial(FastAPI.__call__, app), calls)

    @app.get("/healthz", response_model=schemas.Health)
    async def healthz():
        return {"ok": True}

    @app.get("/v1/whoami", response_model=schemas.Whoami, responses=E(401))
    async def whoami(who: Principal = Depends(principal)):
        return {"name": who.name, "role": who.role}

    @app.post("/v1/leases", status_code=201, responses={
        201: {"model": schemas.Grant, "description": "granted now"},
        202: {"model": schemas.Queued, "description": "queued (wait_s > 0): poll GET /v1/leases/{id}?wait=S"},
        **E(401, 403, 409, 413, 422)})
    async def request_lease(body: LeaseRequest, who: Principal = Depends(user)):
        return _json(*calls.grant(who, body))

    @app.get("/v1/leases", responses={200: {"model": schemas.LeasePage}, **E(400, 401, 403, 422)})
    async def list_leases(
        who: Principal = Depends(user),
        state: Optional[str] = Query(None, pattern="^(" + "|".join(("queued", *LEASE_STATES)) + ")$"),
        session: Optional[str] = Query(None, max_length=128),
        before: Optional[str] = Query(None, pattern=CURSOR, description="the previous page's `next`"),
        limit: int = Query(100, ge=1, le=1000),
    ):
        """The caller's leases (an admin's: everyone's), newest first, one page at a time. The page
        is read by the listing worker, a process at the lowest CPU priority (listing_worker.py),
        and written as JSON by the database itself (see Store.lease_page_json)."""
        body = await broker.lease_page_bytes(who, state, session, before, limit)
        return Response(body, media_type="application/json")

    @app.get("/v1/leases/{lease_id}", responses={
        200: {"model": schemas.Grant | schemas.Queued | schemas.QueueEnded | schemas.LeaseInfo},
        **E(401, 403, 404, 422)})
    async def get_lease(lease_id: LeaseId, who: Principal = Depends(user),
                        wait: float = Query(0.0, ge=0, le=MAX_POLL_S, description=(
                            "for a queued request: answer as soon as it is granted or ends, or after "
                            "this many seconds (long-poll)"))):
        if wait > 0:
            loop = asyncio.get_running_loop()
            changed = loop.create_future()

            def wake():  # called from whichever thread granted or ended it
                loop.call_soon_threadsafe(lambda: changed.done() or changed.set_result(None))

            w = broker.watch(who, lease_id, wake)
            if w is not None:
                try:
                    await asyncio.wait_for(changed, wait)
                except asyncio.TimeoutError:
                    pass
                finally:
                    broker.unwatch(w, wake)
        return JSONResponse(broker.get(who, lease_id))

    @app.post("/v1/leases/{lease_id}/renew", responses={200: {"model": schemas.Renewed}, **E(401, 403, 404, 409, 422)})
    async def renew_lease(lease_id: LeaseId, who: Principal = Depends(user)):
        return _json(*calls.renew(who, lease_id))

    @app.delete("/v1/leases/{lease_id}", responses={200: {"model": schemas.Ended}, **E(401, 403, 404, 422)})
    async def release_lease(lease_id: LeaseId, who: Principal = Depends(user)):
        return _json(*calls.release(who, lease_id))

    @app.get("/v1/pool", responses={200: {"model": schemas.Pool}, **E(401, 403)})
    async def pool(who: Principal = Depends(user)):
        return JSONResponse(broker.pool())

    def acting_as(who: Principal, agent_id: str) -> None:
        if not who.may_act_as_agent(agent_id):
            raise HTTPException(403, f"this agent token belongs to agent {who.name!r}, not {agent_id!r}")

    @app.post("/v1/agents", status_code=201, responses={201: {"model": schemas.Registered}, **E(401, 403, 409, 413, 422)})
    async def register_agent(body: AgentRegistration, who: Principal = Depends(agent)):
        acting_as(who, body.agent_id)
        return broker.register_agent(body.agent_id, body.address, [d.model_dump() for d in body.devices], body.version)

    @app.post("/v1/agents/{agent_id}/heartbeat", responses={200: {"model": schemas.HeartbeatReply}, **E(401, 403, 409, 422)})
    async def heartbeat(agent_id: AgentId, body: Heartbeat, who: Principal = Depends(agent)):
        acting_as(who, agent_id)
        answer = broker.heartbeat(agent_id, body.incarnation)
        broker.record_busy(agent_id, body.running, body.utilisation)  # usage: which cells ran, how hard
        return answer

    from .admin_routes import admin_router
    from .metrics import metrics_route

    app.include_router(admin_router(broker, tokens, _who))
    metrics_route(app, broker, _who, metrics_token)

    agents.install(app, broker, tokens)  # enrolment, agent keys, lease watch, session ends

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            schema["paths"]["/healthz"]["get"]["security"] = []  # the one route without a token
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def _granted(out: dict) -> tuple[int, dict]:
    return (201 if out["state"] == "granted" else 202), out


def _json(status: int, out: dict) -> Response:
    return Response(orjson.dumps(out), status_code=status, media_type="application/json")


def _finite(x):
    """``x`` with every NaN or infinite float written as a string, so that JSON can carry it."""
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x
