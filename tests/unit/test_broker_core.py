"""Unit tests for gpu_attach_server.broker.core.Broker over a real SQLite file."""

import asyncio
import threading
import time

import pytest

from gpu_attach_server.broker.auth import Principal
from gpu_attach_server.broker.core import (
    Broker,
    BrokerSettings,
    Conflict,
    Forbidden,
    NoCapacity,
    NotFound,
)
from gpu_attach_server.broker.store import Store, make_engine
from gpu_attach_server.grant_tokens import GrantSigner, GrantVerifier
from jupyter_gpu_attach.slices import SliceRequest

GiB = 1024**3
ALICE = Principal("alice", "user")
BOB = Principal("bob", "user")
ADMIN = Principal("admin", "admin")


def devices(n: int, mem_gib: int = 16, pool: str | None = None, simulated: bool = True) -> list[dict]:
    return [dict(index=i, uuid=f"GPU-{i:04d}", model="Sim", memory=mem_gib * GiB, simulated=simulated, pool=pool)
            for i in range(n)]


def make_broker(tmp_path, **settings) -> Broker:
    store = Store(make_engine(str(tmp_path / "broker.db")))
    return Broker(store, GrantSigner.generate(), BrokerSettings(**settings))


@pytest.fixture
def broker(tmp_path):
    b = make_broker(tmp_path)
    b.reg = b.register_agent("ag1", "127.0.0.1:9001", devices(2), "0.1")
    return b


def gpu_row(broker, gpu_id):
    return next(g for g in broker.pool()["gpus"] if g["id"] == gpu_id)


# -- agents ---------------------------------------------------------------------------------


def test_register_agent_answer_and_pool(broker):
    reg = broker.reg
    assert reg["agent_id"] == "ag1"
    assert reg["incarnation"]
    assert "PUBLIC KEY" in reg["public_key"]
    assert reg["heartbeat_interval_s"] == BrokerSettings().heartbeat_interval_s
    pool = broker.pool()["gpus"]
    assert [g["id"] for g in pool] == ["ag1/0", "ag1/1"]
    g = pool[0]
    assert g["agent"] == "ag1" and g["agent_state"] == "up" and g["index"] == 0
    assert g["memory"] == 16 * GiB and g["used_memory"] == 0 and g["free_memory"] == 16 * GiB
    assert g["free_share"] == 1.0 and g["used_share"] == 0.0
    assert g["simulated"] is True
    assert g["pool"] == "default"
    assert g["leases"] == []


def test_register_agent_pools_from_devices(tmp_path):
    b = make_broker(tmp_path)
    b.register_agent("ag", "h:1", devices(1, pool="h100"), "v")
    assert b.pool()["gpus"][0]["pool"] == "h100"
    lease = b.grant(ALICE, SliceRequest(fraction=0.5, pool="h100"), "s")
    assert lease["gpus"][0]["pool"] == "h100"
    with pytest.raises(NoCapacity) as e:
        b.grant(ALICE, SliceRequest(fraction=0.5, pool="a100"), "s")
    assert e.value.reason == "too_large"


def test_reregistering_replaces_inventory(broker):
    broker.register_agent("ag1", "127.0.0.1:9001", devices(1), "0.2")
    assert [g["id"] for g in broker.pool()["gpus"]] == ["ag1/0"]
    # A GPU that is no longer reported cannot be granted.
    broker.grant(ALICE, SliceRequest(gpus=1), "s")
    with pytest.raises(NoCapacity) as e:
        broker.grant(ALICE, SliceRequest(gpus=1), "s")
    assert e.value.reason == "busy"


def test_heartbeat_with_right_incarnation_lists_active_leases(broker):
    lease = broker.grant(ALICE, SliceRequest(fraction=0.5), "s")
    hb = broker.heartbeat("ag1", broker.reg["incarnation"])
    assert list(hb["active"]) == [lease["id"]]
    assert hb["active"][lease["id"]] == pytest.approx(lease["expires_at"])
    broker.release(ALICE, lease["id"])
    assert broker.heartbeat("ag1", broker.reg["incarnation"])["active"] == {}


def test_heartbeat_with_wrong_incarnation_conflicts(broker):
    with pytest.raises(Conflict) as e:
        broker.heartbeat("ag1", "not-the-incarnation")
    assert e.value.extra.get("reregister") is True
    assert e.value.status == 409
    with pytest.raises(Conflict):
        broker.heartbeat("unknown-agent", broker.reg["incarnation"])


def test_reregistering_fails_earlier_leases(broker):
    old = broker.reg["incarnation"]
    lease = broker.grant(ALICE, SliceRequest(fraction=0.5), "s")
    reg2 = broker.register_agent("ag1", "127.0.0.1:9001", devices(2), "0.1")  # restarted, same address
    assert reg2["incarnation"] != old
    got = broker.get(ALICE, lease["id"])
    assert got["state"] == "failed"
    assert "restarted" in got["end_reason"]
    assert gpu_row(broker, lease["gpus"][0]["id"])["used_memory"] == 0
    with pytest.raises(Conflict):
        broker.heartbeat("ag1", old)
    assert broker.heartbeat("ag1", reg2["incarnation"])["active"] == {}


def test_a_live_agent_id_cannot_be_taken_from_another_address(broker):
    with pytest.raises(Conflict) as info:
        broker.register_agent("ag1", "10.9.9.9:1", devices(2), "0.1")
    assert "in use by a live agent at 127.0.0.1:9001" in str(info.value)
    broker.settings.agent_timeout_s = 0.0  # the live one stops beating: the id is free again
    time.sleep(0.01)
    assert broker.register_agent("ag1", "10.9.9.9:1", devices(2), "0.1")["agent_id"] == "ag1"


# -- leases ---------------------------------------------------------------------------------


def test_grant_answer_and_token(broker):
    lease = broker.grant(ALICE, SliceRequest(fraction=0.25), "nb-1", label="cell 3")
    assert lease["state"] == "granted" and lease["user"] == "alice" and lease["session"] == "nb-1"
    assert lease["id"].startswith("L")
    assert lease["agent"] == {"id": "ag1", "address": "127.0.0.1:9001"}
    assert lease["memory_per_gpu"] == 4 * GiB
    assert lease["fraction"] == pytest.approx(0.25)
    assert lease["simulated"] is True
    assert len(lease["gpus"]) == 1 and lease["gpus"][0]["uuid"].startswith("GPU-")
    assert lease["expires_at"] - lease["granted_at"] == pytest.approx(lease["ttl_s"])
    claims = GrantVerifier(broker.reg["public_key"]).verify(lease["token"], agent_id="ag1")
    assert claims["lease"] == lease["id"]
    assert claims["user"] == "alice" and claims["session"] == "nb-1"
    assert claims["memory"] == 4 * GiB
    assert claims["gpus"] == [lease["gpus"][0]["index"]]
    assert claims["exp"] == pytest.approx(lease["expires_at"])


def test_get_returns_lease(broker):
    lease = broker.grant(ALICE, SliceRequest(memory=3 * GiB), "s", label="x")
    got = broker.get(ALICE, lease["id"])
    assert got["id"] == lease["id"] and got["state"] == "granted"
    assert got["request"] == {"memory": 3 * GiB}
    assert got["gpus"] == [lease["gpus"][0]["id"]]
    assert got["memory_per_gpu"] == 3 * GiB
    assert got["label"] == "x"
    assert got["ended_at"] is None


def test_get_unknown_lease_not_found(broker):
    with pytest.raises(NotFound):
        broker.get(ALICE, "Lnope")


def test_grant_shows_in_pool_and_release_frees_it(broker):
    lease = broker.grant(ALICE, SliceRequest(fraction=0.5), "s")
    gid = lease["gpus"][0]["id"]
    row = gpu_row(broker, gid)
    assert row["used_memory"] == 8 * GiB and row["free_memory"] == 8 * GiB
    assert row["used_share"] == 0.5 and row["leases"] == [lease["id"]]
    out = broker.release(ALICE, lease["id"])
    assert out["state"] == "released"
    row = gpu_row(broker, gid)
    assert row["used_memory"] == 0 and row["leases"] == []
    assert broker.get(ALICE, lease["id"])["state"] == "released"


def test_whole_gpu_lease_holds_all_memory(broker):
    lease = broker.grant(ALICE, SliceRequest(gpus=2), "s")
    assert [g["index"] for g in lease["gpus"]] == [0, 1]
    assert lease["fraction"] == 1.0
    assert all(g["used_memory"] == g["memory"] for g in broker.pool()["gpus"])
    assert sorted(broker.get(ALICE, lease["id"])["gpus"]) == ["ag1/0", "ag1/1"]


def test_default_request_is_one_whole_gpu(broker):
    lease = broker.grant(ALICE, SliceRequest(), "s")
    assert len(lease["gpus"]) == 1 and lease["fraction"] == 1.0
    assert lease["memory_per_gpu"] == 16 * GiB


def test_release_is_idempotent(broker):
    lease = broker.grant(ALICE, SliceRequest(fraction=0.5), "s")
    first = broker.release(ALICE, lease["id"])
    second = broker.release(ALICE, lease["id"], reason="again")
    assert second["state"] == "released"
    assert second["ended_at"] == pytest.approx(first["ended_at"])
    assert second["end_reason"] == first["end_reason"]  # the second call changed nothing


def test_renew_extends_and_issues_new_token(tmp_path):
    b = make_broker(tmp_path, lease_ttl_s=5.0)
    reg = b.register_agent("ag", "h:1", devices(1), "v")
    lease = b.grant(ALICE, SliceRequest(fraction=0.5), "s")
    time.sleep(0.02)
    r = b.renew(ALICE, lease["id"])
    assert r["state"] == "granted"
    assert r["expires_at"] > lease["expires_at"]
    claims = GrantVerifier(reg["public_key"]).verify(r["token"], agent_id="ag")
    assert claims["lease"] == lease["id"] and claims["memory"] == 8 * GiB
    assert claims["exp"] == pytest.approx(r["expires_at"])
    assert b.get(ALICE, lease["id"])["expires_at"] == pytest.approx(r["expires_at"])


def test_renew_released_lease_conflicts(broker):
    lease = broker.grant(ALICE, SliceRequest(fraction=0.5), "s")
    broker.release(ALICE, lease["id"])
    with pytest.raises(Conflict) as e:
        broker.renew(ALICE, lease["id"])
    assert e.value.extra["state"] == "released"


def test_renew_after_ttl_conflicts_and_records_expiry(tmp_path):
    b = make_broker(tmp_path, lease_ttl_s=0.05)
    b.register_agent("ag", "h:1", devices(1), "v")
    lease = b.grant(ALICE, SliceRequest(fraction=0.5), "s")
    time.sleep(0.1)
    with pytest.raises(Conflict) as e:
        b.renew(ALICE, lease["id"])
    assert e.value.extra["state"] == "expired"
    # renew() ends the lease as expired before refusing; that change must be kept.
    got = b.get(ALICE, lease["id"])
    assert got["state"] == "expired"
    assert got["end_reason"] == "not renewed before its TTL"


# -- ownership ------------------------------------------------------------------------------


def test_other_user_is_forbidden(broker):
    lease = broker.grant(ALICE, SliceRequest(fraction=0.5), "s")
    for op in (broker.get, broker.renew, broker.release):
        with pytest.raises(Forbidden) as e:
            op(BOB, lease["id"])
        assert e.value.status == 403
    # Bob's attempts changed nothing.
    assert broker.get(ALICE, lease["id"])["state"] == "granted"


def test_admin_may_act_on_any_lease(broker):
    lease = broker.grant(ALICE, SliceRequest(fraction=0.5), "s")
    assert broker.get(ADMIN, lease["id"])["user"] == "alice"
    assert broker.renew(ADMIN, lease["id"])["state"] == "granted"
    assert broker.release(ADMIN, lease["id"], reason="admin")["state"] == "released"
    assert broker.get(ALICE, lease["id"])["end_reason"] == "admin"


def test_list_leases_scoped_to_user_admin_sees_all(broker):
    a1 = broker.grant(ALICE, SliceRequest(fraction=0.25), "s1")
    time.sleep(0.002)
    a2 = broker.grant(ALICE, SliceRequest(fraction=0.25), "s2")
    b1 = broker.grant(BOB, SliceRequest(fraction=0.25), "s1")
    broker.release(ALICE, a1["id"])
    assert [l["id"] for l in broker.list_leases(ALICE)] == [a2["id"], a1["id"]]  # newest first
    assert [l["id"] for l in broker.list_leases(BOB)] == [b1["id"]]
    assert {l["id"] for l in broker.list_leases(ADMIN)} == {a1["id"], a2["id"], b1["id"]}
    assert [l["id"] for l in broker.list_leases(ALICE, state="granted")] == [a2["id"]]
    assert [l["id"] for l in broker.list_leases(ALICE, session="s1")] == [a1["id"]]
    assert len(broker.list_leases(ADMIN, limit=1)) == 1


# -- capacity -------------------------------------------------------------------------------


def test_capacity_busy_then_freed(broker):
    held = [broker.grant(ALICE, SliceRequest(gpus=1), "s") for _ in range(2)]
    with pytest.raises(NoCapacity) as e:
        broker.grant(BOB, SliceRequest(fraction=0.1), "s")
    assert e.value.reason == "busy" and e.value.status == 409
    broker.release(ALICE, held[0]["id"])
    assert broker.grant(BOB, SliceRequest(fraction=0.1), "s")["state"] == "granted"


def test_capacity_too_large(broker):
    with pytest.raises(NoCapacity) as e:
        broker.grant(ALICE, SliceRequest(memory=17 * GiB), "s")
    assert e.value.reason == "too_large"
    assert "17 GiB" in str(e.value) and "16 GiB" in str(e.value)
    with pytest.raises(NoCapacity) as e:
        broker.grant(ALICE, SliceRequest(gpus=3), "s")
    assert e.value.reason == "too_large"
    assert broker.list_leases(ADMIN) == []  # nothing was recorded


def test_no_agent_is_too_large(tmp_path):
    b = make_broker(tmp_path)
    with pytest.raises(NoCapacity) as e:
        b.grant(ALICE, SliceRequest(fraction=0.5), "s")
    assert e.value.reason == "too_large"


def test_session_affinity_reuses_last_gpu(broker):
    # Bob holds GPU 0 whole, so Alice's session lands on GPU 1.
    hog = broker.grant(BOB, SliceRequest(gpus=1), "b")
    first = broker.grant(ALICE, SliceRequest(fraction=0.25), "nb")
    assert first["gpus"][0]["id"] != hog["gpus"][0]["id"]
    broker.release(BOB, hog["id"])
    broker.release(ALICE, first["id"])
    # Both GPUs idle: a tie, which Alice's session breaks towards the GPU it used last ...
    again = broker.grant(ALICE, SliceRequest(fraction=0.25), "nb")
    assert again["gpus"][0]["id"] == first["gpus"][0]["id"]
    broker.release(ALICE, again["id"])
    # ... while a fresh session gets the lowest id.
    other = broker.grant(ALICE, SliceRequest(fraction=0.25), "nb-new")
    assert other["gpus"][0]["id"] == hog["gpus"][0]["id"]


# -- reaping --------------------------------------------------------------------------------


def test_expired_lease_holds_no_capacity_and_is_reaped(tmp_path):
    b = make_broker(tmp_path, lease_ttl_s=1.0)
    b.register_agent("ag", "h:1", devices(1), "v")
    lease = b.grant(ALICE, SliceRequest(gpus=1), "s")
    with pytest.raises(NoCapacity):
        b.grant(BOB, SliceRequest(gpus=1), "s")
    time.sleep(1.1)
    # Past its TTL the lease holds nothing, even before the reaper ends it.
    assert b.pool()["gpus"][0]["used_memory"] == 0
    out = b.reap()
    assert out["expired"] == [lease["id"]]
    assert out["agents_down"] == [] and out["failed"] == []
    got = b.get(ALICE, lease["id"])
    assert got["state"] == "expired" and got["end_reason"] == "not renewed before its TTL"
    assert b.reap()["expired"] == []  # nothing left to expire
    # Releasing an expired lease changes nothing.
    assert b.release(ALICE, lease["id"])["state"] == "expired"


def test_reap_leaves_live_leases_alone(broker):
    lease = broker.grant(ALICE, SliceRequest(fraction=0.5), "s")
    assert broker.reap() == {"expired": [], "revoked": [], "agents_down": [], "failed": [], "queue_ended": []}
    assert broker.get(ALICE, lease["id"])["state"] == "granted"


def test_reap_marks_silent_agent_down_and_fails_its_leases(tmp_path):
    b = make_broker(tmp_path, lease_ttl_s=30.0, agent_timeout_s=1.0)
    reg = b.register_agent("ag", "h:1", devices(1), "v")
    b.register_agent("alive", "h:2", devices(1), "v")
    lease = b.grant(ALICE, SliceRequest(gpus=1), "s")
    assert lease["agent"]["id"] == "ag"
    time.sleep(1.1)
    alive = b.register_agent("alive", "h:2", devices(1), "v")  # fresh registration: just beat
    b.heartbeat("alive", alive["incarnation"])
    out = b.reap()
    assert out["agents_down"] == ["ag"]
    assert out["failed"] == [lease["id"]]
    got = b.get(ALICE, lease["id"])
    assert got["state"] == "failed" and "heartbeats" in got["end_reason"]
    states = {g["agent"]: g["agent_state"] for g in b.pool()["gpus"]}
    assert states == {"ag": "down", "alive": "up"}
    # A down agent's GPUs are not granted; its heartbeat asks it to register again.
    nxt = b.grant(BOB, SliceRequest(gpus=1), "s")
    assert nxt["agent"]["id"] == "alive"
    with pytest.raises(Conflict) as e:
        b.heartbeat("ag", reg["incarnation"])
    assert e.value.extra["reregister"] is True
    assert b.reap()["agents_down"] == []


def test_heartbeat_keeps_agent_up(tmp_path):
    b = make_broker(tmp_path, agent_timeout_s=2.0)
    reg = b.register_agent("ag", "h:1", devices(1), "v")
    for _ in range(3):
        time.sleep(0.1)
        b.heartbeat("ag", reg["incarnation"])
        assert b.reap()["agents_down"] == []


# -- concurrency ----------------------------------------------------------------------------


def test_concurrent_grants_never_over_commit(broker):
    results: list[dict] = []
    refusals: list[NoCapacity] = []
    errors: list[BaseException] = []
    over: list[dict] = []
    start = threading.Barrier(17)
    done = threading.Event()

    def grant(i):
        start.wait()
        try:
            results.append(broker.grant(Principal(f"user{i}", "user"), SliceRequest(fraction=0.3), f"s{i}"))
        except NoCapacity as e:
            refusals.append(e)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def watch():
        start.wait()
        while not done.is_set():
            for g in broker.pool()["gpus"]:
                if g["used_memory"] > g["memory"]:
                    over.append(g)
            time.sleep(0.001)

    threads = [threading.Thread(target=grant, args=(i,)) for i in range(16)]
    watcher = threading.Thread(target=watch)
    for t in threads + [watcher]:
        t.start()
    for t in threads:
        t.join(20)
    done.set()
    watcher.join(5)

    assert errors == []
    assert len(results) == 6
    assert len(refusals) == 10 and all(e.reason == "busy" for e in refusals)
    per_gpu: dict[str, int] = {}
    for r in results:
        per_gpu[r["gpus"][0]["id"]] = per_gpu.get(r["gpus"][0]["id"], 0) + 1
    assert per_gpu == {"ag1/0": 3, "ag1/1": 3}
    assert over == []
    for g in broker.pool()["gpus"]:
        assert len(g["leases"]) == 3
        assert g["used_memory"] <= g["memory"]
        assert g["used_memory"] == 3 * int(g["memory"] * 0.3)


def test_the_listing_the_database_writes_is_the_listing_python_builds(broker):
    """The HTTP listing's JSON is written by the database (Store.lease_page_json, on SQLite and,
    in test_postgres.py, PostgreSQL); it must say exactly what lease_page says, page by page."""
    import json

    granted = []
    for i in range(23):
        size = [SliceRequest(fraction=1 / 3), SliceRequest(gpus=2), SliceRequest(memory=3 * GiB),
                SliceRequest(fraction=0.1)][i % 4]
        lease = broker.grant(ALICE, size, f"s{i % 3}", label=['cell "7" ü\n', "", "x" * 256][i % 3])
        if i != 22:  # the last stays granted, the rest end
            broker.release(ALICE, lease["id"])
        granted.append(lease["id"])
    broker.grant(BOB, SliceRequest(fraction=0.25), "b")
    # One granted above a quota that borrows: the database writes its "borrowed" object as well.
    from gpu_attach_server.broker.admin import SiteAdmin
    from gpu_attach_server.broker.auth import TokenBook

    SiteAdmin(broker, TokenBook()).set_quota("admin", "user", "bob", 0.25, None, None, borrow=True)
    lent = broker.grant(BOB, SliceRequest(fraction=0.25), "b")
    assert lent["borrowed"]["limit"] == 0.25
    queued = broker.grant(ALICE, SliceRequest(gpus=2), "q", wait_s=30)
    assert queued["state"] == "queued"
    for who, kw, limit in [(ALICE, {}, 5), (ALICE, {"state": "granted"}, 5), (ALICE, {"session": "s1"}, 5),
                           (ADMIN, {}, 5), (BOB, {}, 5), (ALICE, {"state": "queued"}, 5),
                           (ALICE, {"state": "failed"}, 5), (ALICE, {}, 1000), (ADMIN, {}, 1000)]:
        before, pages = None, 0
        while True:
            want = broker.lease_page(who, before=before, limit=limit, **kw)
            got = json.loads(asyncio.run(broker.lease_page_bytes(who, before=before, limit=limit, **kw)))
            assert got == want
            # The same types too (1/3 and timestamps read back as the same doubles).
            assert [{k: type(v) for k, v in x.items() if k != "fraction"} for x in got["leases"]] == [
                {k: type(v) for k, v in x.items() if k != "fraction"} for x in want["leases"]]
            pages += 1
            if got["next"] is None:
                break
            before = got["next"]
        assert pages >= (5 if who is ALICE and not kw and limit == 5 else 1)
    assert json.loads(asyncio.run(broker.lease_page_bytes(ALICE)))["leases"][0]["id"] == queued["id"]
    listed = {x["id"]: x for x in json.loads(asyncio.run(broker.lease_page_bytes(BOB)))["leases"]}
    assert listed[lent["id"]]["borrowed"] == lent["borrowed"]
    broker.release(ALICE, queued["id"])


def test_a_grant_sees_every_change_to_the_pool_made_by_another_broker_on_the_database(tmp_path):
    """Grants read the GPUs that are up from a cache checked against the inventory's version, so a
    second broker (a replica) that registers or loses an agent is seen by the next grant here."""
    engine = make_engine(str(tmp_path / "b.sqlite"))
    a = Broker(Store(engine), GrantSigner.generate(), BrokerSettings(agent_timeout_s=0.2))
    b = Broker(Store(make_engine(str(tmp_path / "b.sqlite"))), GrantSigner.generate())
    a.register_agent("ag1", "127.0.0.1:1", devices(1), "t")
    first = b.grant(ALICE, SliceRequest(gpus=1), "s1")
    assert first["agent"]["id"] == "ag1"
    with pytest.raises(NoCapacity):  # b's inventory now cached: one GPU, held
        b.grant(ALICE, SliceRequest(gpus=1), "s2")
    a.register_agent("ag2", "127.0.0.1:2", devices(1), "t")  # registered through the other broker
    assert b.grant(ALICE, SliceRequest(gpus=1), "s2")["agent"]["id"] == "ag2"
    b.release(ALICE, first["id"])
    # An agent registered again at a new address (once the old one stopped beating): the grant
    # names the new address.
    time.sleep(0.3)
    a.register_agent("ag1", "127.0.0.1:9", devices(1), "t")
    assert b.grant(ALICE, SliceRequest(gpus=1), "s3")["agent"]["address"] == "127.0.0.1:9"
    # Both agents stop beating and the other broker takes them down: nothing is up here either.
    time.sleep(0.3)
    a.reap()
    with pytest.raises(NoCapacity) as e:
        b.grant(ALICE, SliceRequest(fraction=0.1), "s4")
    assert e.value.reason == "too_large" and "no GPU is up" in str(e.value)
