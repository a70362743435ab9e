"""What an admin can see and steer: agents, GPUs, leases and the queue; revocation; drains;
users, groups and quotas; user tokens (stored hashed); usage accounting; the audit log.

Plain Python over :class:`Store` and :class:`Broker`; ``admin_routes.py`` is the thin HTTP shell.
Every change is written with its audit record in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections import defaultdict
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update

from .auth import Principal, TokenBook
from .core import Broker, Conflict, NotFound
from .site_tables import audit, drains, lease_busy, quotas, user_tokens, users
from .store import agents, gpus, lease_gpus, leases, now

#: How long a token created through the API is trusted from cache before the database is asked
#: again: a revocation (on any replica) takes effect within this.
TOKEN_CACHE_S = 5.0


class UserTokens:
    """API-made user tokens: only their SHA-256 is stored; :meth:`lookup` plugs into TokenBook."""

    def __init__(self, broker: Broker):
        self.store = broker.store
        self._cache: dict[bytes, tuple[Principal | None, float]] = {}
        self._lock = threading.Lock()

    def lookup(self, digest: bytes) -> Principal | None:
        t = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None and hit[1] > t:
            return hit[0]
        with self.store.read() as conn:
            row = conn.execute(select(user_tokens.c.user).where(and_(
                user_tokens.c.digest == digest.hex(), user_tokens.c.revoked_at.is_(None)))).first()
        who = Principal(row.user, "user") if row else None
        with self._lock:
            if len(self._cache) > 10000:
                self._cache.clear()  # unknown tokens must not grow memory without bound
            self._cache[digest] = (who, t + TOKEN_CACHE_S)
        return who

    def forget(self) -> None:
        with self._lock:
            self._cache.clear()


class SiteAdmin:
    def __init__(self, broker: Broker, tokens: TokenBook):
        self.broker = broker
        self.store = broker.store
        self.tokens = UserTokens(broker)
        self.book = tokens
        tokens.fallback = self.tokens.lookup

    def _audit(self, conn, actor: str, action: str, target: str, **detail: Any) -> None:
        conn.execute(insert(audit).values(at=now(), actor=actor, action=action, target=target[:160],
                                          detail=json.dumps(detail, default=str)[:4000]))

    # -- seeing the pool ------------------------------------------------------------------------

    def agents(self) -> list[dict]:
        t = now()
        with self.store.read() as conn:
            rows = conn.execute(select(agents)).all()
            counts = dict(conn.execute(select(gpus.c.agent_id, func.count()).where(gpus.c.present.is_(True))
                                       .group_by(gpus.c.agent_id)).all())
        drained = self.broker.policy.drained
        return [{"id": r.id, "address": r.address, "state": r.state, "version": r.version,
                 "registered_at": r.registered_at, "last_heartbeat_age_s": round(t - r.last_heartbeat, 3),
                 "gpus": counts.get(r.id, 0), "drained": r.id in drained} for r in sorted(rows, key=lambda r: r.id)]

    def gpus(self) -> list[dict]:
        drained = self.broker.policy.drained
        return [dict(g, drained=g["id"] in drained or g["agent"] in drained) for g in self.broker.pool()["gpus"]]

    def leases(self, who: Principal, user: str | None, state: str | None, before: str | None, limit: int) -> dict:
        # The queue has its own view (/v1/admin/queue): this one lists leases only.
        page = self.broker.lease_page(who, state, None, before, limit, user=user, queued=False)
        t = now()
        for lease in page["leases"]:
            lease["age_s"] = round((lease["ended_at"] or t) - lease["granted_at"], 3)
        return page

    # -- steering -------------------------------------------------------------------------------

    def revoke(self, actor: str, lease_id: str, reason: str) -> dict:
        """End a lease now; its agent stops the running cell at its next heartbeat, and the cell's
        next renewal is answered with this reason."""
        why = f"revoked by an admin: {reason}" if reason else "revoked by an admin"
        out = self.broker.release(Principal(actor, "admin"), lease_id, why, state="revoked")
        with self.store.write() as conn:
            self._audit(conn, actor, "lease.revoke", lease_id, reason=reason, result=out["state"])
        return out

    def drain(self, actor: str, kind: str, target: str, reason: str, on: bool) -> dict:
        """Drain (no new grants; running cells finish) or undrain an agent or a GPU."""
        with self.store.write() as conn:
            table, col = (agents, agents.c.id) if kind == "agent" else (gpus, gpus.c.id)
            if conn.execute(select(col).where(col == target)).first() is None:
                raise NotFound(f"no {kind} {target!r}; see `gpu-attach admin {kind}s`")
            conn.execute(delete(drains).where(drains.c.target == target))
            if on:
                conn.execute(insert(drains).values(target=target, kind=kind, since=now(), reason=reason[:256]))
            self._audit(conn, actor, f"{kind}.{'drain' if on else 'undrain'}", target, reason=reason)
        self.broker.reload_policy()
        if not on:
            self.broker.dispatch()
        return {"target": target, "kind": kind, "drained": on}

    # -- users, groups, quotas ------------------------------------------------------------------

    def users(self) -> list[dict]:
        with self.store.read() as conn:
            rows = {r.name: r for r in conn.execute(select(users))}
            token_users = {r[0] for r in conn.execute(select(user_tokens.c.user).where(user_tokens.c.revoked_at.is_(None)))}
        names = set(rows) | token_users | self.book.names("user")
        t = now()
        out = []
        for name in sorted(names):
            r = rows.get(name)
            group = r.group if r else None
            out.append({"name": name, "group": group, "priority": r.priority if r else 0,
                        "usage_gpu_s": round(self.broker.fair_share.usage(self.broker._share_key(name, group or ""), t), 3)})
        return out

    def set_user(self, actor: str, name: str, group: str | None, priority: int) -> dict:
        with self.store.write() as conn:
            values = {"group": group, "priority": priority}
            if conn.execute(select(users.c.name).where(users.c.name == name)).first():
                conn.execute(update(users).where(users.c.name == name).values(**values))
            else:
                conn.execute(insert(users).values(name=name, created_at=now(), **values))
            self._audit(conn, actor, "user.set", name, **values)
        self.broker.reload_policy()
        return {"name": name, **values}

    def delete_user(self, actor: str, name: str) -> dict:
        with self.store.write() as conn:
            if not conn.execute(delete(users).where(users.c.name == name)).rowcount:
                raise NotFound(f"no user record {name!r} (users known only by their token have none to delete)")
            self._audit(conn, actor, "user.delete", name)
        self.broker.reload_policy()
        return {"name": name, "deleted": True}

    def groups(self) -> list[dict]:
        policy = self.broker.policy
        names = {g for g, _ in policy.users.values() if g} | {s for k, s in policy.quotas if k == "group"}
        return [{"name": g, "members": sorted(policy.members(g)),
                 "quota": policy.quotas[("group", g)].to_json() if ("group", g) in policy.quotas else None}
                for g in sorted(names)]

    def quotas(self) -> list[dict]:
        return [q.to_json() for _, q in sorted(self.broker.policy.quotas.items())]

    def set_quota(self, actor: str, kind: str, subject: str, max_share, max_memory, max_lease_s,
                  borrow: bool = False) -> dict:
        values = dict(max_share=max_share, max_memory=max_memory, max_lease_s=max_lease_s, borrow=bool(borrow),
                      updated_at=now())
        with self.store.write() as conn:
            key = and_(quotas.c.kind == kind, quotas.c.subject == subject)
            if conn.execute(select(quotas.c.kind).where(key)).first():
                conn.execute(update(quotas).where(key).values(**values))
            else:
                conn.execute(insert(quotas).values(kind=kind, subject=subject, **values))
            self._audit(conn, actor, "quota.set", f"{kind}:{subject}", **values)
        self.broker.reload_policy()
        self.broker.dispatch()  # a raised quota may admit a queued request
        return self.broker.policy.quotas[(kind, subject)].to_json()

    def delete_quota(self, actor: str, kind: str, subject: str) -> dict:
        with self.store.write() as conn:
            n = conn.execute(delete(quotas).where(and_(quotas.c.kind == kind, quotas.c.subject == subject))).rowcount
            if not n:
                raise NotFound(f"no quota for {kind} {subject!r}")
            self._audit(conn, actor, "quota.delete", f"{kind}:{subject}")
        self.broker.reload_policy()
        self.broker.dispatch()
        return {"kind": kind, "subject": subject, "deleted": True}

    # -- tokens ---------------------------------------------------------------------------------

    def create_token(self, actor: str, user: str, label: str) -> dict:
        """A new user token. It is shown once, here; the broker keeps only its SHA-256."""
        token = secrets.token_urlsafe(32)
        token_id = "T" + secrets.token_hex(6)
        with self.store.write() as conn:
            conn.execute(insert(user_tokens).values(
                id=token_id, digest=hashlib.sha256(token.encode()).hexdigest(), user=user, label=label,
                created_at=now(), revoked_at=None))
            self._audit(conn, actor, "token.create", token_id, user=user, label=label)
        return {"id": token_id, "user": user, "label": label, "token": token}

    def list_tokens(self, user: str | None) -> list[dict]:
        q = select(user_tokens.c.id, user_tokens.c.user, user_tokens.c.label, user_tokens.c.created_at,
                   user_tokens.c.revoked_at).order_by(user_tokens.c.created_at)
        if user:
            q = q.where(user_tokens.c.user == user)
        with self.store.read() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def revoke_token(self, actor: str, token_id: str) -> dict:
        with self.store.write() as conn:
            row = conn.execute(select(user_tokens).where(user_tokens.c.id == token_id)).first()
            if row is None:
                raise NotFound(f"no token {token_id!r}; see `gpu-attach admin token list`")
            if row.revoked_at is not None:
                raise Conflict(f"token {token_id} was already revoked", state="revoked")
            conn.execute(update(user_tokens).where(user_tokens.c.id == token_id).values(revoked_at=now()))
            self._audit(conn, actor, "token.revoke", token_id, user=row.user)
        self.tokens.forget()
        return {"id": token_id, "user": row.user, "revoked": True}

    # -- accounting -----------------------------------------------------------------------------

    def usage(self, since: float, until: float, by: str) -> dict:
        """GPU-seconds granted and busy per user, group or GPU over ``[since, until)``.

        Granted: each lease's overlap with the range times the GPUs' worth it held. Busy: the
        time its agent reported a cell running under it (the sandbox's time in the cell on
        simulated devices), scaled the same way. ``idle_share`` is the held-but-idle part. For
        users, ``static_gpu_s`` is what one whole GPU per notebook session over the range holds,
        for comparison with a whole-kernel allocation.
        """
        t = now()
        until = max(min(until, t), since)
        q = (select(leases.c.id, leases.c.user, leases.c.session, leases.c.fraction, leases.c.granted_at,
                    leases.c.ended_at, leases.c.expires_at, lease_gpus.c.gpu_id, lease_busy.c.busy_s)
             .join(lease_gpus, lease_gpus.c.lease_id == leases.c.id)
             .outerjoin(lease_busy, lease_busy.c.lease_id == leases.c.id)
             .where(and_(leases.c.granted_at < until,
                         or_(leases.c.ended_at.is_(None), leases.c.ended_at > since))))
        with self.store.read() as conn:
            rows = conn.execute(q).all()
        groups = self.broker.policy
        acc: dict[str, dict[str, float]] = defaultdict(lambda: {"granted_gpu_s": 0.0, "busy_gpu_s": 0.0, "leases": 0})
        sessions: dict[str, set] = defaultdict(set)
        seen: set[tuple[str, str]] = set()
        for r in rows:
            end = r.ended_at if r.ended_at is not None else min(t, r.expires_at)
            held = max(end - r.granted_at, 1e-9)
            overlap = max(min(end, until) - max(r.granted_at, since), 0.0)
            busy = min(r.busy_s or 0.0, held) * overlap / held
            if by == "gpu":
                key = r.gpu_id
            elif by == "group":
                key = groups.group_of(r.user) or "(none)"
            else:
                key = r.user
            a = acc[key]
            a["granted_gpu_s"] += overlap * r.fraction
            a["busy_gpu_s"] += busy * r.fraction
            if (key, r.id) not in seen:
                seen.add((key, r.id))
                a["leases"] += 1
            sessions[key].add((r.user, r.session))
        span = max(until - since, 0.0)
        out = []
        for key in sorted(acc):
            a = acc[key]
            row = {by: key, "leases": a["leases"], "granted_gpu_s": round(a["granted_gpu_s"], 3),
                   "busy_gpu_s": round(a["busy_gpu_s"], 3),
                   "idle_gpu_s": round(a["granted_gpu_s"] - a["busy_gpu_s"], 3),
                   "idle_share": round(1 - a["busy_gpu_s"] / a["granted_gpu_s"], 4) if a["granted_gpu_s"] else 0.0}
            if by != "gpu":
                static = len(sessions[key]) * span
                row["static_gpu_s"] = round(static, 3)
                row["busy_share_of_static"] = round(a["busy_gpu_s"] / static, 4) if static else 0.0
            out.append(row)
        return {"since": since, "until": until, "by": by, "rows": out}

    def audit_log(self, since: float | None, limit: int) -> list[dict]:
        q = select(audit).order_by(audit.c.id.desc()).limit(limit)
        if since is not None:
            q = q.where(audit.c.at >= since)
        with self.store.read() as conn:
            return [dict(r._mapping, detail=json.loads(r.detail)) for r in conn.execute(q)]
