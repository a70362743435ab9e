"""The wait queue, quotas and maximum lease duration, as scenarios over a real SQLite broker core,
each with the exact order in which the requests must be granted."""

from __future__ import annotations

import time

import pytest

from gpu_attach_server.broker.admin import SiteAdmin
from gpu_attach_server.broker.auth import Principal, TokenBook
from gpu_attach_server.broker.core import Broker, BrokerSettings, Conflict, NoCapacity, OverQuota
from gpu_attach_server.broker.queue import FairShare
from gpu_attach_server.broker.store import Store, make_engine
from gpu_attach_server.grant_tokens import GrantSigner
from jupyter_gpu_attach.slices import SliceRequest

GiB = 1024**3
WAIT = 60.0


def devices(n: int, mem_gib: int = 16) -> list[dict]:
    return [dict(index=i, uuid=f"GPU-{i}", model="Sim", memory=mem_gib * GiB, simulated=True, pool=None)
            for i in range(n)]


def who(name: str) -> Principal:
    return Principal(name, "user")


@pytest.fixture
def make(tmp_path):
    def make(hosts=(("h1", 1),), **settings) -> tuple[Broker, SiteAdmin]:
        b = Broker(Store(make_engine(str(tmp_path / f"b{time.monotonic_ns()}.db"))), GrantSigner.generate(),
                   BrokerSettings(**settings))
        for i, (name, n) in enumerate(hosts):
            b.register_agent(name, f"127.0.0.1:{9000 + i}", devices(n), "t")
        return b, SiteAdmin(b, TokenBook())
    return make


def ask(b: Broker, user: str, wait: float = WAIT, **size) -> dict:
    return b.grant(who(user), SliceRequest(**(size or {"gpus": 1})), f"{user}-nb", label=user, wait_s=wait)


def drain_in_order(b: Broker, first: dict, queued: list[dict]) -> list[str]:
    """Release the holder, then each lease as it is granted; return the users in grant order."""
    order, holder = [], first
    pending = {q["id"] for q in queued}
    while True:
        b.release(Principal("admin", "admin"), holder["id"])
        granted = [b.get(Principal("admin", "admin"), i) for i in pending]
        granted = [g for g in granted if g["state"] == "granted"]
        if not granted:
            break
        assert len(granted) == 1, "one whole GPU can go to one request at a time"
        holder = granted[0]
        pending.discard(holder["id"])
        order.append(holder["user"])
    assert not pending
    return order


# -- order ---------------------------------------------------------------------------------------


def test_a_full_pool_queues_and_answers_position(make):
    b, _ = make()
    first = ask(b, "alice")
    assert first["state"] == "granted"
    q = [ask(b, u) for u in ("bob", "carol", "dave")]
    assert [x["state"] for x in q] == ["queued"] * 3
    assert [(x["position"], x["of"]) for x in q] == [(1, 1), (2, 2), (3, 3)]
    assert b.get(who("carol"), q[1]["id"])["position"] == 2
    assert b.get(who("carol"), q[1]["id"])["of"] == 3
    assert drain_in_order(b, first, q) == ["bob", "carol", "dave"]


def test_without_wait_a_busy_pool_refuses_at_once(make):
    b, _ = make()
    ask(b, "alice")
    with pytest.raises(NoCapacity) as e:
        ask(b, "bob", wait=0)
    assert e.value.reason == "busy"
    ask(b, "carol")  # now someone waits ...
    with pytest.raises(NoCapacity) as e:
        ask(b, "bob", wait=0)  # ... and a request that will not wait still fails fast
    assert "wait in the queue" in str(e.value)
    assert len(b.queue_view()["entries"]) == 1


def test_priority_class_goes_first(make):
    b, admin = make()
    admin.set_user("admin", "dave", None, 1)
    first = ask(b, "alice")
    q = [ask(b, u) for u in ("bob", "carol", "dave")]
    assert [e["user"] for e in b.queue_view()["entries"]] == ["dave", "bob", "carol"]
    assert drain_in_order(b, first, q) == ["dave", "bob", "carol"]


def test_least_recent_usage_goes_first_within_a_class(make):
    b, _ = make()
    t = time.time()
    b.fair_share.charge("user:bob", 500.0, t)
    b.fair_share.charge("user:carol", 100.0, t)
    first = ask(b, "alice")
    q = [ask(b, u) for u in ("bob", "carol", "dave")]
    assert drain_in_order(b, first, q) == ["dave", "carol", "bob"]


def test_fair_share_counts_the_gpu_seconds_a_lease_held(make):
    b, _ = make()
    lease = ask(b, "bob", fraction=0.5)
    time.sleep(0.2)
    b.release(who("bob"), lease["id"])
    used = b.fair_share.usage("user:bob", time.time())
    assert 0.09 < used < 0.2  # 0.2 s at half a GPU
    assert b.fair_share.usage("user:carol", time.time()) == 0


def test_fair_share_by_group(make):
    b, admin = make(fair_share_by="group")
    admin.set_user("admin", "bob", "physics", 0)
    admin.set_user("admin", "carol", "physics", 0)
    admin.set_user("admin", "dave", "biology", 0)
    b.fair_share.charge("group:physics", 100.0, time.time())
    first = ask(b, "alice")
    q = [ask(b, u) for u in ("carol", "bob", "dave")]
    # dave's group has used nothing; carol and bob share their group's usage, so arrival decides.
    assert drain_in_order(b, first, q) == ["dave", "carol", "bob"]


def test_usage_decays_with_its_half_life():
    fs = FairShare(half_life_s=10.0)
    fs.charge("u", 80.0, at=1000.0)
    assert fs.usage("u", 1000.0) == pytest.approx(80.0)
    assert fs.usage("u", 1010.0) == pytest.approx(40.0)
    assert fs.usage("u", 1030.0) == pytest.approx(10.0)
    fs.charge("u", 10.0, at=1030.0)
    assert fs.usage("u", 1040.0) == pytest.approx(10.0)


# -- no starvation: reservation with backfill -----------------------------------------------------


def test_small_requests_cannot_overtake_a_large_one_forever(make):
    b, _ = make(hosts=(("h1", 2),))
    holders = [ask(b, "alice", fraction=0.6), ask(b, "alice", fraction=0.6)]
    assert {h["gpus"][0]["id"] for h in holders} == {"h1/0", "h1/1"}  # 40 % of each GPU is free
    big = ask(b, "bob", gpus=2)
    assert big["state"] == "queued" and big["reserved"] is True
    # Each small request would fit in a free half; none may take what the big one waits for.
    smalls = [ask(b, "carol", fraction=0.25) for _ in range(4)]
    assert [s["state"] for s in smalls] == ["queued"] * 4
    assert b.queue_view()["reserved_gpus"] == ["h1/0", "h1/1"]
    b.release(who("alice"), holders[0]["id"])
    assert b.get(who("bob"), big["id"])["state"] == "queued"  # one GPU drained, it needs two
    b.release(who("alice"), holders[1]["id"])
    got = b.get(who("bob"), big["id"])
    assert got["state"] == "granted" and len(got["gpus"]) == 2
    assert all(b.get(who("carol"), s["id"])["state"] == "queued" for s in smalls)
    b.release(who("bob"), big["id"])
    assert all(b.get(who("carol"), s["id"])["state"] == "granted" for s in smalls)


def test_small_requests_backfill_outside_the_reservation(make):
    b, _ = make(hosts=(("h1", 2), ("h2", 1)))
    hold = ask(b, "alice", fraction=0.5)
    assert hold["gpus"][0]["id"] == "h1/0"
    big = ask(b, "bob", gpus=2)
    assert big["state"] == "queued"
    assert b.queue_view()["reserved_gpus"] == ["h1/0", "h1/1"]
    small = ask(b, "carol", fraction=0.25)
    assert small["state"] == "granted" and small["gpus"][0]["id"] == "h2/0"
    b.release(who("alice"), hold["id"])
    assert b.get(who("bob"), big["id"])["state"] == "granted"


def test_a_request_too_large_for_the_pool_is_refused_not_queued(make):
    b, _ = make()
    with pytest.raises(NoCapacity) as e:
        ask(b, "bob", memory=40 * GiB)
    assert e.value.reason == "too_large"
    assert b.queue_view()["entries"] == []


# -- waiting ends --------------------------------------------------------------------------------


def test_the_wait_runs_out_with_a_clear_reason(make):
    b, _ = make()
    ask(b, "alice")
    q = ask(b, "bob", wait=0.2)
    time.sleep(0.25)
    assert q["id"] in b.reap()["queue_ended"]
    got = b.get(who("bob"), q["id"])
    assert got["state"] == "timed_out"
    assert "waited 0 s in the queue" in got["end_reason"] and "--wait" in got["end_reason"]


def test_a_queued_request_can_be_cancelled(make):
    b, _ = make()
    first = ask(b, "alice")
    q = ask(b, "bob")
    with pytest.raises(Exception):
        b.release(who("carol"), q["id"])  # not carol's
    assert b.release(who("bob"), q["id"])["state"] == "cancelled"
    b.release(who("alice"), first["id"])
    assert b.get(who("bob"), q["id"])["state"] == "cancelled"
    assert b.pool()["gpus"][0]["used_memory"] == 0


def test_a_request_nobody_polls_is_abandoned(make):
    b, _ = make(queue_abandon_s=0.1)
    ask(b, "alice")
    polled = ask(b, "carol")
    q = ask(b, "bob")
    w = b.watch(who("carol"), polled["id"], lambda: None)  # carol's client is long-polling
    time.sleep(0.15)
    b.reap()
    assert b.get(who("bob"), q["id"])["state"] == "abandoned"
    assert b.get(who("carol"), polled["id"])["state"] == "queued"
    b.unwatch(w, lambda: None)


def test_a_watcher_is_told_of_its_grant(make):
    b, _ = make()
    first = ask(b, "alice")
    q = ask(b, "bob")
    told = []
    b.watch(who("bob"), q["id"], lambda: told.append(True))
    b.release(who("alice"), first["id"])
    assert told == [True]
    got = b.get(who("bob"), q["id"])
    assert got["state"] == "granted" and got["token"]
    b.release(who("bob"), q["id"])
    assert b.get(who("bob"), q["id"])["state"] == "released"  # not the remembered grant


# -- quotas ---------------------------------------------------------------------------------------


def test_share_quota_refuses_with_the_numbers(make):
    b, admin = make(hosts=(("h1", 2),))
    admin.set_quota("admin", "user", "alice", 1.0, None, None)
    ask(b, "alice", fraction=0.75)
    with pytest.raises(OverQuota) as e:
        ask(b, "alice", fraction=0.5)
    assert e.value.extra["asked"] == 0.5 and e.value.extra["in_use"] == 0.75 and e.value.extra["limit"] == 1.0
    assert "asked 0.5 GPU, in use 0.75 GPU, limit 1 GPU" in str(e.value)
    assert ask(b, "alice", fraction=0.25)["state"] == "granted"  # exactly at the limit is allowed
    assert ask(b, "bob", fraction=0.5)["state"] == "granted"  # bob has no quota


def test_memory_and_group_quotas(make):
    b, admin = make(hosts=(("h1", 3),))
    admin.set_user("admin", "alice", "lab", 0)
    admin.set_user("admin", "bob", "lab", 0)
    admin.set_quota("admin", "group", "lab", None, 20 * GiB, None)
    ask(b, "alice", memory=12 * GiB)
    with pytest.raises(OverQuota) as e:
        ask(b, "bob", memory=10 * GiB)
    assert e.value.extra["resource"] == "memory" and e.value.extra["in_use"] == 12 * GiB
    assert "group 'lab'" in str(e.value)
    assert ask(b, "carol", memory=10 * GiB)["state"] == "granted"
    admin.delete_quota("admin", "group", "lab")
    assert ask(b, "bob", memory=10 * GiB, wait=0)["state"] == "granted"


def test_a_quota_that_borrows_takes_idle_capacity_and_gives_it_back_when_someone_waits(make):
    """Borrowing: above its quota, alice may use GPUs nobody else wants, and only for as long as
    nobody waits: her borrowed lease is not renewed once bob queues, and bob gets the GPU."""
    b, admin = make(hosts=(("h1", 3),))
    admin.set_quota("admin", "user", "alice", 1.0, None, None, borrow=True)
    own = ask(b, "alice", wait=0)
    assert own["state"] == "granted" and "borrowed" not in own  # within the quota
    extra = ask(b, "alice", wait=0)  # above it, on an idle GPU
    assert extra["state"] == "granted"
    assert extra["borrowed"]["asked"] == 1.0 and extra["borrowed"]["in_use"] == 1.0
    assert extra["borrowed"]["limit"] == 1.0 and extra["borrowed"]["quota"]["borrow"] is True
    assert b.get(who("alice"), extra["id"])["borrowed"] == extra["borrowed"]  # stored with the lease
    assert b.get(who("alice"), own["id"])["borrowed"] is None
    # While nobody waits, the borrowed lease renews like any other.
    assert b.renew(who("alice"), extra["id"])["state"] == "granted"
    ask(b, "carol", wait=0)  # the last idle GPU
    # Alice's own request waiting (for her own usage to drop) takes nothing back from her.
    mine = ask(b, "alice")
    assert mine["state"] == "queued"
    assert b.renew(who("alice"), extra["id"])["state"] == "granted"
    b.release(who("alice"), mine["id"])
    waiting = ask(b, "bob")
    assert waiting["state"] == "queued"
    # Bob waits, so alice's borrowed lease is not renewed: revoked, with the reason, and bob is granted.
    assert b.renew(who("alice"), own["id"])["state"] == "granted"  # her own share is hers
    with pytest.raises(Conflict) as e:
        b.renew(who("alice"), extra["id"])
    assert e.value.extra["state"] == "revoked"
    got = b.get(who("alice"), extra["id"])
    assert got["state"] == "revoked" and "borrowed above the share quota of user 'alice'" in got["end_reason"]
    assert "1 request(s) now wait" in got["end_reason"]
    assert b.get(who("bob"), waiting["id"])["state"] == "granted"


def test_a_quota_without_borrow_never_lends(make):
    b, admin = make(hosts=(("h1", 3),))
    admin.set_quota("admin", "user", "alice", 1.0, None, None)
    ask(b, "alice", wait=0)
    with pytest.raises(OverQuota):
        ask(b, "alice", wait=0)  # two GPUs idle, but this quota does not borrow
    # A group quota that does not borrow still binds a user whose own quota does.
    admin.set_user("admin", "alice", "lab", 0)
    admin.set_quota("admin", "user", "alice", 1.0, None, None, borrow=True)
    admin.set_quota("admin", "group", "lab", 1.0, None, None)
    with pytest.raises(OverQuota) as e:
        ask(b, "alice", wait=0)
    assert e.value.extra["quota"]["kind"] == "user"  # the first quota broken is named


def test_max_lease_duration_revokes_the_lease(make):
    b, admin = make(lease_ttl_s=30.0)
    admin.set_quota("admin", "user", "alice", None, None, 0.3)
    lease = ask(b, "alice")
    assert lease["expires_at"] - lease["granted_at"] == pytest.approx(0.3)
    assert b.renew(who("alice"), lease["id"])["expires_at"] <= lease["granted_at"] + 0.3 + 1e-6
    time.sleep(0.35)
    assert b.reap()["revoked"] == [lease["id"]]
    got = b.get(who("alice"), lease["id"])
    assert got["state"] == "revoked" and "maximum lease duration of 0.3 s" in got["end_reason"]
    with pytest.raises(Conflict):
        b.renew(who("alice"), lease["id"])
    assert ask(b, "bob", wait=0)["state"] == "granted"  # the GPU is free again


def test_drained_gpu_takes_no_new_grants_but_keeps_its_leases(make):
    b, admin = make(hosts=(("h1", 2),))
    running = ask(b, "alice", fraction=0.5)
    gpu = running["gpus"][0]["id"]
    admin.drain("admin", "gpu", gpu, "maintenance", True)
    other = ask(b, "bob", fraction=0.25)
    assert other["gpus"][0]["id"] != gpu
    assert b.get(who("alice"), running["id"])["state"] == "granted"
    admin.drain("admin", "agent", "h1", "", True)
    assert ask(b, "carol", fraction=0.25)["state"] == "queued"
    admin.drain("admin", "agent", "h1", "", False)  # undrain: the queue moves at once
    assert b.queue_view()["entries"] == []


def test_a_database_made_before_borrowing_and_mig_gets_the_columns(tmp_path):
    """An existing site's database (quotas without borrow, gpus without mig) is upgraded at start."""
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE quotas (kind VARCHAR(8) NOT NULL, subject VARCHAR(128) NOT NULL, max_share FLOAT, "
               "max_memory BIGINT, max_lease_s FLOAT, updated_at FLOAT NOT NULL, PRIMARY KEY (kind, subject))")
    db.execute("INSERT INTO quotas VALUES ('user', 'alice', 1.0, NULL, NULL, 0)")
    db.execute("CREATE TABLE gpus (id VARCHAR(160) PRIMARY KEY, agent_id VARCHAR(128) NOT NULL, idx INTEGER NOT NULL, "
               "uuid VARCHAR(128) NOT NULL, model VARCHAR(128) NOT NULL, memory BIGINT NOT NULL, "
               "simulated BOOLEAN NOT NULL, pool VARCHAR(64) NOT NULL, present BOOLEAN NOT NULL)")
    db.commit()
    db.close()
    from gpu_attach_server.broker.store import make_engine as sqlite_file  # this file, also under test_postgres

    b = Broker(Store(sqlite_file(str(path))), GrantSigner.generate(), BrokerSettings())
    assert b.policy.quotas[("user", "alice")].borrow is False
    assert b.policy.quotas[("user", "alice")].max_share == 1.0
    b.register_agent("h1", "127.0.0.1:9000", [dict(devices(1)[0], mig="1g.10gb", memory=10 * GiB)], "t")
    assert b.grant(who("alice"), SliceRequest(mig="1g.10gb"), "nb")["gpus"][0]["mig"] == "1g.10gb"
