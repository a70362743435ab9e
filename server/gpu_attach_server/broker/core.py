"""The broker's domain operations: agents join and beat, leases are granted, renewed and ended.

Plain Python over :class:`Store`; the FastAPI routes in ``app.py`` are thin shells around it.
"""

from __future__ import annotations

import json
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, insert, select, update

from jupyter_gpu_attach.slices import SliceRequest

from ..grant_tokens import GrantSigner
from . import scheduler
from .auth import Principal
from .store import Store, agents, gpus, lease_gpus, leases, now

LEASE_STATES = ("granted", "released", "expired", "revoked", "failed")


class BrokerError(Exception):
    status = 400
    reason = "bad_request"

    def __init__(self, message: str, **extra: Any):
        super().__init__(message)
        self.extra = extra


class NotFound(BrokerError):
    status, reason = 404, "not_found"


class Forbidden(BrokerError):
    status, reason = 403, "forbidden"


class Conflict(BrokerError):
    status, reason = 409, "conflict"


class NoCapacity(BrokerError):
    """No GPU can take the request now (``busy``) or ever (``too_large``)."""

    status = 409

    def __init__(self, message: str, never: bool):
        super().__init__(message)
        self.reason = "too_large" if never else "busy"


@dataclass
class BrokerSettings:
    lease_ttl_s: float = 30.0
    heartbeat_interval_s: float = 2.0
    # An agent that has not beaten for this long is down and its leases fail.
    agent_timeout_s: float = 10.0


class Broker:
    def __init__(self, store: Store, signer: GrantSigner, settings: BrokerSettings | None = None):
        self.store = store
        self.signer = signer
        self.settings = settings or BrokerSettings()
        # Which GPUs each (user, session) used last: a placement hint, so a session's next cell
        # lands where its sandbox is warm. Only a hint, so it lives in memory, per replica.
        self._affinity: OrderedDict[tuple[str, str], frozenset[str]] = OrderedDict()

    def _remember(self, user: str, session: str, gpu_ids: frozenset[str]) -> None:
        key = (user, session)
        self._affinity[key] = gpu_ids
        self._affinity.move_to_end(key)
        while len(self._affinity) > 10000:
            self._affinity.popitem(last=False)

    # -- agents ---------------------------------------------------------------------------------

    def register_agent(self, agent_id: str, address: str, devices: list[dict[str, Any]], version: str) -> dict:
        """An agent (re)joins: its previous incarnation's leases fail, its inventory is replaced."""
        t = now()
        incarnation = secrets.token_hex(8)
        with self.store.write() as conn:
            live = conn.execute(select(agents.c.address).where(and_(
                agents.c.id == agent_id, agents.c.state == "up",
                agents.c.last_heartbeat >= t - self.settings.agent_timeout_s))).first()
            if live is not None and live.address != address:
                raise Conflict(f"agent id {agent_id!r} is in use by a live agent at {live.address}; give this "
                               "agent another --name, or wait until that one stops beating")
            self.store.end_leases(conn, leases.c.agent_id == agent_id, "failed", "agent restarted", t)
            row = dict(id=agent_id, address=address, incarnation=incarnation, state="up",
                       registered_at=t, last_heartbeat=t, version=version)
            if conn.execute(select(agents.c.id).where(agents.c.id == agent_id)).first():
                conn.execute(update(agents).where(agents.c.id == agent_id).values(**row))
            else:
                conn.execute(insert(agents).values(**row))
            conn.execute(update(gpus).where(gpus.c.agent_id == agent_id).values(present=False))
            for d in devices:
                gpu_id = f"{agent_id}/{d['index']}"
                values = dict(agent_id=agent_id, idx=d["index"], uuid=d["uuid"], model=d["model"],
                              memory=d["memory"], simulated=d["simulated"], pool=d.get("pool") or "default",
                              present=True)
                if conn.execute(select(gpus.c.id).where(gpus.c.id == gpu_id)).first():
                    conn.execute(update(gpus).where(gpus.c.id == gpu_id).values(**values))
                else:
                    conn.execute(insert(gpus).values(id=gpu_id, **values))
        return {
            "agent_id": agent_id,
            "incarnation": incarnation,
            "public_key": self.signer.public_key_pem(),
            "heartbeat_interval_s": self.settings.heartbeat_interval_s,
        }

    def heartbeat(self, agent_id: str, incarnation: str) -> dict:
        """Record that the agent lives; answer with its leases that are still granted.

        The agent stops any cell whose lease is not in the answer (released, expired, revoked).
        """
        t = now()
        with self.store.write() as conn:
            row = conn.execute(select(agents.c.incarnation, agents.c.state).where(agents.c.id == agent_id)).first()
            if row is None or row.incarnation != incarnation or row.state != "up":
                raise Conflict("agent is not registered under this incarnation; register again", reregister=True)
            conn.execute(update(agents).where(agents.c.id == agent_id).values(last_heartbeat=t))
            active = conn.execute(
                select(leases.c.id, leases.c.expires_at).where(
                    and_(leases.c.agent_id == agent_id, leases.c.state == "granted", leases.c.expires_at >= t)
                )
            ).all()
        return {"active": {r.id: r.expires_at for r in active}}

    def reap(self) -> dict[str, list[str]]:
        """Expire leases past their TTL and take down agents that stopped beating."""
        t = now()
        with self.store.write() as conn:
            expired = self.store.end_leases(conn, leases.c.expires_at < t, "expired", "not renewed before its TTL", t)
            dead = [r[0] for r in conn.execute(select(agents.c.id).where(
                and_(agents.c.state == "up", agents.c.last_heartbeat < t - self.settings.agent_timeout_s)))]
            failed: list[str] = []
            if dead:
                conn.execute(update(agents).where(agents.c.id.in_(dead)).values(state="down"))
                failed = self.store.end_leases(
                    conn, leases.c.agent_id.in_(dead), "failed",
                    f"agent stopped sending heartbeats for {self.settings.agent_timeout_s:g} s", t)
        return {"expired": expired, "agents_down": dead, "failed": failed}

    # -- leases ---------------------------------------------------------------------------------

    def grant(self, who: Principal, request: SliceRequest, session: str, label: str = "") -> dict:
        """Place ``request`` and record the lease, or raise :class:`NoCapacity` with the reason."""
        t = now()
        ttl = self.settings.lease_ttl_s
        with self.store.hot() as conn:
            self.store.lock_gpus(conn)
            up = self.store.gpus_up(conn)
            allocs = self.store.active_allocations(conn, t)
            try:
                placement = scheduler.place(
                    request,
                    [_gpu(r) for r in up],
                    [scheduler.Allocation(gpu_id, memory) for gpu_id, memory, _ in allocs],
                    prefer_gpu_ids=self._affinity.get((who.name, session), frozenset()),
                )
            except scheduler.NoFit as e:
                raise NoCapacity(str(e), e.never) from None
            first = next(r for r in up if r["id"] == placement.gpus[0].id)
            lease_id = "L" + secrets.token_hex(6)
            whole = request.or_default().gpus is not None
            self.store.insert_lease(conn, dict(
                id=lease_id, user=who.name, session=session, state="granted",
                request=json.dumps(request.to_json()), agent_id=first["agent_id"],
                agent_incarnation=first["incarnation"], fraction=placement.fraction_per_gpu,
                created_at=t, granted_at=t, expires_at=t + ttl, ended_at=None, end_reason=None,
                label=label[:256]),
                [(g.id, g.memory if whole else placement.memory_per_gpu) for g in placement.gpus])
        self._remember(who.name, session, frozenset(g.id for g in placement.gpus))
        devices = [_device_json(next(r for r in up if r["id"] == g.id)) for g in placement.gpus]
        memory = placement.memory_per_gpu
        token = self._sign(lease_id, who.name, session, first["agent_id"], devices, memory, t + ttl)
        return {
            "id": lease_id, "state": "granted", "user": who.name, "session": session,
            "agent": {"id": first["agent_id"], "address": first["address"]},
            "gpus": devices, "memory_per_gpu": memory, "fraction": placement.fraction_per_gpu,
            "simulated": all(d["simulated"] for d in devices),
            "granted_at": t, "expires_at": t + ttl, "ttl_s": ttl, "token": token,
        }

    def renew(self, who: Principal, lease_id: str) -> dict:
        """Extend a granted lease by its TTL and sign a fresh grant token; an ended or late lease
        stays ended (a late one is recorded as expired)."""
        t = now()
        expires = t + self.settings.lease_ttl_s
        with self.store.write() as conn:
            row = self._owned(conn, who, lease_id)
            # One conditional update decides, so a release or the reaper in between cannot be undone.
            renewed = conn.execute(update(leases).where(and_(
                leases.c.id == lease_id, leases.c.state == "granted", leases.c.expires_at >= t,
            )).values(expires_at=expires)).rowcount
            if not renewed and row.state == "granted":
                self.store.end_lease(conn, lease_id, "expired", "not renewed before its TTL", t)
            if renewed:
                devices = [_device_json(dict(r._mapping)) for r in conn.execute(
                    select(gpus).join(lease_gpus, lease_gpus.c.gpu_id == gpus.c.id)
                    .where(lease_gpus.c.lease_id == lease_id).order_by(gpus.c.idx))]
                memory = conn.execute(select(lease_gpus.c.memory).where(lease_gpus.c.lease_id == lease_id)).scalar()
        if not renewed:
            if row.state != "granted":
                raise Conflict(f"lease {lease_id} is {row.state} ({row.end_reason}); request a new one", state=row.state)
            raise Conflict(f"lease {lease_id} expired before it was renewed; request a new one", state="expired")
        token = self._sign(lease_id, row.user, row.session, row.agent_id, devices, memory, expires)
        return {"id": lease_id, "state": "granted", "expires_at": expires, "token": token}

    def release(self, who: Principal, lease_id: str, reason: str = "released by its owner") -> dict:
        """End a lease and free its slice at once. Releasing an ended lease changes nothing."""
        t = now()
        with self.store.hot() as conn:
            row = self._owned(conn, who, lease_id)
            if self.store.end_lease(conn, lease_id, "released", reason[:256], t):
                return {"id": lease_id, "state": "released", "ended_at": t, "end_reason": reason}
        return {"id": lease_id, "state": row.state, "ended_at": row.ended_at, "end_reason": row.end_reason}

    def get(self, who: Principal, lease_id: str) -> dict:
        with self.store.read() as conn:
            row = self._owned(conn, who, lease_id)
            return self._lease_json(conn, row)

    def list_leases(self, who: Principal, state: str | None = None, session: str | None = None,
                    limit: int = 100) -> list[dict]:
        """The caller's leases, newest first; an admin sees everyone's."""
        q = select(leases).order_by(leases.c.created_at.desc()).limit(limit)
        if not who.is_admin:
            q = q.where(leases.c.user == who.name)
        if state:
            q = q.where(leases.c.state == state)
        if session:
            q = q.where(leases.c.session == session)
        with self.store.read() as conn:
            return [self._lease_json(conn, r) for r in conn.execute(q).all()]

    def pool(self) -> dict:
        """Every GPU with its free and used share, and each agent's state."""
        t = now()
        with self.store.read() as conn:
            rows = conn.execute(
                select(gpus, agents.c.state.label("agent_state"), agents.c.address)
                .join(agents, agents.c.id == gpus.c.agent_id)
                .where(gpus.c.present.is_(True)).order_by(gpus.c.id)).all()
            allocs = conn.execute(
                select(lease_gpus.c.gpu_id, lease_gpus.c.memory, leases.c.id, leases.c.user)
                .join(leases, leases.c.id == lease_gpus.c.lease_id)
                .where(and_(lease_gpus.c.active.is_(True), leases.c.expires_at >= t))).all()
        out = []
        for r in rows:
            mine = [a for a in allocs if a.gpu_id == r.id]
            used = sum(a.memory for a in mine)
            out.append({
                "id": r.id, "agent": r.agent_id, "agent_state": r.agent_state, "index": r.idx,
                "model": r.model, "simulated": r.simulated, "pool": r.pool, "memory": r.memory,
                "used_memory": used, "free_memory": r.memory - used,
                "used_share": round(used / r.memory, 4) if r.memory else 0.0,
                "free_share": round(1 - used / r.memory, 4) if r.memory else 0.0,
                "leases": [a.id for a in mine],
            })
        return {"gpus": out, "time": t}

    # -- helpers --------------------------------------------------------------------------------

    def _owned(self, conn, who: Principal, lease_id: str):
        row = self.store.lease_row(conn, lease_id)
        if row is None:
            raise NotFound(f"no lease {lease_id!r}")
        if row.user != who.name and not who.is_admin:
            raise Forbidden(f"lease {lease_id} belongs to another user")
        return row

    @staticmethod
    def _lease_json(conn, row) -> dict:
        slots = conn.execute(select(lease_gpus.c.gpu_id, lease_gpus.c.memory)
                             .where(lease_gpus.c.lease_id == row.id).order_by(lease_gpus.c.gpu_id)).all()
        return {
            "id": row.id, "state": row.state, "user": row.user, "session": row.session,
            "request": json.loads(row.request), "agent_id": row.agent_id,
            "gpus": [s.gpu_id for s in slots], "memory_per_gpu": slots[0].memory if slots else 0,
            "fraction": row.fraction, "granted_at": row.granted_at, "expires_at": row.expires_at,
            "ended_at": row.ended_at, "end_reason": row.end_reason, "label": row.label,
        }

    def _sign(self, lease_id, user, session, agent_id, devices, memory, expires) -> str:
        return self.signer.sign({
            "lease": lease_id, "user": user, "session": session, "agent": agent_id,
            "gpus": [d["index"] for d in devices], "uuids": [d["uuid"] for d in devices],
            "memory": memory, "simulated": all(d["simulated"] for d in devices),
            "exp": expires, "iat": now(),
        })




def _gpu(r: dict) -> scheduler.GPU:
    return scheduler.GPU(r["id"], r["agent_id"], r["idx"], r["model"], r["memory"], r["simulated"], r["pool"])


def _device_json(r: dict) -> dict:
    return {"id": r["id"], "index": r["idx"], "uuid": r["uuid"], "model": r["model"],
            "memory": r["memory"], "simulated": bool(r["simulated"]), "pool": r["pool"]}
