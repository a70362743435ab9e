"""Agent trust on the broker: enrolment, agent keys, the lease watch, session ends.

- **Enrolment.** An admin issues each agent its own credential, bound to its id
  (``POST /v1/agents/{id}/credential``); the broker keeps only its SHA-256 digest. Per-agent
  tokens from the configuration (``GPU_ATTACH_AGENT_TOKENS="id:TOKEN"``) are the other way in.
  The old shared agent token authenticates nothing: it could register or replace any agent.
- **Agent keys.** An enrolled agent registers its Ed25519 public key (``PUT /v1/agents/{id}/key``);
  every grant names it (``agent.public_key``), and the kernel checks that the data port proves it.
- **Lease watch.** ``GET /v1/agents/{id}/leases/{lease}/watch`` answers as soon as the lease is no
  longer granted, or its expiry moved (a renewal): the agent stops a cell within ~100 ms of a
  release, and fences (stops the cell before the TTL) when it cannot get an answer.
- **Cell ends and session ends.** The agent reports the end of a cell's connection
  (``POST .../leases/{lease}/ended``), which frees the slice at once when a kernel dies mid-cell.
  A kernel beats ``POST /v1/sessions/{sid}/alive`` and ends with ``DELETE /v1/sessions/{sid}``;
  agents learn of ended or silent sessions from ``GET /v1/agents/{id}/session-ends`` and reclaim
  their sandboxes within seconds. Beats and ends are kept in the database, so a kernel may beat
  one broker replica while its agent asks another.

Installed by :func:`install` (one line in ``app.py``); nothing in ``core.py`` changes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import time
from typing import Annotated

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import (Column, Float, Index, Integer, LargeBinary, MetaData, String, Table, Text, and_, delete, func,
                        insert, select, update)
from sqlalchemy.exc import IntegrityError

from .auth import ANY_AGENT, Principal, TokenBook
from .store import leases

AgentId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:@-]{1,128}$")]
LeaseId = Annotated[str, Path(pattern=r"^L[0-9a-f]{12}$")]
SessionId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:@-]{1,128}$")]

WATCH_POLL_S = 0.02  # how often a waiting watch looks at the lease: the 100 ms budget, with room
WATCH_MAX_S = 10.0
# A session silent this long (its kernel died) is ended, and its sandbox with it. Generous: a live
# kernel's beat thread can be held off by one long call that keeps the GIL (unpickling a big
# result), and a false end loses what lived only in the sandbox; a dead kernel's sandbox, frozen
# and holding no GPU, costs only host memory meanwhile. Kernels beat timeout / SESSION_BEATS.
SESSION_TIMEOUT_S = 30.0
SESSION_BEATS = 6
SESSION_CHECK_S = 1.0  # how often a replica looks for silent sessions (at most)
SESSION_LATEST_S = 0.25  # how long a replica trusts its copy of the end log's newest entry
MAX_SESSION_EVENTS = 10000
KEY_CACHE_S = 5.0  # how long a replica trusts its cached copy of an agent's public key

_meta = MetaData()
# Defined once: an Index joins its table when made, so a second broker in one process (tests)
# would otherwise carry it twice.
_AGENT_ENDED = Index("ix_leases_agent_ended", leases.c.agent_id, leases.c.ended_at)
agent_identities = Table(
    "agent_identities",
    _meta,
    Column("agent_id", String(128), primary_key=True),
    Column("token_digest", LargeBinary(32), nullable=True, unique=True),  # admin-issued credential
    Column("public_key", Text, nullable=True),  # the agent's Ed25519 key, PEM
    Column("updated_at", Float, nullable=False),
)
# The last beat of each live notebook session (broker wall-clock time).
session_beats = Table(
    "session_beats",
    _meta,
    Column("user", String(128), primary_key=True),
    Column("session", String(128), primary_key=True),
    Column("beat_at", Float, nullable=False),
)
# Sessions that ended (by their kernel, or by its silence), in order: what agents follow.
session_ends = Table(
    "session_ends",
    _meta,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("user", String(128), nullable=False),
    Column("session", String(128), nullable=False),
    Column("at", Float, nullable=False),
)


def fingerprint(public_key_pem: str) -> str:
    """``SHA256:base64`` of the raw Ed25519 key, as ssh prints it."""
    key = serialization.load_pem_public_key(public_key_pem.encode())
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


class AgentKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    public_key: str = Field(..., max_length=1024, description="the agent's Ed25519 public key, PEM")


class CellEnded(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("the cell's connection closed", max_length=200)


class Sessions:
    """Which notebook sessions are alive, and the ordered log of those that ended, kept in the
    broker's database: every replica sees the same beats and the same log, so a kernel that
    beats one replica is not taken for dead by another, whose agents would then kill its sandbox.

    A session is alive from its first beat until its kernel ends it or stops beating for
    ``timeout_s``. (On PostgreSQL two ends committed out of order can leave the later-numbered
    one seen first, and the other missed by an agent that had read past it: that sandbox is then
    reclaimed by the agent's idle limit, as before any of this.)"""

    def __init__(self, store, timeout_s: float = SESSION_TIMEOUT_S, clock=time.time):
        if not timeout_s > 0:
            raise ValueError(f"the session timeout must be positive, not {timeout_s!r} (GPU_ATTACH_SESSION_TIMEOUT_S)")
        self.store, self.timeout_s, self.clock = store, float(timeout_s), clock
        self.beat_s = self.timeout_s / SESSION_BEATS
        self._checked = float("-inf")  # monotonic time of the last look for silent sessions
        self._latest: tuple[float, int] | None = None  # (monotonic time read, newest seq)
        _meta.create_all(store.engine, tables=[session_beats, session_ends])
        # A broker that was down did not hear the beats meanwhile: every session it knew gets a
        # fresh timeout to beat again, rather than being ended for the broker's own absence.
        with store.write() as conn:
            conn.execute(update(session_beats).values(beat_at=self.clock()))

    @staticmethod
    def _key(user: str, session: str):
        return and_(session_beats.c.user == user, session_beats.c.session == session)

    def beat(self, user: str, session: str) -> None:
        try:
            with self.store.write() as conn:
                if not conn.execute(update(session_beats).where(self._key(user, session))
                                    .values(beat_at=self.clock())).rowcount:
                    conn.execute(insert(session_beats).values(user=user, session=session, beat_at=self.clock()))
        except IntegrityError:
            pass  # another replica inserted the same session's first beat at the same moment

    def end(self, user: str, session: str) -> None:
        with self.store.write() as conn:
            conn.execute(delete(session_beats).where(self._key(user, session)))
            self._log(conn, [(user, session)])

    def expire(self) -> None:
        """End the sessions silent for ``timeout_s`` (looks at most every SESSION_CHECK_S)."""
        t = time.monotonic()
        if t - self._checked < min(SESSION_CHECK_S, self.timeout_s / 4):
            return
        self._checked = t
        cutoff = self.clock() - self.timeout_s
        with self.store.read() as conn:
            silent = conn.execute(select(session_beats.c.user, session_beats.c.session)
                                  .where(session_beats.c.beat_at < cutoff).limit(1000)).all()
        if not silent:
            return
        with self.store.write() as conn:
            # Only the replica whose delete finds the row still silent logs the end: once.
            gone = [(u, s) for u, s in silent
                    if conn.execute(delete(session_beats).where(
                        and_(self._key(u, s), session_beats.c.beat_at < cutoff))).rowcount]
            self._log(conn, gone)

    def _log(self, conn, ended: list[tuple[str, str]]) -> None:
        if not ended:
            return
        now = self.clock()
        conn.execute(insert(session_ends), [{"user": u, "session": s, "at": now} for u, s in ended])
        newest = conn.execute(select(func.max(session_ends.c.seq))).scalar() or 0
        conn.execute(delete(session_ends).where(session_ends.c.seq <= newest - MAX_SESSION_EVENTS))
        self._latest = None  # read again: agents waiting on this replica hear of it at once

    def _newest(self, fresh: bool = False) -> int:
        t = time.monotonic()
        if fresh or self._latest is None or t - self._latest[0] > SESSION_LATEST_S:
            with self.store.read() as conn:
                self._latest = (t, conn.execute(select(func.max(session_ends.c.seq))).scalar() or 0)
        return self._latest[1]

    def since(self, seq: int) -> tuple[int, list[list[str]]]:
        """The log's newest seq, and the sessions that ended after ``seq`` (1000 at most; then the
        seq returned is the last of those, so the next call goes on from there)."""
        newest = self._newest()
        if seq > newest:  # another replica logged an end since this one looked, or a new database
            newest = self._newest(fresh=True)
            if seq > newest:  # a new database: its log starts again
                seq = 0
        if seq >= newest:
            return newest, []
        with self.store.read() as conn:
            rows = conn.execute(select(session_ends.c.seq, session_ends.c.user, session_ends.c.session)
                                .where(session_ends.c.seq > seq).order_by(session_ends.c.seq).limit(1000)).all()
        if len(rows) == 1000:
            return rows[-1].seq, [[r.user, r.session] for r in rows]
        return max(newest, rows[-1].seq) if rows else newest, [[r.user, r.session] for r in rows]


class AgentTrust:
    """Agent credentials and keys, stored by the broker beside its own tables."""

    def __init__(self, store):
        self.store = store
        _meta.create_all(store.engine)
        # The lease-end feed asks "which of this agent's leases ended since T" every few ms.
        _AGENT_ENDED.create(store.engine, checkfirst=True)
        # agent id -> (key PEM or None, its fingerprint, when read). Every grant names its agent's
        # key, so it is read from the table at most once per KEY_CACHE_S per agent (an agent
        # without a key too); another replica's change is seen within that time.
        self._keys: dict[str, tuple[str | None, str | None, float]] = {}
        self._tokens: dict[bytes, str | None] = {}

    def issue(self, agent_id: str) -> str:
        token = "gpa_" + secrets.token_urlsafe(32)
        digest = hashlib.sha256(token.encode()).digest()
        with self.store.write() as conn:
            old = conn.execute(select(agent_identities.c.token_digest)
                               .where(agent_identities.c.agent_id == agent_id)).first()
            if old is None:
                conn.execute(insert(agent_identities).values(agent_id=agent_id, token_digest=digest,
                                                             updated_at=time.time()))
            else:
                conn.execute(update(agent_identities).where(agent_identities.c.agent_id == agent_id)
                             .values(token_digest=digest, updated_at=time.time()))
        if old is not None and old.token_digest is not None:
            self._tokens.pop(old.token_digest, None)
        self._tokens[digest] = agent_id
        return token

    def revoke(self, agent_id: str) -> bool:
        with self.store.write() as conn:
            n = conn.execute(update(agent_identities).where(agent_identities.c.agent_id == agent_id)
                             .values(token_digest=None, updated_at=time.time())).rowcount
        self._tokens = {d: a for d, a in self._tokens.items() if a != agent_id}
        return bool(n)

    def agent_for_token(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode()).digest()
        if digest not in self._tokens:
            with self.store.read() as conn:
                row = conn.execute(select(agent_identities.c.agent_id)
                                   .where(agent_identities.c.token_digest == digest)).first()
            if row is None:
                return None  # unknown tokens are not cached: a flood of them costs no memory
            self._tokens[digest] = row.agent_id
        return self._tokens[digest]

    def set_key(self, agent_id: str, pem: str) -> str:
        try:
            key = serialization.load_pem_public_key(pem.encode())
        except ValueError:
            raise HTTPException(422, "public_key is not a PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise HTTPException(422, "public_key must be an Ed25519 key")
        with self.store.write() as conn:
            n = conn.execute(update(agent_identities).where(agent_identities.c.agent_id == agent_id)
                             .values(public_key=pem, updated_at=time.time())).rowcount
            if not n:
                conn.execute(insert(agent_identities).values(agent_id=agent_id, public_key=pem,
                                                             updated_at=time.time()))
        self._keys[agent_id] = (pem, fingerprint(pem), time.monotonic())
        return fingerprint(pem)

    def key(self, agent_id: str) -> str | None:
        return self._key(agent_id)[0]

    def _key(self, agent_id: str) -> tuple[str | None, str | None]:
        cached = self._keys.get(agent_id)
        t = time.monotonic()
        if cached is None or t - cached[2] > KEY_CACHE_S:
            with self.store.read() as conn:
                row = conn.execute(select(agent_identities.c.public_key)
                                   .where(agent_identities.c.agent_id == agent_id)).first()
            pem = row.public_key if row is not None else None
            cached = self._keys[agent_id] = (pem, fingerprint(pem) if pem else None, t)
        return cached[0], cached[1]

    def name_agent(self, grant: dict) -> dict:
        """Add the granted agent's public key to a grant, so the kernel can check who answers."""
        agent = grant.get("agent") if isinstance(grant, dict) else None
        if isinstance(agent, dict) and agent.get("id"):
            pem, fp = self._key(agent["id"])
            if pem:
                agent["public_key"] = pem
                agent["fingerprint"] = fp
        return grant


def _session_timeout() -> float:
    raw = os.environ.get("GPU_ATTACH_SESSION_TIMEOUT_S", str(SESSION_TIMEOUT_S))
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"GPU_ATTACH_SESSION_TIMEOUT_S={raw!r} is not a number of seconds (default "
                         f"{SESSION_TIMEOUT_S:g})") from None


def install(app: FastAPI, broker, tokens: TokenBook, sessions: Sessions | None = None) -> AgentTrust:
    """Add agent enrolment, keys, the lease watch and session ends to the broker's app."""
    trust = AgentTrust(broker.store)
    sessions = sessions or Sessions(broker.store, _session_timeout())
    app.state.agent_trust, app.state.sessions = trust, sessions

    # Credentials: config tokens (by digest, in the TokenBook) and admin-issued ones (in the
    # database); the shared agent token ("*") no longer authenticates anything.
    book_lookup = tokens.lookup

    def lookup(token: str) -> Principal | None:
        who = book_lookup(token)
        if who is not None:
            return None if (who.role == "agent" and who.name == ANY_AGENT) else who
        agent_id = trust.agent_for_token(token)
        return Principal(agent_id, "agent") if agent_id else None

    tokens.lookup = lookup

    # Every grant names its agent's key. (Wrapped here so core.py stays free of agent trust.)
    # Every grant (made at once, or later from the queue) names its agent's key.
    plain_grant_json = broker._grant_json
    broker._grant_json = lambda *a, **k: trust.name_agent(plain_grant_json(*a, **k))

    def who(request: Request) -> Principal:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        found = tokens.lookup(token) if scheme.lower() == "bearer" and token else None
        if found is None:
            raise HTTPException(401, "missing or unknown bearer token", headers={"WWW-Authenticate": "Bearer"})
        return found

    async def admin(request: Request) -> Principal:
        p = who(request)
        if not p.is_admin:
            raise HTTPException(403, "only the admin may enrol agents")
        return p

    async def user(request: Request) -> Principal:
        p = who(request)
        if p.role not in ("user", "admin"):
            raise HTTPException(403, "this token is an agent's; it cannot act for a notebook session")
        return p

    async def any_principal(request: Request) -> Principal:
        return who(request)

    def agent_as(agent_id: str, p: Principal) -> None:
        if p.role != "agent" or p.name != agent_id:
            raise HTTPException(403, f"only agent {agent_id!r}, with its own credential, may do this")

    async def agent_principal(request: Request) -> Principal:
        return who(request)

    from .schemas import errors

    # Every refusal these routes can answer, in the OpenAPI document (which the tests fuzz).
    r = APIRouter(responses=errors(400, 401, 403, 404, 409, 422))

    @r.post("/v1/agents/{agent_id}/credential", status_code=201)
    async def issue_credential(agent_id: AgentId, _: Principal = Depends(admin)):
        """Enrol an agent: a new credential bound to ``agent_id`` (an earlier one stops working)."""
        return {"agent_id": agent_id, "token": trust.issue(agent_id)}

    @r.delete("/v1/agents/{agent_id}/credential")
    async def revoke_credential(agent_id: AgentId, _: Principal = Depends(admin)):
        return {"agent_id": agent_id, "revoked": trust.revoke(agent_id)}

    @r.put("/v1/agents/{agent_id}/key")
    async def register_key(agent_id: AgentId, body: AgentKey, p: Principal = Depends(agent_principal)):
        agent_as(agent_id, p)
        return {"agent_id": agent_id, "fingerprint": trust.set_key(agent_id, body.public_key)}

    @r.get("/v1/agents/{agent_id}/identity")
    async def identity(agent_id: AgentId, _: Principal = Depends(any_principal)):
        pem = trust.key(agent_id)
        if pem is None:
            raise HTTPException(404, f"agent {agent_id!r} has registered no key")
        return {"agent_id": agent_id, "public_key": pem, "fingerprint": fingerprint(pem)}

    def lease_state(lease_id: str, agent_id: str):
        with broker.store.read() as conn:
            row = conn.execute(select(leases.c.state, leases.c.expires_at, leases.c.agent_id, leases.c.end_reason)
                               .where(leases.c.id == lease_id)).first()
        if row is None or row.agent_id != agent_id:
            raise HTTPException(404, f"agent {agent_id!r} holds no lease {lease_id!r}")
        return row

    @r.get("/v1/agents/{agent_id}/leases/{lease_id}/watch")
    async def watch_lease(agent_id: AgentId, lease_id: LeaseId, p: Principal = Depends(agent_principal),
                          known: float = Query(0.0, description="the expiry the agent knows"),
                          wait: float = Query(5.0, ge=0, le=WATCH_MAX_S)):
        """Answer once the lease ended or its expiry moved, or after ``wait`` seconds."""
        agent_as(agent_id, p)
        end = time.monotonic() + wait
        while True:
            row = lease_state(lease_id, agent_id)
            t = time.time()
            live = row.state == "granted" and row.expires_at >= t
            if not live or row.expires_at != known or time.monotonic() >= end:
                return {"id": lease_id, "state": row.state if row.state != "granted" or live else "expired",
                        "expires_at": row.expires_at, "now": t, "end_reason": row.end_reason}
            await asyncio.sleep(WATCH_POLL_S)

    @r.get("/v1/agents/{agent_id}/lease-ends")
    async def lease_ends(agent_id: AgentId, p: Principal = Depends(agent_principal),
                         since: float | None = Query(None, description="broker time of the last answer's 'until'"),
                         wait: float = Query(5.0, ge=0, le=WATCH_MAX_S)):
        """The agent's leases that ended (released, expired, revoked, failed) after ``since``:
        the agent refuses their grants and stops their cells. Answers at once when there are some."""
        agent_as(agent_id, p)
        if since is None:
            return {"until": time.time(), "ended": []}
        end = time.monotonic() + wait
        while True:
            t = time.time()
            with broker.store.read() as conn:
                rows = conn.execute(select(leases.c.id, leases.c.ended_at).where(
                    and_(leases.c.agent_id == agent_id, leases.c.ended_at > since))).all()
            if rows or time.monotonic() >= end:
                # Overlap the next window a little: an end whose transaction committed late is
                # delivered twice rather than never.
                until = max([since, *(r.ended_at for r in rows)]) if rows else max(since, t - 1.0)
                return {"until": until, "ended": [r.id for r in rows]}
            await asyncio.sleep(WATCH_POLL_S)

    @r.post("/v1/agents/{agent_id}/leases/{lease_id}/ended")
    async def cell_ended(agent_id: AgentId, lease_id: LeaseId, body: CellEnded,
                         p: Principal = Depends(agent_principal)):
        """The agent saw the cell's connection close: the grant can admit nothing more, so the
        slice is free at once (a kernel killed mid-cell holds it no longer than this)."""
        agent_as(agent_id, p)
        lease_state(lease_id, agent_id)
        with broker.store.write() as conn:
            ended = broker.store.end_lease(conn, lease_id, "released", f"agent: {body.reason}"[:256], time.time())
        return {"id": lease_id, "released": ended}

    @r.get("/v1/agents/{agent_id}/session-ends")
    async def session_ends(agent_id: AgentId, p: Principal = Depends(agent_principal),
                           since: int = Query(0, ge=0), wait: float = Query(5.0, ge=0, le=WATCH_MAX_S)):
        agent_as(agent_id, p)
        end = time.monotonic() + wait
        while True:
            sessions.expire()
            seq, ended = sessions.since(since)
            if ended or time.monotonic() >= end or seq < since:
                return {"seq": seq, "ended": ended}
            await asyncio.sleep(WATCH_POLL_S * 5)

    @r.post("/v1/sessions/{session_id}/alive")
    async def session_alive(session_id: SessionId, p: Principal = Depends(user)):
        """The notebook's kernel is alive: its sandboxes stay. A session that stops beating for
        ``timeout_s`` is ended (its kernel died), and agents reclaim its sandboxes. Beat every
        ``beat_s``; the first beat starts the watch."""
        sessions.beat(p.name, session_id)
        return {"session": session_id, "beat_s": sessions.beat_s, "timeout_s": sessions.timeout_s}

    @r.delete("/v1/sessions/{session_id}")
    async def end_session(session_id: SessionId, p: Principal = Depends(user)):
        """The notebook's kernel shuts down: agents reclaim the session's sandboxes now."""
        sessions.end(p.name, session_id)
        return {"session": session_id, "ended": True}

    app.include_router(r)
    return trust
