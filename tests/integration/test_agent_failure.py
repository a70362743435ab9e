"""An agent that dies mid-cell: the cell fails with a clear error and the slice is not stuck."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from conftest import TOKENS, Kernel


def test_agent_killed_mid_cell(make_site):
    site = make_site("doomed", heartbeat=0.2, agent_timeout=2.0)
    k = Kernel(dict(os.environ, GPU_ATTACH_BROKER_URL=site.url, GPU_ATTACH_TOKEN=TOKENS["alice"]))
    try:
        result = {}
        t = threading.Thread(target=lambda: result.update(k.run("%%gpu\nimport time\ntime.sleep(60)", timeout=60)))
        t0 = time.monotonic()
        t.start()
        while site.used_memory() == 0 and time.monotonic() - t0 < 15:
            time.sleep(0.05)
        assert site.used_memory() > 0
        time.sleep(1.0)  # let the cell reach its sandbox: the kill should land mid-cell
        site.agents["doomed"].send_signal(signal.SIGKILL)
        t.join(30)
        reply = result["reply"] if "reply" in result else result
        assert reply["status"] == "error"
        assert reply["ename"] == "AgentLost"
        assert "doomed" in reply["evalue"]
        assert time.monotonic() - t0 < 20, "the cell must fail promptly, not wait for its 60 s sleep"
        assert site.used_memory() == 0, "the slice must not be left held"
        lease = site.leases()[0]
        assert lease["state"] in ("released", "failed")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and site.pool()["gpus"][0]["agent_state"] != "down":
            time.sleep(0.1)
        assert site.pool()["gpus"][0]["agent_state"] == "down"
        # A new request fails fast with the reason, instead of hanging.
        reply = k.run("%%gpu\nx = 1")
        assert reply["ename"] == "NoCapacity" and "no GPU is up" in reply["evalue"]
    finally:
        k.stop()


def test_lease_that_is_not_renewed_expires_and_frees_the_slice(make_site):
    site = make_site(heartbeat=0.2, agent_timeout=5.0, lease_ttl=1.0)
    with site.client("alice") as c:
        lease = c.post("/v1/leases", json={"session": "s", "fraction": 0.5}).json()
        assert site.used_memory() > 0
        time.sleep(2.5)
        assert site.used_memory() == 0
        assert c.get(f"/v1/leases/{lease['id']}").json()["state"] == "expired"


def test_agent_stops_a_cell_whose_lease_ended(make_site):
    """Nobody renews this lease: when it expires, the agent kills the cell still running on it."""
    import socket

    from jupyter_gpu_attach import wire

    site = make_site(heartbeat=0.2, agent_timeout=5.0, lease_ttl=1.0)
    # Warm the session's sandbox first: a cold start can take longer than this 1 s TTL, and the
    # agent admits no grant whose lease has already ended.
    from jupyter_gpu_attach import GPUSession

    GPUSession(site.url, TOKENS["alice"], session_id="s").run("pass", {})
    with site.client("alice") as c:
        lease = c.post("/v1/leases", json={"session": "s", "fraction": 0.5}).json()
    host, port = lease["agent"]["address"].rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        wire.send_frame(s, {"op": "hello", "token": lease["token"]})
        assert wire.recv_frame(s).op == "admitted"
        wire.send_frame(s, {"op": "run", "source": "import time\ntime.sleep(60)", "inputs": [], "bound": [], "deleted": []})
        t0 = time.monotonic()
        s.settimeout(20)
        with pytest.raises((wire.PeerClosed, ConnectionResetError)):
            wire.recv_frame(s)
        assert time.monotonic() - t0 < 10
    assert site.used_memory() == 0


def test_a_long_cell_keeps_its_lease_by_renewing(make_site):
    """With a 1 s TTL, a 2.5 s cell survives only if the kernel renews its lease while it runs."""
    from jupyter_gpu_attach import GPUSession

    site = make_site(heartbeat=0.2, agent_timeout=5.0, lease_ttl=1.0)
    session = GPUSession(site.url, TOKENS["alice"])
    ns: dict = {}
    session.run("import time\ntime.sleep(2.5)\ndone = True", ns)
    assert ns["done"] is True
    lease = site.leases()[0]
    assert lease["state"] == "released", lease
    assert lease["expires_at"] - lease["granted_at"] > 2.0, "the lease must have been renewed"
