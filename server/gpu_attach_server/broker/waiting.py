"""The broker's wait queue in action: requests that wait, one dispatch pass per change in
capacity or policy, long-poll watchers, and the views of the queue. A mixin of :class:`Broker`
(``core.py``); the ordering and reservation rules themselves are in ``queue.py``.
"""

from __future__ import annotations

import secrets
from typing import Callable

from . import queue, scheduler
from .auth import Principal
from .errors import Forbidden
from .quotas import Refusal, Usage, asks, in_use
from .store import now


class WaitingRoom:
    """The queue side of :class:`Broker`: its state (``_waiters``, ``_settled``) is set up there."""

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
            view = self._up_view(conn)
            allocs = self.store.active_allocations(conn, t)
            ordered = self._ranked(t)
            held = in_use(allocs)
            refusals: dict[str, Refusal] = {}

            def admissible(w: queue.Waiter, placement: scheduler.Placement) -> bool:
                if not self.policy.quotas:
                    return True
                share, memory = asks(w.request, placement)
                if self.policy.never_fits(w.user, share, memory):
                    refusals[w.id] = self.policy.never_fits(w.user, share, memory)
                    return False
                over = self.policy.check(w.user, share, memory, held)
                if over and w.id == fresh:
                    refusals[w.id] = over
                if over:
                    return False  # a queued one waits for its own user's leases to end
                u = held.setdefault(w.user, Usage())
                u.share, u.memory = u.share + share, u.memory + memory
                return True

            plan = queue.plan(ordered, view.gpus,
                              [scheduler.Allocation(a[0], a[1]) for a in allocs], admissible,
                              lambda w: self._affinity.get((w.user, w.session), frozenset()),
                              view.every if self.policy.drained else None)
            for w, placement in plan.grants:
                granted.append((w, self._record(conn, view, w.user, w.session, w.label, w.request, placement, t, w.id)))
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

    def queued_count(self, besides: str | None = None) -> int:
        """Requests waiting in the queue now (``besides``: other users' only)."""
        with self._qlock:
            return sum(1 for w in self._waiters.values() if w.state == "queued" and w.user != besides)

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

    def queued_of(self, owner: str | None, session: str | None = None) -> list[dict]:
        """Requests waiting in the queue, ``owner``'s (None: everyone's), newest first, with their
        positions: a lease listing shows them before the leases (the panel's queue view)."""
        t = now()
        with self._qlock:
            waiting = [w for w in self._waiters.values() if w.state == "queued"
                       and (owner is None or w.user == owner) and (session is None or w.session == session)]
            return [self._queued_json(w, t) for w in sorted(waiting, key=lambda w: w.arrived, reverse=True)]

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
