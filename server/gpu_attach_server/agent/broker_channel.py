"""What the agent hears from the broker between heartbeats, and what it tells it.

- the lease-end feed: a long poll that names this agent's leases as soon as they end, so their
  grants admit nothing more and their cells stop (within ~100 ms of a release or expiry);
- per running cell, a long poll on its lease that moves the cell's fence when a renewal is
  confirmed (the agent stops a cell whose lease it cannot confirm before the fence);
- the session-end feed: sessions whose kernel shut down or stopped beating, to reclaim;
- "this cell's connection closed": the lease is released at once (a kernel that died mid-cell
  frees its slice in well under a second).

Errors only retry: what keeps a cell from outliving its lease is the fence, not this channel.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import requests

from ..grant_tokens import GrantTokenError

log = logging.getLogger("gpu_attach.agent")

POLL_WAIT_S = 5.0
# A cell's end is told to the broker this long after its connection closed, unless the lease
# ended meanwhile (a kernel releases its lease itself right after a normal cell): so the broker
# pays for it only when a kernel died mid-cell, and the slice is still free well within 1 s.
TELL_AFTER_S = 0.3
# After an answer that named ended leases, wait this long before asking again, so a stream of
# releases is answered in batches (well within the 100 ms promise).
BATCH_S = 0.03


class BrokerChannel:
    def __init__(self, broker_url: str, agent_id: str, token: str, stop: threading.Event):
        self.base = f"{broker_url}/v1/agents/{agent_id}"
        self._token, self._stop = token, stop
        self._local = threading.local()
        self._tell: "queue.SimpleQueue[tuple[str | None, str, float]]" = queue.SimpleQueue()
        self._watchers = ThreadPoolExecutor(max_workers=64, thread_name_prefix="lease-watch")
        self._lock = threading.Lock()
        self.ended: dict[str, float] = {}  # leases the broker says ended -> when we heard

    def http(self) -> requests.Session:
        """This thread's own connection: a long poll holds it."""
        s = getattr(self._local, "http", None)
        if s is None:
            s = self._local.http = requests.Session()
            s.headers["Authorization"] = f"Bearer {self._token}"
        return s

    def start(self, on_leases_ended: Callable[[set], None], on_session_ended: Callable[[str, str], None]) -> None:
        threading.Thread(target=self._tell_forever, name="tell-broker", daemon=True).start()
        threading.Thread(target=self._follow_lease_ends, args=(on_leases_ended,), name="lease-ends",
                         daemon=True).start()
        threading.Thread(target=self._follow_session_ends, args=(on_session_ended,), name="session-ends",
                         daemon=True).start()

    def close(self) -> None:
        self._tell.put((None, "", 0.0))

    # -- one lease ------------------------------------------------------------------------------

    def confirm(self, lease: str, margin: float) -> tuple[float, float]:
        """Ask the broker now whether ``lease`` is live: ``(its expiry, the monotonic fence)``."""
        sent = time.monotonic()
        try:
            r = self.http().get(f"{self.base}/leases/{lease}/watch", params={"wait": "0"}, timeout=2)
            r.raise_for_status()
            body = r.json()
        except Exception as e:
            raise GrantTokenError(f"the agent cannot confirm the lease with the broker ({e}) and the grant is "
                                  "about to expire; request a new lease") from None
        if body["state"] != "granted":
            raise GrantTokenError(f"the lease has ended ({body['state']}: {body.get('end_reason')}); "
                                  "request a new one")
        return float(body["expires_at"]), sent + float(body["expires_at"]) - float(body["now"]) - margin

    def watch(self, cell, running: Callable[[], bool], over: Callable[[str], None]) -> None:
        """Watch a running cell's lease (in a pool thread): ``over(why)`` when it ended; move
        ``cell.fence`` when a renewal is confirmed."""
        self._watchers.submit(self._watch, cell, running, over)

    def _watch(self, cell, running, over) -> None:
        url, http = f"{self.base}/leases/{cell.lease}/watch", self.http()
        while not self._stop.is_set() and running():
            left = cell.fence - time.monotonic()
            if left <= 0:
                return  # the agent's guard stops the cell
            wait = max(0.0, min(POLL_WAIT_S, left - 0.25))
            sent = time.monotonic()
            try:
                # Neither connecting nor waiting may outlast the fence.
                r = http.get(url, params={"known": repr(cell.expires_at), "wait": f"{wait:.3f}"},
                             timeout=(min(1.0, left), wait + min(1.0, max(left - wait, 0.05))))
                if r.status_code == 404:
                    over("the broker knows no such lease for this agent")
                    return
                r.raise_for_status()
                body = r.json()
            except Exception as e:
                log.debug("lease watch of %s failed: %s", cell.lease, e)
                time.sleep(min(0.05, max(cell.fence - time.monotonic(), 0)))
                continue
            if body["state"] != "granted":
                over(f"the lease is {body['state']} ({body.get('end_reason')})")
                return
            cell.expires_at = float(body["expires_at"])
            cell.fence = sent + (cell.expires_at - float(body["now"])) - cell.margin

    def cell_ended(self, lease: str, reason: str, now: bool = False) -> None:
        """Release ``lease`` on the broker: ``now`` when the agent stopped the cell or the kernel
        left mid-cell; else after a moment, unless the kernel released it meanwhile."""
        self._tell.put((lease, reason, time.monotonic() + (0.0 if now else TELL_AFTER_S)))

    def _tell_forever(self) -> None:
        http = self.http()
        while True:
            lease, reason, when = self._tell.get()
            if lease is None:
                return
            time.sleep(max(0.0, when - time.monotonic()))
            if lease in self.ended:
                continue  # its kernel released it
            for _ in range(3):
                try:
                    http.post(f"{self.base}/leases/{lease}/ended", json={"reason": reason}, timeout=2)
                    break
                except Exception:  # the broker is down: the lease expires at its TTL instead
                    time.sleep(0.1)

    # -- feeds ----------------------------------------------------------------------------------

    def _follow_lease_ends(self, on_ended: Callable[[set], None]) -> None:
        http, since = self.http(), None
        while not self._stop.is_set():
            try:
                params = {"wait": str(POLL_WAIT_S)} if since is None else {"since": repr(since),
                                                                          "wait": str(POLL_WAIT_S)}
                r = http.get(f"{self.base}/lease-ends", params=params, timeout=POLL_WAIT_S + 5)
                r.raise_for_status()
                body = r.json()
            except Exception:
                self._stop.wait(0.2)
                continue
            since = float(body["until"])
            if not body["ended"]:
                continue
            now = time.monotonic()
            with self._lock:
                for lease in body["ended"]:
                    self.ended.setdefault(lease, now)
                if len(self.ended) > 100000:  # grants live minutes at most; forget the oldest ends
                    self.ended = {k: v for k, v in self.ended.items() if v > now - 3600}
            on_ended(set(body["ended"]))
            self._stop.wait(BATCH_S)

    def _follow_session_ends(self, on_ended: Callable[[str, str], None]) -> None:
        http, seq = self.http(), None
        while not self._stop.is_set():
            try:
                r = http.get(f"{self.base}/session-ends", timeout=POLL_WAIT_S + 5,
                             params={"since": seq or 0, "wait": 0 if seq is None else POLL_WAIT_S})
                r.raise_for_status()
                body = r.json()
            except Exception:
                self._stop.wait(1.0)
                continue
            if seq is not None:  # the first answer only says where the log stands now
                for user, session in body["ended"]:
                    on_ended(user, session)
            seq = body["seq"]
