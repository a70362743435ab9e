"""The broker's domain operations: agents join and beat, leases are granted, renewed and ended.

Plain Python over :class:`Store`; the FastAPI routes in ``app.py`` are thin shells around it.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
from sqlalchemy import and_, insert, select, update

from jupyter_gpu_attach.slices import SliceRequest

from ..grant_tokens import GrantSigner
from . import listing_worker, queue, scheduler
from .accounting import Accounting, BrokerEvents
from .auth import Principal
from .errors import BrokerError, Conflict, Forbidden, NoCapacity, NotFound, OverQuota  # noqa: F401 (re-exported)
from .quotas import Policy, Refusal, asks, in_use
from .store import Store, agents, gpus, lease_gpus, leases, now
from .waiting import WaitingRoom

LEASE_STATES = ("granted", "released", "expired", "revoked", "failed")


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


class Broker(WaitingRoom, Accounting):
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
        # Leases granted above their quota on idle capacity (a quota with borrow): lease id ->
        # the refusal they would have had. Reclaimed at renewal once a request waits.
        self._borrowed: dict[str, Refusal] = {}
        self._busy: dict[str, float] = defaultdict(float)  # lease id -> cell seconds not yet stored
        self._last_beat: dict[str, float] = {}
        self.running: dict[str, frozenset[str]] = {}  # agent id -> leases whose cell ran at its last beat
        self._view: _UpView | None = None  # the grantable GPUs, made again when they change (_up_view)
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
                              mig=d.get("mig"), present=True)
                if conn.execute(select(gpus.c.id).where(gpus.c.id == gpu_id)).first():
                    conn.execute(update(gpus).where(gpus.c.id == gpu_id).values(**values))
                else:
                    conn.execute(insert(gpus).values(id=gpu_id, **values))
            self.store.inventory_changed(conn)
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
                self.store.inventory_changed(conn)
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
            view = self._up_view(conn)
            allocs = self.store.active_allocations(conn, t)
            try:
                placement = scheduler.place(
                    request, view.gpus,
                    [scheduler.Allocation(a[0], a[1]) for a in allocs],
                    prefer_gpu_ids=self._affinity.get((user, session), frozenset()))
            except scheduler.NoFit as e:
                if e.never and self.policy.drained and self._fits_undrained(view, request):
                    raise NoCapacity(f"{e} while GPUs are drained by an admin; wait, or ask them to undrain",
                                     never=False) from None
                raise NoCapacity(str(e), e.never) from None
            borrowed = None
            if self.policy.quotas:
                ask, held = asks(request, placement), in_use(allocs)
                refusal = self.policy.check(user, *ask, held)
                if refusal:
                    # Over a quota that may borrow: granted while the capacity is idle (this
                    # path runs only while nobody waits), and reclaimed once somebody does.
                    if not refusal.quota.borrow or self.policy.check(user, *ask, held, borrowing=True):
                        self.events.refused("over_quota")
                        raise OverQuota(refusal)
                    borrowed = refusal
            lease_id = "L" + secrets.token_hex(6)
            record = self._record(conn, view, user, session, label, request, placement, t, lease_id, borrowed)
            if borrowed is not None:
                self._borrowed[lease_id] = borrowed
                record["borrowed"] = borrowed
            return record

    def _record(self, conn, view: "_UpView", user, session, label, request, placement, t, lease_id,
                borrowed: "Refusal | None" = None) -> dict:
        """Insert a granted lease (inside the caller's grant transaction); what signing it needs."""
        first = view.row_by_id[placement.gpus[0].id]
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
            label=label[:256], borrowed=json.dumps(_borrow_note(borrowed)) if borrowed is not None else None),
            [(g.id, g.memory if whole else placement.memory_per_gpu) for g in placement.gpus])
        self._remember(user, session, frozenset(g.id for g in placement.gpus))
        devices = [dict(view.devices[g.id]) for g in placement.gpus]  # copies: the view's are shared
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
            "token": token, **({"borrowed": _borrow_note(rec["borrowed"])} if rec.get("borrowed") else {}),
        }

    def _fits_undrained(self, view: "_UpView", request: SliceRequest) -> bool:
        try:
            scheduler.place(request, view.every, [])
            return True
        except scheduler.NoFit:
            return False

    def _up(self, conn) -> list[dict[str, Any]]:
        """GPUs that may take new grants: present, on an agent that is up, and not drained."""
        return self._up_view(conn).rows

    def _up_view(self, conn) -> "_UpView":
        """:meth:`_up` with what placing and granting derive from it, derived again only when the
        inventory (``Store.gpus_up`` returns the same list until it changes) or the policy (its
        drains) is another object than last time: not at every grant."""
        rows, policy = self.store.gpus_up(conn), self.policy
        view = self._view
        if view is None or view.inventory is not rows or view.policy is not policy:
            drained = policy.drained
            up = [r for r in rows if r["id"] not in drained and r["agent_id"] not in drained] if drained else rows
            every = [scheduler.gpu_from_row(r) for r in rows]
            row_by_id = {r["id"]: r for r in up}
            view = self._view = _UpView(rows, policy, up, [g for g in every if g.id in row_by_id], every,
                                        row_by_id, {i: _device_json(r) for i, r in row_by_id.items()})
        return view

    # -- lease lifetime -------------------------------------------------------------------------

    def renew(self, who: Principal, lease_id: str) -> dict:
        """Extend a granted lease by its TTL and sign a fresh grant token; an ended or late lease
        stays ended (a late one is recorded as expired). A lease at its quota's maximum duration
        is revoked."""
        t = now()
        expires = t + self.settings.lease_ttl_s
        revoked = None
        # Read before the store's lock (the queue's lock is taken before it everywhere else).
        waiting = self.queued_count(besides=who.name) if lease_id in self._borrowed else 0
        with self.store.write() as conn:
            row = self._owned(conn, who, lease_id)
            bound = self._ends_by.get(lease_id)
            if bound is None and row.state == "granted" and self.policy.max_lease_s(row.user):
                bound = row.granted_at + self.policy.max_lease_s(row.user)
            if bound is not None and row.state == "granted" and t >= bound:
                revoked = self._max_duration_reason(row.user, bound - row.granted_at)
                self.store.end_lease(conn, lease_id, "revoked", revoked, t)
            elif row.state == "granted" and waiting and lease_id in self._borrowed:
                revoked = self._reclaim_reason(self._borrowed[lease_id], waiting)
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
    def _reclaim_reason(refusal: Refusal, waiting: int) -> str:
        q = refusal.quota
        return (f"it ran on idle capacity borrowed above the {refusal.resource} quota of {q.kind} {q.subject!r}, "
                f"and {waiting} request(s) now wait for capacity; run long cells within the quota")

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

    def get(self, who: Principal, lease_id: str) -> dict:
        """A lease, or a queued request: its position while queued; the grant with its token once
        granted from the queue (the waiting client learns it so), while the lease stays granted."""
        with self._qlock:
            w = self._waiters.get(lease_id) or self._settled.get(lease_id)
            if w is not None:
                if w.user != who.name and not who.is_admin:
                    raise Forbidden(f"lease {lease_id} belongs to another user")
                if w.state != "granted":
                    return self._waiter_json(w, now())
        with self.store.read() as conn:
            row = self._owned(conn, who, lease_id)
            if w is not None and row.state == "granted":
                return w.result
            return self._lease_json(conn, row)

    def list_leases(self, who: Principal, state: str | None = None, session: str | None = None,
                    limit: int = 100) -> list[dict]:
        """The caller's leases, newest first; an admin sees everyone's."""
        return self.lease_page(who, state, session, limit=limit)["leases"]

    def lease_page(self, who: Principal, state: str | None = None, session: str | None = None,
                   before: str | None = None, limit: int = 100, user: str | None = None,
                   queued: bool = True) -> dict:
        """One page of the caller's leases (an admin's: everyone's, or ``user``'s), newest first.

        ``next`` is the cursor for the following page (pass it as ``before``), or None at the end.
        One statement per page, on a reader connection, so it never waits for or holds up a grant.
        """
        owner, cursor, waiting = self._page_scope(who, state, session, before, user, queued)
        if state == "queued":
            return {"leases": waiting[:limit], "next": None}
        with self.store.read() as conn:
            rows = self.store.lease_page(conn, owner, state, session, cursor, limit)
        last = (rows[-1]["created_at"], rows[-1]["id"]) if rows else None
        return {"leases": waiting + [_page_json(r) for r in rows], "next": _next_cursor(last, len(rows), limit)}

    async def lease_page_bytes(self, who: Principal, state: str | None = None, session: str | None = None,
                               before: str | None = None, limit: int = 100) -> bytes:
        """:meth:`lease_page` as the JSON document the listing route sends, with each lease's JSON
        written by the database (``Store.lease_page_json``) in the listing worker process
        (``listing_worker.py``), not parsed and encoded again here."""
        owner, cursor, waiting = self._page_scope(who, state, session, before)
        if state == "queued":
            return orjson.dumps({"leases": waiting[:limit], "next": None})
        array, n, last = await listing_worker.lease_page_json(self.store, owner, state, session, cursor, limit)
        if waiting:  # in memory, not in the table: they go first
            items = [orjson.dumps(w).decode() for w in waiting] + ([array[1:-1]] if n else [])
            array = "[" + ",".join(items) + "]"
        nxt = orjson.dumps(_next_cursor(last, n, limit)).decode()
        return ('{"leases":' + array + ',"next":' + nxt + "}").encode()

    def _page_scope(self, who: Principal, state, session, before, user: str | None = None, queued: bool = True):
        """Whose leases a page lists (an admin's: everyone's, or ``user``'s), from where, and the
        queued requests it starts with: they live in memory, not in the table, so the first page
        shows them."""
        owner = user if who.is_admin else who.name
        cursor = parse_cursor(before) if before else None
        waiting = self.queued_of(owner, session) if queued and before is None and state in (None, "queued") else []
        return owner, cursor, waiting

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
            "borrowed": json.loads(row.borrowed) if row.borrowed else None,
        }

    def _sign(self, lease_id, user, session, agent_id, devices, memory, expires) -> str:
        return self.signer.sign({
            "lease": lease_id, "user": user, "session": session, "agent": agent_id,
            "gpus": [d["index"] for d in devices], "uuids": [d["uuid"] for d in devices],
            "memory": memory, "simulated": all(d["simulated"] for d in devices),
            "exp": expires, "iat": now(),
        })




def _next_cursor(last: tuple[float, str] | None, got: int, limit: int) -> str | None:
    """The ``next`` of a page whose last row is ``last``: None when the page was not full."""
    return f"{last[0]!r}_{last[1]}" if last is not None and got == limit else None


def parse_cursor(text: str) -> tuple[float, str]:
    """``"<created_at>_<lease id>"`` (the ``next`` of a page) -> ``(created_at, id)``."""
    stamp, sep, lease_id = text.partition("_")
    try:
        return float(stamp), lease_id
    except ValueError:
        raise BrokerError(f"cursor {text!r} is not one this broker gave out: pass a page's 'next' unchanged") from None


def _page_json(r: dict) -> dict:
    """A listed lease (``Store.lease_page_json`` writes the same fields in SQL)."""
    return {
        "id": r["id"], "state": r["state"], "user": r["user"], "session": r["session"],
        "request": json.loads(r["request"]), "agent_id": r["agent_id"], "gpus": r["gpus"],
        "memory_per_gpu": r["memory_per_gpu"], "fraction": r["fraction"], "granted_at": r["granted_at"],
        "expires_at": r["expires_at"], "ended_at": r["ended_at"], "end_reason": r["end_reason"],
        "label": r["label"], "borrowed": json.loads(r["borrowed"]) if r.get("borrowed") else None,
    }


def _borrow_note(refusal: Refusal) -> dict:
    """What a borrowed grant says of itself: the quota it is above, and the numbers."""
    return {**refusal.to_json(), "note": "granted above the quota on idle capacity; the lease is not renewed "
                                         "once another request waits, so a long cell may be stopped"}


class _UpView(NamedTuple):
    inventory: list  # Store.gpus_up's list, kept so that identity compares true only for it
    policy: Any
    rows: list  # those not drained
    gpus: list  # those, as scheduler.GPU
    every: list  # every GPU up, drained ones too, as scheduler.GPU
    row_by_id: dict  # id -> row, of those not drained
    devices: dict  # id -> _device_json, of those not drained (copied before it is handed out)


def _device_json(r: dict) -> dict:
    out = {"id": r["id"], "index": r["idx"], "uuid": r["uuid"], "model": r["model"],
           "memory": r["memory"], "simulated": bool(r["simulated"]), "pool": r["pool"]}
    if r.get("mig"):
        out["mig"] = r["mig"]
    return out
