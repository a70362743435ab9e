"""The broker's domain operations: agents join and beat, leases are granted, renewed and ended.

Plain Python over :class:`Store`; the FastAPI routes in ``app.py`` are thin shells around it.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy import and_, insert, select, update

from jupyter_gpu_attach.slices import SliceRequest

from ..grant_tokens import GrantSigner
from . import queue, scheduler
from .auth import Principal
from .quotas import Policy, Refusal, Usage
from .site_tables import lease_busy
from .store import Store, agents, gpus, lease_gpus, leases, now

LEASE_STATES = ("granted", "released", "expired", "revoked", "failed")
#: What ``GET /v1/leases/{id}`` may also answer for a request that waited in the queue.
QUEUE_STATES = ("queued",) + queue.QUEUE_ENDS


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

    def __init__(self, message: str, never: bool, **extra: Any):
        super().__init__(message, **extra)
        self.reason = "too_large" if never else "busy"


class OverQuota(BrokerError):
    """The request would take its user (or group) over a quota; ``extra`` has the numbers."""

    status, reason = 409, "over_quota"

    def __init__(self, refusal: Refusal):
        super().__init__(refusal.message(), **refusal.to_json())


class BrokerEvents:
    """What the broker reports as it happens (the Prometheus metrics implement it); no-ops here."""

    def granted(self, waited_s: float) -> None: ...
    def refused(self, reason: str) -> None: ...
    def ended(self, state: str, held_s: float) -> None: ...


@dataclass
class BrokerSettings:
    lease_ttl_s: float = 30.0
    heartbeat_interval_s: float = 2.0
    # An agent that has not beaten for this long is down and its leases fail.
    agent_timeout_s: float = 10.0
    # The longest a request may wait in the queue (clients ask for less with wait_s).
    max_wait_s: float = 3600.0
    # A queued request whose client has not polled for this long is dropped (its kernel is gone).
    queue_abandon_s: float = 30.0
    # Fair share: recent GPU-seconds count half after this long.
    fair_share_half_life_s: float = 3600.0
    # "user" or "group": whose decayed usage orders the queue within a priority class.
    fair_share_by: str = "user"


class Broker:
    def __init__(self, store: Store, signer: GrantSigner, settings: BrokerSettings | None = None):
        self.store = store
        self.signer = signer
        self.settings = settings or BrokerSettings()
        # Which GPUs each (user, session) used last: a placement hint, so a session's next cell
        # lands where its sandbox is warm. Only a hint, so it lives in memory, per replica.
        self._affinity: OrderedDict[tuple[str, str], frozenset[str]] = OrderedDict()
        self.events: BrokerEvents = BrokerEvents()
        # The queue lives in this process: one broker replica orders its own waiters. Grants
        # themselves stay serialised by the store, across replicas too.
        self._qlock = threading.RLock()
        self._waiters: dict[str, queue.Waiter] = {}
        self._settled: OrderedDict[str, queue.Waiter] = OrderedDict()  # recently settled, for polls
        self._seq = 0
        self._reserved: frozenset[str] = frozenset()
        self._concurrent = 0  # granted leases at the last dispatch, for the wait estimate
        self._mean_hold_s = self.settings.lease_ttl_s
        self._ends_by: dict[str, float] = {}  # lease id -> when its max duration runs out
        self._busy: dict[str, float] = defaultdict(float)  # lease id -> cell seconds not yet stored
        self._last_beat: dict[str, float] = {}
        self.fair_share = queue.FairShare(self.settings.fair_share_half_life_s)
        with self.store.read() as conn:
            self.policy = Policy.load(conn)
            self._replay_usage(conn)

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
        """Expire leases past their TTL, revoke those past their maximum duration, take down agents
        that stopped beating, drop queued requests whose wait ran out; then grant what fits."""
        t = now()
        with self.store.write() as conn:
            over = [lid for lid, bound in self._ends_by.items() if bound <= t]
            revoked = []
            for lid in over:
                row = self.store.lease_row(conn, lid)
                if row is not None and self.store.end_lease(
                        conn, lid, "revoked", self._max_duration_reason(row.user, self._ends_by[lid] - row.granted_at), t):
                    revoked.append(lid)
                else:
                    self._ends_by.pop(lid, None)
            expired = self.store.end_leases(conn, leases.c.expires_at < t, "expired", "not renewed before its TTL", t)
            dead = [r[0] for r in conn.execute(select(agents.c.id).where(
                and_(agents.c.state == "up", agents.c.last_heartbeat < t - self.settings.agent_timeout_s)))]
            failed: list[str] = []
            if dead:
                conn.execute(update(agents).where(agents.c.id.in_(dead)).values(state="down"))
                failed = self.store.end_leases(
                    conn, leases.c.agent_id.in_(dead), "failed",
                    f"agent stopped sending heartbeats for {self.settings.agent_timeout_s:g} s", t)
            ended = {"revoked": revoked, "expired": expired, "failed": failed}
            rows = {lid: (state, self.store.lease_row(conn, lid)) for state, ids in ended.items() for lid in ids}
            self._flush_busy(conn)
        for state, row in rows.values():
            self._ended(row, state, t)
        timed_out = self._expire_waiters(t)
        self.dispatch()
        return {"expired": expired, "revoked": revoked, "agents_down": dead, "failed": failed, "queue_ended": timed_out}

    # -- busy time, as agents report it ---------------------------------------------------------

    def record_busy(self, agent_id: str, running: list[str]) -> None:
        """An agent's heartbeat named the leases whose cell is running: each was busy since the
        last beat (capped at two intervals, so a missed beat is not counted as busy)."""
        t = now()
        last = self._last_beat.get(agent_id)
        self._last_beat[agent_id] = t
        if last is None or not running:
            return
        dt = min(t - last, 2 * self.settings.heartbeat_interval_s)
        for lease_id in running[:10000]:
            self._busy[lease_id] += dt

    def _flush_busy(self, conn) -> None:
        if not self._busy:
            return
        pending, self._busy = self._busy, defaultdict(float)
        known = {r[0]: r[1] for r in conn.execute(
            select(lease_busy.c.lease_id, lease_busy.c.busy_s).where(lease_busy.c.lease_id.in_(list(pending))))}
        real = {r[0] for r in conn.execute(select(leases.c.id).where(leases.c.id.in_(list(pending))))}
        for lease_id, dt in pending.items():
            if lease_id not in real:
                continue  # an agent may only add time to leases that exist
            if lease_id in known:
                conn.execute(update(lease_busy).where(lease_busy.c.lease_id == lease_id)
                             .values(busy_s=known[lease_id] + dt))
            else:
                conn.execute(insert(lease_busy).values(lease_id=lease_id, busy_s=dt))

    def reload_policy(self) -> None:
        """Read users, quotas and drains again (after an admin change, here or on another replica)."""
        with self.store.read() as conn:
            policy = Policy.load(conn)
        with self._qlock:
            self.policy = policy

    # -- leases ---------------------------------------------------------------------------------

    def grant(self, who: Principal, request: SliceRequest, session: str, label: str = "",
              wait_s: float = 0.0) -> dict:
        """Place ``request`` and record the lease; or, when it cannot be met now and ``wait_s`` > 0,
        queue it (answer ``state: queued`` with its position); or raise :class:`NoCapacity` /
        :class:`OverQuota` with the reason."""
        t = now()
        wait_s = min(max(wait_s, 0.0), self.settings.max_wait_s)
        with self._qlock:
            if not self._waiters:  # the common case: nobody waits, so nobody can be overtaken
                try:
                    record = self._grant_now(who.name, request, session, label, t)
                except NoCapacity as e:
                    if e.reason != "busy" or wait_s <= 0:
                        self.events.refused(e.reason)
                        raise
                else:
                    self.events.granted(0.0)
                    return self._grant_json(record)
            w = self._enqueue(who.name, request, session, label, t, wait_s)
            self._dispatch(fresh=w.id)
            if w.state == "granted":
                return w.result
            if w.state == "refused":
                self.events.refused(w.reason_code)
                raise OverQuota(w.refusal) if w.refusal else NoCapacity(w.reason, never=True)
            if wait_s <= 0:
                self._waiters.pop(w.id, None)
                self.events.refused("busy")
                raise NoCapacity(f"no GPU can take {request.describe()} now and {len(self._waiters)} request(s) "
                                 "wait in the queue; pass wait_s to wait your turn", never=False)
            return self._queued_json(w, t)

    def _grant_now(self, user: str, request: SliceRequest, session: str, label: str, t: float) -> dict:
        with self.store.hot() as conn:
            self.store.lock_gpus(conn)
            up = self._up(conn)
            allocs = self.store.active_allocations(conn, t)
            try:
                placement = scheduler.place(
                    request, [_gpu(r) for r in up],
                    [scheduler.Allocation(a[0], a[1]) for a in allocs],
                    prefer_gpu_ids=self._affinity.get((user, session), frozenset()))
            except scheduler.NoFit as e:
                if e.never and self.policy.drained and self._fits_undrained(conn, request):
                    raise NoCapacity(f"{e} while GPUs are drained by an admin; wait, or ask them to undrain",
                                     never=False) from None
                raise NoCapacity(str(e), e.never) from None
            if self.policy.quotas:
                refusal = self.policy.check(user, *_asks(request, placement), _in_use(allocs))
                if refusal:
                    self.events.refused("over_quota")
                    raise OverQuota(refusal)
            return self._record(conn, up, user, session, label, request, placement, t, "L" + secrets.token_hex(6))

    def _record(self, conn, up, user, session, label, request, placement, t, lease_id) -> dict:
        """Insert a granted lease (inside the caller's grant transaction); what signing it needs."""
        first = next(r for r in up if r["id"] == placement.gpus[0].id)
        expires = t + self.settings.lease_ttl_s
        bound = self.policy.max_lease_s(user)
        if bound:
            self._ends_by[lease_id] = t + bound
            expires = min(expires, t + bound)
        whole = request.or_default().gpus is not None
        self.store.insert_lease(conn, dict(
            id=lease_id, user=user, session=session, state="granted",
            request=json.dumps(request.to_json()), agent_id=first["agent_id"],
            agent_incarnation=first["incarnation"], fraction=placement.fraction_per_gpu,
            created_at=t, granted_at=t, expires_at=expires, ended_at=None, end_reason=None,
            label=label[:256]),
            [(g.id, g.memory if whole else placement.memory_per_gpu) for g in placement.gpus])
        self._remember(user, session, frozenset(g.id for g in placement.gpus))
        devices = [_device_json(next(r for r in up if r["id"] == g.id)) for g in placement.gpus]
        return dict(id=lease_id, user=user, session=session, first=first, devices=devices,
                    placement=placement, granted_at=t, expires_at=expires)

    def _grant_json(self, rec: dict) -> dict:
        first, devices, placement = rec["first"], rec["devices"], rec["placement"]
        memory = placement.memory_per_gpu
        token = self._sign(rec["id"], rec["user"], rec["session"], first["agent_id"], devices, memory,
                           rec["expires_at"])
        return {
            "id": rec["id"], "state": "granted", "user": rec["user"], "session": rec["session"],
            "agent": {"id": first["agent_id"], "address": first["address"]},
            "gpus": devices, "memory_per_gpu": memory, "fraction": placement.fraction_per_gpu,
            "simulated": all(d["simulated"] for d in devices),
            "granted_at": rec["granted_at"], "expires_at": rec["expires_at"], "ttl_s": self.settings.lease_ttl_s,
            "token": token,
        }

    def _fits_undrained(self, conn, request: SliceRequest) -> bool:
        try:
            scheduler.place(request, [_gpu(r) for r in self.store.gpus_up(conn)], [])
            return True
        except scheduler.NoFit:
            return False

    def _up(self, conn) -> list[dict[str, Any]]:
        """GPUs that may take new grants: present, on an agent that is up, and not drained."""
        up = self.store.gpus_up(conn)
        drained = self.policy.drained
        return [r for r in up if r["id"] not in drained and r["agent_id"] not in drained] if drained else up

    # -- the queue ------------------------------------------------------------------------------

    def _enqueue(self, user, request, session, label, t, wait_s) -> queue.Waiter:
        self._seq += 1
        group, priority = self.policy.users.get(user, (None, 0))
        w = queue.Waiter(id="L" + secrets.token_hex(6), user=user, group=group or "", priority=priority,
                         request=request, session=session, label=label[:256], arrived=t, seq=self._seq,
                         deadline=t + wait_s, last_seen=t)
        self._waiters[w.id] = w
        return w

    def _share_key(self, user: str, group: str) -> str:
        return f"group:{group}" if self.settings.fair_share_by == "group" and group else f"user:{user}"

    def _ranked(self, t: float) -> list[queue.Waiter]:
        return queue.rank(list(self._waiters.values()),
                          lambda w: self.fair_share.usage(self._share_key(w.user, w.group), t))

    def dispatch(self) -> int:
        """Grant what the queue can have now, in its order (call when capacity or policy changed)."""
        with self._qlock:
            return self._dispatch() if self._waiters else 0

    def _dispatch(self, fresh: str | None = None) -> int:
        """One pass over the queue in one grant transaction. ``fresh``: a request that just
        arrived, refused (not queued) if it is over its quota now, like a request that finds no queue."""
        t = now()
        granted: list[tuple[queue.Waiter, dict]] = []
        with self.store.hot() as conn:
            self.store.lock_gpus(conn)
            up = self._up(conn)
            allocs = self.store.active_allocations(conn, t)
            ordered = self._ranked(t)
            in_use = _in_use(allocs)
            refusals: dict[str, Refusal] = {}

            def admissible(w: queue.Waiter, placement: scheduler.Placement) -> bool:
                if not self.policy.quotas:
                    return True
                share, memory = _asks(w.request, placement)
                if self.policy.never_fits(w.user, share, memory):
                    refusals[w.id] = self.policy.never_fits(w.user, share, memory)
                    return False
                over = self.policy.check(w.user, share, memory, in_use)
                if over and w.id == fresh:
                    refusals[w.id] = over
                if over:
                    return False  # a queued one waits for its own user's leases to end
                u = in_use.setdefault(w.user, Usage())
                u.share, u.memory = u.share + share, u.memory + memory
                return True

            plan = queue.plan(ordered, [_gpu(r) for r in up], [scheduler.Allocation(a[0], a[1]) for a in allocs],
                              admissible, lambda w: self._affinity.get((w.user, w.session), frozenset()),
                              [_gpu(r) for r in self.store.gpus_up(conn)] if self.policy.drained else None)
            for w, placement in plan.grants:
                granted.append((w, self._record(conn, up, w.user, w.session, w.label, w.request, placement, t, w.id)))
        self._reserved = plan.reserved
        self._concurrent = len({a[2] for a in allocs}) + len(granted)
        for w, why in plan.never:
            self._settle(w, "refused", reason=why)
        for wid, refusal in refusals.items():
            w = self._waiters.get(wid)
            if w is not None:
                w.refusal, w.reason_code = refusal, "over_quota"
                self._settle(w, "refused", reason=refusal.message())
        for w, rec in granted:
            self.events.granted(t - w.arrived)
            self._settle(w, "granted", self._grant_json(rec))
        return len(granted)

    def _settle(self, w: queue.Waiter, state: str, result: dict | None = None, reason: str = "") -> None:
        self._waiters.pop(w.id, None)
        self._settled[w.id] = w
        while len(self._settled) > 10000:
            self._settled.popitem(last=False)
        w.settle(state, result, reason)

    def _expire_waiters(self, t: float) -> list[str]:
        ended = []
        with self._qlock:
            for w in list(self._waiters.values()):
                if t >= w.deadline:
                    waited = w.deadline - w.arrived
                    self._settle(w, "timed_out", reason=(
                        f"waited {waited:.0f} s in the queue (the wait limit) and no GPU could take "
                        f"{w.request.describe()}; wait longer (--wait), ask for less, or try later"))
                elif not w.polling and t - w.last_seen > self.settings.queue_abandon_s:
                    self._settle(w, "abandoned", reason=f"its client stopped polling for {self.settings.queue_abandon_s:g} s")
                else:
                    continue
                self.events.refused(w.state)
                ended.append(w.id)
            while self._settled and t - next(iter(self._settled.values())).arrived > self.settings.max_wait_s + 120:
                self._settled.popitem(last=False)
        return ended

    def _queued_json(self, w: queue.Waiter, t: float) -> dict:
        ranked = self._ranked(t)
        position = next(i for i, x in enumerate(ranked) if x.id == w.id) + 1
        return {"id": w.id, "state": "queued", "user": w.user, "session": w.session,
                "request": w.request.to_json(), "label": w.label, "position": position, "of": len(ranked),
                "eta_s": queue.eta_s(position, self._mean_hold_s, self._concurrent),
                "queued_at": w.arrived, "wait_until": w.deadline,
                "reserved": w.id == next((x.id for x in ranked), None) and bool(self._reserved)}

    def watch(self, who: Principal, lease_id: str, on_change: Callable[[], None]) -> queue.Waiter | None:
        """Subscribe ``on_change`` (called from any thread) to a queued request's grant or end.
        Returns the waiter (the caller decrements ``polling`` when done), or None if not queued."""
        with self._qlock:
            w = self._waiters.get(lease_id)
            if w is None:
                return None
            if w.user != who.name and not who.is_admin:
                raise Forbidden(f"lease {lease_id} belongs to another user")
            w.listeners.append(on_change)
            w.polling += 1
            w.last_seen = now()
            return w

    def unwatch(self, w: queue.Waiter, on_change: Callable[[], None]) -> None:
        with self._qlock:
            w.polling -= 1
            w.last_seen = now()
            if on_change in w.listeners:
                w.listeners.remove(on_change)

    def queue_view(self) -> dict:
        """The queue in its order, for the admin: who waits for what, how long, and their usage."""
        t = now()
        with self._qlock:
            ranked = self._ranked(t)
            return {"time": t, "reserved_gpus": sorted(self._reserved), "entries": [
                {"position": i + 1, "id": w.id, "user": w.user, "group": w.group or None, "priority": w.priority,
                 "session": w.session, "label": w.label, "request": w.request.to_json(),
                 "waited_s": round(t - w.arrived, 3), "wait_until": w.deadline,
                 "usage_gpu_s": round(self.fair_share.usage(self._share_key(w.user, w.group), t), 3)}
                for i, w in enumerate(ranked)]}

    def _waiter_json(self, w: queue.Waiter, t: float) -> dict:
        if w.state == "queued":
            return self._queued_json(w, t)
        if w.state == "granted":
            return w.result
        return {"id": w.id, "state": w.state, "user": w.user, "session": w.session,
                "request": w.request.to_json(), "label": w.label, "end_reason": w.reason}

    # -- lease lifetime -------------------------------------------------------------------------

    def renew(self, who: Principal, lease_id: str) -> dict:
        """Extend a granted lease by its TTL and sign a fresh grant token; an ended or late lease
        stays ended (a late one is recorded as expired). A lease at its quota's maximum duration
        is revoked."""
        t = now()
        expires = t + self.settings.lease_ttl_s
        revoked = None
        with self.store.write() as conn:
            row = self._owned(conn, who, lease_id)
            bound = self._ends_by.get(lease_id)
            if bound is None and row.state == "granted" and self.policy.max_lease_s(row.user):
                bound = row.granted_at + self.policy.max_lease_s(row.user)
            if bound is not None and row.state == "granted" and t >= bound:
                revoked = self._max_duration_reason(row.user, bound - row.granted_at)
                self.store.end_lease(conn, lease_id, "revoked", revoked, t)
            if bound is not None:
                expires = min(expires, bound)
            # One conditional update decides, so a release or the reaper in between cannot be undone.
            renewed = 0 if revoked else conn.execute(update(leases).where(and_(
                leases.c.id == lease_id, leases.c.state == "granted", leases.c.expires_at >= t,
            )).values(expires_at=expires)).rowcount
            if not renewed and not revoked and row.state == "granted":
                self.store.end_lease(conn, lease_id, "expired", "not renewed before its TTL", t)
            if renewed:
                devices = [_device_json(dict(r._mapping)) for r in conn.execute(
                    select(gpus).join(lease_gpus, lease_gpus.c.gpu_id == gpus.c.id)
                    .where(lease_gpus.c.lease_id == lease_id).order_by(gpus.c.idx))]
                memory = conn.execute(select(lease_gpus.c.memory).where(lease_gpus.c.lease_id == lease_id)).scalar()
        if not renewed:
            if row.state == "granted":
                self._ended(row, "revoked" if revoked else "expired", t)
                self.dispatch()
            if revoked:
                raise Conflict(f"lease {lease_id} was revoked: {revoked}", state="revoked")
            if row.state != "granted":
                raise Conflict(f"lease {lease_id} is {row.state} ({row.end_reason}); request a new one", state=row.state)
            raise Conflict(f"lease {lease_id} expired before it was renewed; request a new one", state="expired")
        token = self._sign(lease_id, row.user, row.session, row.agent_id, devices, memory, expires)
        return {"id": lease_id, "state": "granted", "expires_at": expires, "token": token}

    @staticmethod
    def _max_duration_reason(user: str, limit_s: float) -> str:
        return (f"it reached the maximum lease duration of {limit_s:g} s set by the quota for {user!r}; "
                "split the work into shorter cells, or ask an admin for a longer limit")

    def release(self, who: Principal, lease_id: str, reason: str = "released by its owner",
                state: str = "released") -> dict:
        """End a lease and free its slice at once (a queued one leaves the queue). Releasing an
        ended lease changes nothing."""
        t = now()
        with self._qlock:
            w = self._waiters.get(lease_id)
            if w is not None:
                if w.user != who.name and not who.is_admin:
                    raise Forbidden(f"lease {lease_id} belongs to another user")
                self._settle(w, "cancelled", reason=reason[:256])
                return {"id": lease_id, "state": "cancelled", "ended_at": t, "end_reason": w.reason}
        with self.store.hot() as conn:
            row = self._owned(conn, who, lease_id)
            ended = self.store.end_lease(conn, lease_id, state, reason[:256], t)
        if ended:
            self._ended(row, state, t)
            if self._waiters:
                self.dispatch()
            return {"id": lease_id, "state": state, "ended_at": t, "end_reason": reason}
        return {"id": lease_id, "state": row.state, "ended_at": row.ended_at, "end_reason": row.end_reason}

    def _ended(self, row, state: str, t: float) -> None:
        """Account for a granted lease that just ended: fair-share usage, the hold-time estimate."""
        self._ends_by.pop(row.id, None)
        held = max(t - row.granted_at, 0.0)
        gpus_n = json.loads(row.request).get("gpus") or 1
        group = self.policy.group_of(row.user) or ""
        self.fair_share.charge(self._share_key(row.user, group), held * row.fraction * gpus_n, t)
        self._mean_hold_s = 0.9 * self._mean_hold_s + 0.1 * held
        self.events.ended(state, held)

    def _replay_usage(self, conn) -> None:
        """Rebuild fair-share usage from leases that ended in the last few half-lives (a restart
        must not make everyone equal again)."""
        since = now() - 5 * self.settings.fair_share_half_life_s
        rows = conn.execute(select(leases.c.user, leases.c.request, leases.c.fraction, leases.c.granted_at,
                                   leases.c.ended_at).where(leases.c.ended_at >= since)
                            .order_by(leases.c.ended_at)).all()
        for r in rows:
            n = json.loads(r.request).get("gpus") or 1
            key = self._share_key(r.user, self.policy.group_of(r.user) or "")
            self.fair_share.charge(key, max(r.ended_at - r.granted_at, 0) * r.fraction * n, r.ended_at)

    def get(self, who: Principal, lease_id: str) -> dict:
        with self._qlock:
            w = self._waiters.get(lease_id) or self._settled.get(lease_id)
            if w is not None:
                if w.user != who.name and not who.is_admin:
                    raise Forbidden(f"lease {lease_id} belongs to another user")
                return self._waiter_json(w, now())
        with self.store.read() as conn:
            row = self._owned(conn, who, lease_id)
            return self._lease_json(conn, row)

    def list_leases(self, who: Principal, state: str | None = None, session: str | None = None,
                    limit: int = 100) -> list[dict]:
        """The caller's leases, newest first; an admin sees everyone's."""
        return self.lease_page(who, state, session, limit=limit)["leases"]

    def lease_page(self, who: Principal, state: str | None = None, session: str | None = None,
                   before: str | None = None, limit: int = 100, user: str | None = None) -> dict:
        """One page of the caller's leases (an admin's: everyone's, or ``user``'s), newest first.

        ``next`` is the cursor for the following page (pass it as ``before``), or None at the end.
        One statement per page, on a reader connection, so it never waits for or holds up a grant.
        """
        owner = user if who.is_admin else who.name
        cursor = parse_cursor(before) if before else None
        with self.store.read() as conn:
            rows = self.store.lease_page(conn, owner, state, session, cursor, limit)
        out = [_page_json(r) for r in rows]
        nxt = f"{rows[-1]['created_at']!r}_{rows[-1]['id']}" if len(rows) == limit else None
        return {"leases": out, "next": nxt}

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




def parse_cursor(text: str) -> tuple[float, str]:
    """``"<created_at>_<lease id>"`` (the ``next`` of a page) -> ``(created_at, id)``."""
    stamp, sep, lease_id = text.partition("_")
    try:
        return float(stamp), lease_id
    except ValueError:
        raise BrokerError(f"cursor {text!r} is not one this broker gave out: pass a page's 'next' unchanged") from None


def _page_json(r: dict) -> dict:
    return {
        "id": r["id"], "state": r["state"], "user": r["user"], "session": r["session"],
        "request": json.loads(r["request"]), "agent_id": r["agent_id"], "gpus": r["gpus"],
        "memory_per_gpu": r["memory_per_gpu"], "fraction": r["fraction"], "granted_at": r["granted_at"],
        "expires_at": r["expires_at"], "ended_at": r["ended_at"], "end_reason": r["end_reason"],
        "label": r["label"],
    }


def _asks(request: SliceRequest, placement: scheduler.Placement) -> tuple[float, int]:
    """What a placement takes from a quota: GPUs' worth of share, and bytes over all its GPUs."""
    n = len(placement.gpus)
    whole = request.or_default().gpus is not None
    memory = sum(g.memory for g in placement.gpus) if whole else placement.memory_per_gpu * n
    return placement.fraction_per_gpu * n, memory


def _in_use(allocs) -> dict[str, Usage]:
    """Per user, the share and memory its granted leases hold (from the allocation rows)."""
    out: dict[str, Usage] = {}
    for _gpu_id, memory, _lease, user, fraction in allocs:
        u = out.setdefault(user, Usage())
        u.share += fraction
        u.memory += memory
    return out


def _gpu(r: dict) -> scheduler.GPU:
    return scheduler.GPU(r["id"], r["agent_id"], r["idx"], r["model"], r["memory"], r["simulated"], r["pool"])


def _device_json(r: dict) -> dict:
    return {"id": r["id"], "index": r["idx"], "uuid": r["uuid"], "model": r["model"],
            "memory": r["memory"], "simulated": bool(r["simulated"]), "pool": r["pool"]}
