"""The broker's HTTP API for a shared pool, against a real ``gpu-attach broker --port`` process:
the queue by long-poll, paged listings, the admin API, tokens, metrics, and the client library."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from broker_site import TOKENS, BrokerSite
from jupyter_gpu_attach.broker_client import BrokerClient
from jupyter_gpu_attach.errors import AuthError, NoCapacity
from jupyter_gpu_attach.slices import SliceRequest


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    s = BrokerSite(tmp_path_factory.mktemp("pool"), "--agent-timeout", "3600")
    s.register_fake_agent("h1", 2)
    yield s
    s.stop()


def test_a_queued_request_learns_of_its_grant_at_once(site):
    with site.client("alice") as alice, site.client("bob") as bob:
        held = [alice.post("/v1/leases", json={"session": "a", "gpus": 1}).json() for _ in range(2)]
        r = bob.post("/v1/leases", json={"session": "b", "gpus": 1, "wait_s": 30})
        assert r.status_code == 202
        queued = r.json()
        assert queued["state"] == "queued" and queued["position"] == 1 and queued["of"] == 1
        # The listing shows it too, with its place (the JupyterLab panel's queue view), to its owner only.
        listed = bob.get("/v1/leases").json()["leases"]
        assert listed[0]["id"] == queued["id"] and listed[0]["state"] == "queued" and listed[0]["position"] == 1
        assert [x["id"] for x in bob.get("/v1/leases", params={"state": "queued"}).json()["leases"]] == [queued["id"]]
        assert queued["id"] not in [x["id"] for x in alice.get("/v1/leases").json()["leases"]]
        got = {}

        def poll():
            with site.client("bob") as c:
                t = time.monotonic()
                got["lease"] = c.get(f"/v1/leases/{queued['id']}", params={"wait": 20}).json()
                got["after"] = time.monotonic() - t

        th = threading.Thread(target=poll)
        th.start()
        time.sleep(0.5)
        released = time.monotonic()
        alice.delete(f"/v1/leases/{held[0]['id']}")
        th.join(10)
        assert got["lease"]["state"] == "granted" and got["lease"]["token"]
        assert got["lease"]["id"] == queued["id"]
        # Answered when the GPU was released, not at the end of the 20 s poll.
        assert got["after"] < 0.5 + (time.monotonic() - released) + 0.2
        assert time.monotonic() - released < 1.0
        bob.delete(f"/v1/leases/{queued['id']}")
        alice.delete(f"/v1/leases/{held[1]['id']}")


def test_the_client_waits_in_the_queue_and_reports_position(site):
    alice = BrokerClient(site.url, TOKENS["alice"])
    bob = BrokerClient(site.url, TOKENS["bob"])
    held = [alice.request_lease(SliceRequest(gpus=1), "a") for _ in range(2)]
    seen = []
    threading.Timer(0.6, lambda: alice.release(held[0]["id"])).start()
    lease = bob.request_lease(SliceRequest(gpus=1), "b", wait_s=10, on_queued=lambda *p: seen.append(p))
    assert lease["state"] == "granted"
    assert seen and seen[0][:2] == (1, 1)
    with pytest.raises(NoCapacity) as e:
        bob.request_lease(SliceRequest(gpus=1), "b2", wait_s=0.5)
    assert e.value.reason == "timed_out" and "--wait" in str(e.value)
    with site.client("admin") as admin:
        assert admin.get("/v1/admin/queue").json()["entries"] == []  # the client left the queue
    with pytest.raises(NoCapacity) as e:
        bob.request_lease(SliceRequest(gpus=1), "b3")  # no wait: refused at once
    assert e.value.reason == "busy"
    bob.release(lease["id"])
    alice.release(held[1]["id"])


def test_listings_are_paged_newest_first(site):
    with site.client("carol") as carol:
        ids = []
        for i in range(7):
            lease = carol.post("/v1/leases", json={"session": f"p{i}", "fraction": 0.01}).json()
            carol.delete(f"/v1/leases/{lease['id']}")
            ids.append(lease["id"])
        seen, before = [], None
        while True:
            params = {"limit": 3, **({"before": before} if before else {})}
            page = carol.get("/v1/leases", params=params).json()
            seen += [lz["id"] for lz in page["leases"]]
            before = page["next"]
            if before is None:
                break
        assert seen == ids[::-1]
        assert carol.get("/v1/leases", params={"before": "nonsense"}).status_code == 422


def test_admin_routes_need_the_admin_token(site):
    agent = {"Authorization": f"Bearer {site.enrol('h1')}"}  # an enrolled agent is no admin either
    for c in (site.client("alice"), httpx.Client(base_url=site.url, headers=agent)):
        with c:
            for path in ("/v1/admin/agents", "/v1/admin/leases", "/v1/admin/queue", "/v1/admin/quotas",
                         "/v1/admin/usage?since=0", "/v1/admin/audit", "/v1/admin/tokens"):
                assert c.get(path).status_code == 403, path
            assert c.post("/v1/admin/tokens", json={"user": "x"}).status_code == 403
    with httpx.Client(base_url=site.url) as anon:
        assert anon.get("/v1/admin/agents").status_code == 401
        assert anon.get("/metrics").status_code == 401
    with site.client("alice") as c:
        assert c.get("/metrics").status_code == 403
    with site.client("metrics") as c:
        assert c.get("/metrics").status_code == 200
        assert c.get("/v1/leases").status_code == 401  # the scrape token can do nothing else


def test_admin_sees_and_steers_the_pool(site):
    with site.client("admin") as admin, site.client("alice") as alice:
        lease = alice.post("/v1/leases", json={"session": "nb-7", "fraction": 0.5, "label": "cell 4"}).json()
        agents = admin.get("/v1/admin/agents").json()
        assert [a["id"] for a in agents] == ["h1"] and agents[0]["gpus"] == 2
        rows = admin.get("/v1/admin/leases", params={"user": "alice", "state": "granted"}).json()["leases"]
        row = next(r for r in rows if r["id"] == lease["id"])
        assert row["session"] == "nb-7" and row["label"] == "cell 4" and row["age_s"] >= 0
        r = admin.post(f"/v1/admin/leases/{lease['id']}/revoke", json={"reason": "maintenance"})
        assert r.status_code == 200 and r.json()["state"] == "revoked"
        r = alice.post(f"/v1/leases/{lease['id']}/renew")
        assert r.status_code == 409 and "maintenance" in r.json()["detail"]
        assert admin.post("/v1/admin/agents/h1/gpus/0/drain", json={"reason": "fan"}).status_code == 200
        assert {g["id"]: g["drained"] for g in admin.get("/v1/admin/gpus").json()} == {"h1/0": True, "h1/1": False}
        got = alice.post("/v1/leases", json={"session": "s", "fraction": 0.1}).json()
        assert got["gpus"][0]["id"] == "h1/1"
        alice.delete(f"/v1/leases/{got['id']}")
        assert admin.post("/v1/admin/agents/h1/gpus/0/undrain").status_code == 200
        assert admin.post("/v1/admin/agents/nope/gpus/9/drain", json={}).status_code == 404
        actions = [a["action"] for a in admin.get("/v1/admin/audit").json()]
        assert actions[:3] == ["gpu.undrain", "gpu.drain", "lease.revoke"]


def test_quota_refusal_over_http(site):
    with site.client("admin") as admin, site.client("bob") as bob:
        r = admin.put("/v1/admin/quotas/user/bob", json={"max_share": 0.5})
        assert r.status_code == 200 and r.json()["max_share"] == 0.5
        held = bob.post("/v1/leases", json={"session": "s", "fraction": 0.4}).json()
        r = bob.post("/v1/leases", json={"session": "s", "fraction": 0.2})
        assert r.status_code == 409
        body = r.json()
        assert body["reason"] == "over_quota" and body["asked"] == 0.2 and body["in_use"] == 0.4 and body["limit"] == 0.5
        assert admin.put("/v1/admin/quotas/user/bob", json={"max_share": -1}).status_code == 422
        # With borrow, the same request is granted on idle capacity, and says so.
        r = admin.put("/v1/admin/quotas/user/bob", json={"max_share": 0.5, "borrow": True})
        assert r.status_code == 200 and r.json()["borrow"] is True
        r = bob.post("/v1/leases", json={"session": "s", "fraction": 0.2})
        assert r.status_code == 201 and r.json()["borrowed"]["limit"] == 0.5
        lent = r.json()["id"]
        # Every view of the lease says it is borrowed (the panel and `gpu-attach admin leases` too).
        listed = {x["id"]: x for x in bob.get("/v1/leases").json()["leases"]}
        assert listed[lent]["borrowed"]["limit"] == 0.5 and listed[lent]["borrowed"]["asked"] == 0.2
        assert listed[held["id"]]["borrowed"] is None
        assert bob.get(f"/v1/leases/{lent}").json()["borrowed"]["in_use"] == 0.4
        as_admin = {x["id"]: x for x in admin.get("/v1/admin/leases").json()["leases"]}
        assert as_admin[lent]["borrowed"]["quota"]["subject"] == "bob"
        bob.delete(f"/v1/leases/{lent}")
        assert bob.get(f"/v1/leases/{lent}").json()["borrowed"]["limit"] == 0.5, "an ended lease still says so"
        assert admin.put("/v1/admin/quotas/user/bob", json={"borrow": "sometimes"}).status_code == 422
        assert admin.delete("/v1/admin/quotas/user/bob").status_code == 200
        assert admin.delete("/v1/admin/quotas/user/bob").status_code == 404
        bob.delete(f"/v1/leases/{held['id']}")


def test_tokens_made_by_the_admin_work_until_revoked(site):
    with site.client("admin") as admin:
        made = admin.post("/v1/admin/tokens", json={"user": "dana", "label": "laptop"})
        assert made.status_code == 201
        token = made.json()["token"]
        listed = admin.get("/v1/admin/tokens", params={"user": "dana"}).json()
        assert [t["id"] for t in listed] == [made.json()["id"]] and "token" not in listed[0]
        with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {token}"}) as dana:
            assert dana.get("/v1/whoami").json() == {"name": "dana", "role": "user"}
            assert "dana" in {u["name"] for u in admin.get("/v1/admin/users").json()}
            assert admin.delete(f"/v1/admin/tokens/{made.json()['id']}").status_code == 200
            deadline = time.monotonic() + 10
            while dana.get("/v1/whoami").status_code == 200:
                assert time.monotonic() < deadline, "a revoked token kept working"
                time.sleep(0.5)
    with pytest.raises(AuthError):
        BrokerClient(site.url, token).whoami()


def test_usage_report_and_metrics(site):
    t0 = time.time()
    as_h2 = {"Authorization": f"Bearer {site.enrol('h2')}"}  # the agent's own credential
    with site.client("alice") as alice, httpx.Client(base_url=site.url, headers=as_h2) as agent, \
            site.client("admin") as admin:
        lease = alice.post("/v1/leases", json={"session": "u", "gpus": 1}).json()
        incarnation = site.register_fake_agent("h2", 1, pool="beat")["incarnation"]
        running = alice.post("/v1/leases", json={"session": "r", "gpus": 1, "pool": "beat"}).json()
        beat = agent.post("/v1/agents/h2/heartbeat", json={"incarnation": incarnation, "running": [running["id"]]})
        assert running["id"] in beat.json()["active"]
        text = admin.get("/metrics").text
        assert 'gpu_attach_gpu_running_cells{agent="h2",gpu="h2/0",pool="beat"} 1.0' in text
        assert 'gpu_attach_gpu_running_cells{agent="h1",gpu="h1/0",pool="default"} 0.0' in text
        assert 'gpu_attach_gpu_leases{agent="h1",gpu="h1/0",pool="default"} 1.0' in text  # held, not running
        alice.delete(f"/v1/leases/{running['id']}")
        time.sleep(0.3)
        alice.delete(f"/v1/leases/{lease['id']}")
    with site.client("admin") as admin:
        rows = admin.get("/v1/admin/usage", params={"since": t0, "by": "user"}).json()["rows"]
        row = next(r for r in rows if r["user"] == "alice")
        assert 0.25 < row["granted_gpu_s"] < 1.0
        assert row["busy_gpu_s"] == 0 and row["idle_share"] == 1.0  # no agent reported a cell running
        by_gpu = admin.get("/v1/admin/usage", params={"since": t0, "by": "gpu"}).json()["rows"]
        assert {r["gpu"] for r in by_gpu} <= {"h1/0", "h1/1", "h2/0"}
        assert admin.get("/v1/admin/usage", params={"since": t0, "until": t0 - 5}).json()["rows"] == []
        text = admin.get("/metrics").text
    assert "gpu_attach_grants_total" in text
    assert 'gpu_attach_refusals_total{reason="busy"}' in text
    assert "gpu_attach_queue_wait_seconds_bucket" in text
    assert 'gpu_attach_lease_duration_seconds_count{state="released"}' in text
    assert 'gpu_attach_gpu_allocated_share{agent="h1",gpu="h1/0",pool="default"}' in text
    assert "gpu_attach_queue_length 0.0" in text


@pytest.mark.parametrize("body, status, names", [
    ({"session": "s", "fraction": -0.5}, 422, "fraction"),
    ({"session": "s", "gpus": 0}, 422, "gpus"),
    ({"session": "s", "gpus": 10**9}, 422, "gpus"),
    ({"session": "s", "memory": "0GiB"}, 422, "memory"),
    ({"session": "s", "memory": 2**50 + 1}, 422, "memory"),
    ({"session": "s", "gpus": 1, "fraction": 0.5}, 422, "one of"),
    ({"session": "s", "gpus": 1, "colour": "red"}, 422, "colour"),
    ({"session": "s", "wait_s": -1}, 422, "wait_s"),
    ({"session": "s", "fraction": 0.5, "pool": "nowhere"}, 409, "no GPU is up in pool 'nowhere' (pools with GPUs up:"),
    ({"session": "bad name!", "gpus": 1}, 422, "session"),
])
def test_bad_requests_get_a_4xx_naming_the_problem_and_change_nothing(site, body, status, names):
    with site.client("admin") as admin, site.client("alice") as alice:
        before = admin.get("/v1/admin/leases", params={"limit": 1000}).json()["leases"]
        r = alice.post("/v1/leases", json=body)
        assert r.status_code == status
        assert names in str(r.json()["detail"])
        assert admin.get("/v1/admin/leases", params={"limit": 1000}).json()["leases"] == before
        assert admin.get("/v1/admin/queue").json()["entries"] == []


def test_the_schema_says_which_sizes_exclude_each_other(site):
    with site.client("alice") as c:
        doc = c.get("/openapi.json").json()
    lease = doc["components"]["schemas"]["LeaseRequest"]
    assert {"required": ["gpus", "fraction"]}.items() <= lease["not"]["anyOf"][0].items()
    post = doc["paths"]["/v1/leases"]["post"]["responses"]
    assert {"201", "202", "401", "403", "409", "413", "422"} <= set(post)
    assert "/v1/admin/usage" in doc["paths"] and "/metrics" in doc["paths"]
