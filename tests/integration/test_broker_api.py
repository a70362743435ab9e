"""The broker's HTTP API against a real broker process: auth, validation, capacity, limits."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

from conftest import TOKENS
from jupyter_gpu_attach import wire


def test_every_lease_route_needs_a_known_token(site):
    for token in (None, "wrong-token-0123456789abcdef"):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with httpx.Client(base_url=site.url, headers=headers) as c:
            assert c.post("/v1/leases", json={"session": "s", "gpus": 1}).status_code == 401
            assert c.get("/v1/pool").status_code == 401
            assert c.get("/v1/leases").status_code == 401
            assert c.delete("/v1/leases/L000000000000").status_code == 401
            r = c.post("/v1/agents", json={})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_a_lease_belongs_to_its_owner(site):
    with site.client("alice") as alice, site.client("bob") as bob, site.client("admin") as admin:
        lease = alice.post("/v1/leases", json={"session": "nb-a", "fraction": 0.1}).json()
        lid = lease["id"]
        assert bob.get(f"/v1/leases/{lid}").status_code == 403
        assert bob.post(f"/v1/leases/{lid}/renew").status_code == 403
        assert bob.delete(f"/v1/leases/{lid}").status_code == 403
        assert all(lz["user"] == "bob" for lz in bob.get("/v1/leases").json()["leases"])
        assert alice.post(f"/v1/leases/{lid}/renew").json()["expires_at"] >= lease["expires_at"]
        assert admin.get(f"/v1/leases/{lid}").json()["user"] == "alice"
        assert alice.delete(f"/v1/leases/{lid}").json()["state"] == "released"
        assert alice.delete(f"/v1/leases/{lid}").json()["state"] == "released"  # idempotent
        r = alice.post(f"/v1/leases/{lid}/renew")
        assert r.status_code == 409 and "released" in r.json()["detail"]


def test_roles_are_kept_apart(site):
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {TOKENS['agent9']}"}) as agent:
        assert agent.post("/v1/leases", json={"session": "s", "gpus": 1}).status_code == 403
    with site.client("alice") as alice:
        r = alice.post("/v1/agents", json={"agent_id": "evil", "address": "127.0.0.1:1", "devices": []})
        assert r.status_code == 403
        assert alice.post("/v1/agents/gpu-host-1/heartbeat", json={"incarnation": "x"}).status_code == 403


def test_an_agent_token_bound_to_an_id_acts_only_as_that_agent(site):
    device = {"index": 0, "uuid": "GPU-x", "model": "m", "memory": 1 << 30, "simulated": True}
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {TOKENS['agent9']}"}) as a9:
        r = a9.post("/v1/agents", json={"agent_id": "gpu-host-1", "address": "127.0.0.1:1", "devices": [device]})
        assert r.status_code == 403 and "gpu-host-9" in r.json()["detail"]
        assert a9.post("/v1/agents/gpu-host-1/heartbeat", json={"incarnation": "x"}).status_code == 403
    # The shared agent token authenticates nothing: it cannot register or replace an agent.
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {TOKENS['agent']}"}) as shared:
        r = shared.post("/v1/agents", json={"agent_id": "gpu-host-1", "address": "127.0.0.1:1", "devices": [device]})
        assert r.status_code == 401
    # A live agent's id cannot be taken over from another address, even with its own credential.
    own = site.credentials["gpu-host-1"]
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {own}"}) as a1:
        r = a1.post("/v1/agents", json={"agent_id": "gpu-host-1", "address": "127.0.0.1:1", "devices": [device]})
        assert r.status_code == 409 and "in use by a live agent" in r.json()["detail"]
    assert all(g["agent_state"] == "up" for g in site.pool()["gpus"])


def test_malformed_requests_get_422_naming_the_field(site):
    with site.client("alice") as c:
        r = c.post("/v1/leases", json={"session": "s", "fraction": 2})
        assert r.status_code == 422
        assert any(e["loc"][-1] == "fraction" for e in r.json()["detail"])
        r = c.post("/v1/leases", json={"session": "s", "memory": "lots"})
        assert r.status_code == 422 and "2GiB" in str(r.json()["detail"])
        r = c.post("/v1/leases", json={"session": "s", "memory": "1GiB", "gpus": 1})
        assert r.status_code == 422 and "one of" in str(r.json()["detail"])
        r = c.post("/v1/leases", json={"fraction": 0.5})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "session"
        r = c.post("/v1/leases", json={"session": "s", "gpus": 1, "surprise": True})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "surprise"
        assert c.get("/v1/leases/not-a-lease-id").status_code == 422


def test_oversized_bodies_are_refused(site):
    with site.client("alice") as c:
        r = c.post("/v1/leases", content=b'{"session": "' + b"x" * (2 * 1024 * 1024) + b'"}',
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413


def test_capacity_refusals_say_why(site):
    with site.client("alice") as c:
        r = c.post("/v1/leases", json={"session": "s", "memory": "40GiB"})
        assert r.status_code == 409 and r.json()["reason"] == "too_large"
        assert "16 GiB" in r.json()["detail"]
        r = c.post("/v1/leases", json={"session": "s", "gpus": 3})
        assert r.status_code == 409 and r.json()["reason"] == "too_large"
        held = [c.post("/v1/leases", json={"session": "s", "gpus": 1}).json()["id"] for _ in range(2)]
        r = c.post("/v1/leases", json={"session": "s", "fraction": 0.1})
        assert r.status_code == 409 and r.json()["reason"] == "busy"
        for lid in held:
            c.delete(f"/v1/leases/{lid}")
    assert site.used_memory() == 0


def test_concurrent_grants_never_over_commit(site):
    """40 simultaneous requests for 0.3 of a GPU on 2 GPUs: exactly 3 fit on each."""
    samples = []
    stop = threading.Event()

    def watch():
        with site.client("admin") as c:
            while not stop.is_set():
                samples.append(c.get("/v1/pool").json())

    def ask(i):
        with site.client("alice" if i % 2 else "bob") as c:
            return c.post("/v1/leases", json={"session": f"s{i}", "fraction": 0.3})

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(max_workers=20) as pool:
        replies = list(pool.map(ask, range(40)))
    stop.set()
    watcher.join()
    granted = [r.json() for r in replies if r.status_code == 201]
    refused = [r for r in replies if r.status_code != 201]
    assert len(granted) == 6
    assert all(r.status_code == 409 and r.json()["reason"] == "busy" for r in refused)
    per_gpu = {}
    for g in granted:
        per_gpu.setdefault(g["gpus"][0]["id"], []).append(g)
    assert sorted(len(v) for v in per_gpu.values()) == [3, 3]
    for snapshot in samples + [site.pool()]:
        for gpu in snapshot["gpus"]:
            assert gpu["used_memory"] <= gpu["memory"]
    for g in granted:
        with site.client(g["user"]) as c:
            assert c.delete(f"/v1/leases/{g['id']}").status_code == 200
    assert site.used_memory() == 0


def test_agent_refuses_forged_and_misdirected_grants(site):
    from gpu_attach_server.grant_tokens import GrantSigner

    with site.client("alice") as c:
        lease = c.post("/v1/leases", json={"session": "s", "fraction": 0.1}).json()
    host, port = lease["agent"]["address"].rsplit(":", 1)
    body, sig = lease["token"].split(".")
    forged = GrantSigner.generate().sign({"lease": lease["id"], "user": "alice", "session": "s", "agent": "gpu-host-1",
                                          "gpus": [0], "uuids": [], "memory": 1, "simulated": True, "exp": 4e9})
    for token, why in ((forged, "signature"), (body + "." + sig[::-1], "signature"), ("garbage", "malformed")):
        with socket.create_connection((host, int(port))) as s:
            wire.send_frame(s, {"op": "hello", "token": token})
            reply = wire.recv_frame(s)
            assert reply.op == "reject" and why in reply.header["message"]
    with site.client("alice") as c:
        c.delete(f"/v1/leases/{lease['id']}")


def test_openapi_document_is_served(site):
    with site.client("alice") as c:
        doc = c.get("/openapi.json").json()
    assert "/v1/leases" in doc["paths"] and "/v1/pool" in doc["paths"]
