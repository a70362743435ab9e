"""Usage accounting (granted vs busy GPU-seconds from agents' reports) and the cost of listings."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import event

from gpu_attach_server.broker.admin import SiteAdmin
from gpu_attach_server.broker.auth import Principal, TokenBook
from gpu_attach_server.broker.core import Broker, BrokerSettings
from gpu_attach_server.broker.store import Store, make_engine
from gpu_attach_server.grant_tokens import GrantSigner
from jupyter_gpu_attach.slices import SliceRequest

GiB = 1 << 30
ALICE, BOB, ADMIN = Principal("alice", "user"), Principal("bob", "user"), Principal("admin", "admin")


@pytest.fixture
def broker(tmp_path):
    engine = make_engine(str(tmp_path / "b.db"))
    statements: list[str] = []

    @event.listens_for(engine, "connect")
    def _trace(dbapi_conn, _record):
        dbapi_conn.set_trace_callback(statements.append)

    b = Broker(Store(engine), GrantSigner.generate(), BrokerSettings(heartbeat_interval_s=1.0))
    b.register_agent("h1", "127.0.0.1:1", [dict(index=i, uuid=f"G{i}", model="Sim", memory=16 * GiB,
                                                 simulated=True, pool=None) for i in range(2)], "t")
    b.statements = statements
    return b


def test_busy_time_comes_from_the_agents_running_list(broker):
    admin = SiteAdmin(broker, TokenBook())
    t0 = time.time()
    busy = broker.grant(ALICE, SliceRequest(gpus=1), "a")
    idle = broker.grant(BOB, SliceRequest(fraction=0.5), "b")
    broker.record_busy("h1", [])  # the first beat only starts the clock
    for _ in range(4):
        time.sleep(0.1)
        broker.record_busy("h1", [busy["id"]])  # alice's cell runs; bob's lease is held but idle
    broker.record_busy("h1", [])
    broker.release(ALICE, busy["id"])
    broker.release(BOB, idle["id"])
    broker.reap()  # stores the busy time
    rows = {r["user"]: r for r in admin.usage(t0, time.time(), "user")["rows"]}
    a, b = rows["alice"], rows["bob"]
    assert a["busy_gpu_s"] == pytest.approx(0.4, abs=0.1)
    assert a["granted_gpu_s"] >= a["busy_gpu_s"]
    assert b["busy_gpu_s"] == 0 and b["idle_share"] == 1.0
    assert b["granted_gpu_s"] == pytest.approx(a["granted_gpu_s"] / 2, rel=0.3)  # half a GPU
    assert a["static_gpu_s"] > 0
    by_gpu = {r["gpu"]: r for r in admin.usage(t0, time.time(), "gpu")["rows"]}
    assert by_gpu[busy["gpus"][0]["id"]]["busy_gpu_s"] == pytest.approx(a["busy_gpu_s"])


def test_busy_time_on_real_gpus_is_weighted_by_their_utilisation(broker):
    """Where the agent measured NVML utilisation, a running cell counts that share as busy (a
    cell waiting on its CPU holds an idle GPU); where it did not, its running time."""
    admin = SiteAdmin(broker, TokenBook())
    t0 = time.time()
    hot = broker.grant(ALICE, SliceRequest(gpus=1), "a")
    cool = broker.grant(BOB, SliceRequest(gpus=1), "b")
    broker.record_busy("h1", [])
    for _ in range(4):
        time.sleep(0.1)
        broker.record_busy("h1", [hot["id"], cool["id"]], {hot["id"]: 1.0, cool["id"]: 0.25})
    broker.release(ALICE, hot["id"])
    broker.release(BOB, cool["id"])
    broker.reap()
    rows = {r["user"]: r for r in admin.usage(t0, time.time(), "user")["rows"]}
    assert rows["alice"]["busy_gpu_s"] == pytest.approx(0.4, abs=0.1)
    assert rows["bob"]["busy_gpu_s"] == pytest.approx(rows["alice"]["busy_gpu_s"] / 4, rel=0.05)


def test_an_agents_utilisation_report_is_bounded():
    from gpu_attach_server.broker.models import Heartbeat
    from pydantic import ValidationError

    assert Heartbeat(incarnation="x", running=["L1"], utilisation={"L1": 0.5}).utilisation == {"L1": 0.5}
    for bad in ({"L1": 1.5}, {"L1": -0.1}, {"L1": "high"}):
        with pytest.raises(ValidationError):
            Heartbeat(incarnation="x", running=["L1"], utilisation=bad)


def test_an_agent_cannot_invent_leases_for_accounting(broker):
    broker.record_busy("h1", [])
    time.sleep(0.05)
    broker.record_busy("h1", ["Ldeadbeef0000"])
    broker.reap()
    with broker.store.read() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM lease_busy").scalar() == 0


def test_a_listing_page_is_one_statement_whatever_its_size(broker):
    for i in range(60):
        lease = broker.grant(ALICE, SliceRequest(fraction=0.01), f"s{i}")
        broker.release(ALICE, lease["id"])
    for limit in (5, 50):
        broker.statements.clear()
        page = broker.lease_page(ALICE, limit=limit)
        assert len(page["leases"]) == limit and all(lz["gpus"] for lz in page["leases"])
        queries = [s for s in broker.statements if s.lstrip().upper().startswith("SELECT")]
        assert len(queries) == 1, queries
    ids, before = [], None
    while True:
        page = broker.lease_page(ADMIN, limit=25, before=before)
        ids += [lz["id"] for lz in page["leases"]]
        before = page["next"]
        if before is None:
            break
    assert len(ids) == len(set(ids)) == 60
