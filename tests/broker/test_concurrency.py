"""100 clients request, renew and release at random for 30 s against a real broker process, while
an invariant checker watches through the admin API: no GPU is ever over-committed, every lease
ends, and no queued request is lost."""

from __future__ import annotations

import random
import threading
import time

import pytest

from broker_site import TOKENS, BrokerSite
from jupyter_gpu_attach.broker_client import BrokerClient
from jupyter_gpu_attach.errors import LeaseLost, NoCapacity
from jupyter_gpu_attach.slices import SliceRequest

CLIENTS = 100
SECONDS = 30.0
GiB = 1 << 30


@pytest.fixture
def site(tmp_path):
    s = BrokerSite(tmp_path, "--agent-timeout", "3600", lease_ttl=5.0)
    s.register_fake_agent("h1", 2)
    s.register_fake_agent("h2", 2)
    yield s
    s.stop()


def _sizes(rng: random.Random) -> SliceRequest:
    kind = rng.random()
    if kind < 0.5:
        return SliceRequest(fraction=rng.choice([0.1, 0.25, 0.5]))
    if kind < 0.8:
        return SliceRequest(memory=rng.choice([1, 4, 8]) * GiB)
    return SliceRequest(gpus=rng.choice([1, 2]))


@pytest.mark.timeout(120)
def test_random_clients_keep_the_invariants(site):
    users = ["alice", "bob", "carol"]
    stop = threading.Event()
    granted: dict[str, str] = {}  # lease id -> user
    queued: dict[str, str] = {}  # lease ids that were answered 202 -> user
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int):
        rng = random.Random(i)
        user = users[i % len(users)]
        c = BrokerClient(site.url, TOKENS[user], timeout=60)

        def on_queued(position, of, eta):
            if not 1 <= position <= of:
                errors.append(f"position {position} of {of}")

        while not stop.is_set():
            wait = rng.choice([0, 0, 0.5, 2.0])
            try:
                seen = []
                lease = c.request_lease(_sizes(rng), f"nb{i}", wait_s=wait,
                                        on_queued=lambda p, o, e: (seen.append(p), on_queued(p, o, e)))
            except NoCapacity:
                continue
            except Exception as e:  # anything else is a bug
                errors.append(f"request: {type(e).__name__}: {e}")
                continue
            with lock:
                if lease["id"] in granted:
                    errors.append(f"lease {lease['id']} granted twice")
                granted[lease["id"]] = user
                if seen:
                    queued[lease["id"]] = user
            time.sleep(rng.random() * 0.05)
            try:
                if rng.random() < 0.3:
                    c.renew(lease["id"])
                if rng.random() < 0.95:  # the rest are left to expire (a kernel that died)
                    c.release(lease["id"])
            except LeaseLost:
                pass
            except Exception as e:
                errors.append(f"renew/release: {type(e).__name__}: {e}")

    over: list[dict] = []
    snapshots = [0]

    def checker():
        admin = BrokerClient(site.url, TOKENS["admin"])
        while not stop.is_set():
            for g in admin._call("GET", "/v1/admin/gpus"):
                if g["used_memory"] > g["memory"] or g["used_share"] > 1.0 + 1e-9:
                    over.append(g)
            q = admin._call("GET", "/v1/admin/queue")["entries"]
            if [e["position"] for e in q] != list(range(1, len(q) + 1)):
                errors.append(f"queue positions {[e['position'] for e in q]}")
            snapshots[0] += 1
            time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    watch = threading.Thread(target=checker)
    for t in threads + [watch]:
        t.start()
    time.sleep(SECONDS)
    stop.set()
    for t in threads + [watch]:
        t.join(60)

    assert errors == []
    assert over == [], f"over-committed GPUs seen: {over[:3]}"
    assert snapshots[0] >= 10, "the checker hardly looked"
    assert len(granted) > 100, f"only {len(granted)} grants in {SECONDS:g} s"
    assert queued, "no request ever waited: the test did not exercise the queue"

    admin = BrokerClient(site.url, TOKENS["admin"])
    # Leases left to expire end within their TTL; then nothing is held and nothing waits.
    deadline = time.monotonic() + 15
    while admin._call("GET", "/v1/admin/leases", params={"state": "granted"})["leases"]:
        assert time.monotonic() < deadline, "some lease never ended"
        time.sleep(0.5)
    assert admin._call("GET", "/v1/admin/queue")["entries"] == []
    assert all(g["used_memory"] == 0 for g in admin._call("GET", "/v1/admin/gpus"))
    # Every grant a client saw is recorded, ended, under its user; every queued one was granted.
    recorded, before = {}, None
    while True:
        page = admin._call("GET", "/v1/admin/leases", params={"limit": 1000, **({"before": before} if before else {})})
        recorded.update({lz["id"]: lz for lz in page["leases"]})
        before = page["next"]
        if not before:
            break
    missing = [lid for lid in granted if lid not in recorded]
    assert missing == []
    assert all(recorded[lid]["user"] == u and recorded[lid]["state"] in ("released", "expired")
               for lid, u in granted.items())
    assert set(queued) <= set(granted)
