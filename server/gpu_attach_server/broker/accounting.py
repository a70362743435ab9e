"""What the broker counts as leases end and cells run: fair-share usage, the hold-time estimate,
the lease-duration metric, and busy seconds from agents' heartbeats. A mixin of :class:`Broker`.
"""

from __future__ import annotations

import json
from collections import defaultdict

from sqlalchemy import insert, select, update

from .site_tables import lease_busy
from .store import leases, now


class BrokerEvents:
    """What the broker reports as it happens (the Prometheus metrics implement it); no-ops here."""

    def granted(self, waited_s: float) -> None: ...
    def refused(self, reason: str) -> None: ...
    def ended(self, state: str, held_s: float) -> None: ...


class Accounting:
    """Counting for :class:`Broker`: busy seconds from heartbeats, and what an ended lease used."""

    # -- busy time, as agents report it ---------------------------------------------------------

    def record_busy(self, agent_id: str, running: list[str], utilisation: dict[str, float] | None = None) -> None:
        """An agent's heartbeat named the leases whose cell is running: each was busy since the
        last beat (capped at two intervals, so a missed beat is not counted as busy), times its
        devices' NVML utilisation where the agent measured one (real GPUs)."""
        t = now()
        last = self._last_beat.get(agent_id)
        self._last_beat[agent_id] = t
        self.running[agent_id] = frozenset(running[:10000])
        if last is None or not running:
            return
        dt = min(t - last, 2 * self.settings.heartbeat_interval_s)
        utilisation = utilisation or {}
        for lease_id in running[:10000]:
            self._busy[lease_id] += dt * min(max(float(utilisation.get(lease_id, 1.0)), 0.0), 1.0)

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

    def _ended(self, row, state: str, t: float) -> None:
        """Account for a granted lease that just ended: fair-share usage, the hold-time estimate."""
        self._ends_by.pop(row.id, None)
        self._borrowed.pop(row.id, None)
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
