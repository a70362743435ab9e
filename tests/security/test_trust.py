"""Who may be an agent, what a kernel trusts, and what a grant admits (issue 6).

A rogue listener on an agent's address gets nothing and is never unpickled; the shared agent
token registers nothing; a grant admits nothing once its lease ended, and a running cell stops
within ~100 ms of its lease's release; a flood of idle connections cannot crowd out real cells;
a declared input over the sandbox's memory limit is refused without killing the session.
"""

from __future__ import annotations

import io
import os
import pickle
import socket
import threading
import time

import httpx
import pytest

from conftest import TOKENS

from jupyter_gpu_attach import GPUSession, wire
from jupyter_gpu_attach.errors import CellRejected

from .conftest import needs_root, run

pytestmark = pytest.mark.usefixtures("neighbour_survives")


class _Evil:
    """Unpickling this runs code: the rogue's payload."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class RogueAgent:
    """A process that took an agent's address: it answers every hello as if it were the agent."""

    def __init__(self, proof: str | None = None):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.frames: list[dict] = []
        self.proof = proof
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(2)
                    self.frames.append(wire.recv_frame(conn).header)
                    admitted = {"op": "admitted", "sandbox_pid": 1, "warm": True}
                    if self.proof:
                        admitted["proof"] = self.proof
                    wire.send_frame(conn, admitted)
                    evil = pickle.dumps(_Evil(self.marker))
                    wire.send_frame(conn, {"op": "result", "values": {"x": {"pickle": 0}}, "failures": {},
                                           "deleted": [], "elapsed": 0.0}, [evil])
                    while True:
                        self.frames.append(wire.recv_frame(conn).header)
                except (wire.WireError, OSError):
                    pass

    def close(self):
        self.listener.close()


@pytest.mark.parametrize("proof", [None, "AAAA" * 22])
def test_a_rogue_listener_on_the_agents_address_gets_nothing_and_is_never_unpickled(site, tmp_path, monkeypatch, proof):
    rogue = RogueAgent(proof)
    rogue.marker = tmp_path / "pwned"
    session = GPUSession(site.url, TOKENS["alice"], session_id="rogue-victim")
    real = session.broker.request_lease

    def redirected(*a, **k):
        lease = real(*a, **k)
        lease["agent"]["address"] = rogue.address  # the address the kernel dials now belongs to the rogue
        return lease

    monkeypatch.setattr(session.broker, "request_lease", redirected)
    try:
        with pytest.raises(CellRejected, match="prove"):
            session.run("x = secret * 2", {"secret": 21}, stdout=io.StringIO(), stderr=io.StringIO())
    finally:
        rogue.close()
    time.sleep(0.2)
    assert not rogue.marker.exists(), "the kernel unpickled what the rogue sent"
    assert [f["op"] for f in rogue.frames] == ["hello"], f"the rogue got more than the hello: {rogue.frames}"


def test_the_shared_agent_token_cannot_register_or_replace_an_agent(site):
    device = {"index": 0, "uuid": "GPU-rogue", "model": "m", "memory": 1 << 40, "simulated": True}
    body = {"agent_id": "rogue", "address": "127.0.0.1:1", "devices": [device]}
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {TOKENS['agent']}"}) as shared:
        assert shared.post("/v1/agents", json=body).status_code == 401
        assert shared.post("/v1/agents", json=dict(body, agent_id="gpu-host-1")).status_code == 401
        assert shared.put("/v1/agents/rogue/key", json={"public_key": "x"}).status_code == 401
    with site.client("alice") as alice:  # a user cannot enrol agents either
        assert alice.post("/v1/agents/rogue/credential").status_code == 403
    # An enrolled agent acts only as itself.
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {site.credentials['gpu-host-1']}"}) as a1:
        assert a1.post("/v1/agents", json=body).status_code == 403
        assert a1.put("/v1/agents/rogue/key", json={"public_key": "x"}).status_code == 403
    assert {g["agent"] for g in site.pool()["gpus"]} == {"gpu-host-1"}


def test_a_revoked_agent_credential_stops_working(site):
    token = site.enrol("short-lived")
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {token}"}) as a:
        assert a.get("/v1/agents/short-lived/lease-ends").status_code == 200
        with site.client("admin") as admin:
            assert admin.delete("/v1/agents/short-lived/credential").json()["revoked"] is True
        assert a.get("/v1/agents/short-lived/lease-ends").status_code == 401


def _hello(lease):
    host, port = lease["agent"]["address"].rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    wire.send_frame(s, {"op": "hello", "token": lease["token"]})
    return s


def test_a_grant_whose_lease_was_released_admits_nothing(site):
    refused = 0
    for i in range(5):
        with site.client("alice") as c:
            lease = c.post("/v1/leases", json={"session": "stale", "fraction": 0.1}).json()
            c.delete(f"/v1/leases/{lease['id']}")
        time.sleep(0.1)  # the agent hears of the release within 100 ms
        with _hello(lease) as s:
            reply = wire.recv_frame(s)
        refused += reply.op == "reject" and "ended" in reply.header["message"]
    assert refused == 5


def test_a_running_cell_stops_within_100ms_of_its_lease_release(site):
    run(GPUSession(site.url, TOKENS["alice"], session_id="released"), "pass")  # a warm sandbox
    stops = []
    for _ in range(5):
        with site.client("alice") as c:
            lease = c.post("/v1/leases", json={"session": "released", "fraction": 0.1}).json()
        with _hello(lease) as s:
            assert wire.recv_frame(s).op == "admitted"
            wire.send_frame(s, {"op": "run", "source": "import time\ntime.sleep(30)", "inputs": [], "bound": [],
                                "deleted": []})
            time.sleep(0.3)
            with site.client("alice") as c:
                t0 = time.monotonic()
                c.delete(f"/v1/leases/{lease['id']}")
            s.settimeout(10)
            with pytest.raises((wire.PeerClosed, ConnectionResetError)):
                while True:
                    wire.recv_frame(s)
            stops.append(time.monotonic() - t0)
    # 100 ms is the promise (a quiet 2-core machine: 0.04-0.15 s, release call included). CI
    # machines are shared and slow, so the bounds have room; the old heartbeat path took 1.4-1.9 s.
    assert sorted(stops)[len(stops) // 2] < 0.2, stops
    assert max(stops) < 1.0, stops


def test_a_flood_of_idle_connections_does_not_crowd_out_real_cells(site):
    host, port = site.agents_address().rsplit(":", 1)
    idle = [socket.create_connection((host, int(port))) for _ in range(200)]
    stop = threading.Event()

    def keep_flooding():  # reconnecting, as the attacker did
        conns = []
        while not stop.is_set():
            try:
                conns.append(socket.create_connection((host, int(port)), timeout=1))
            except OSError:
                pass
            if len(conns) > 100:
                conns.pop(0).close()
            time.sleep(0.002)
        for c in conns:
            c.close()

    t = threading.Thread(target=keep_flooding, daemon=True)
    t.start()
    try:
        session = GPUSession(site.url, TOKENS["alice"], session_id="flooded")
        for i in range(5):
            t0 = time.monotonic()
            assert run(session, "y = x + 1", {"x": i})["y"] == i + 1
            assert time.monotonic() - t0 < 5
    finally:
        stop.set()
        t.join()
        for c in idle:
            c.close()


@needs_root  # the limit is the sandbox's cgroup memory limit
def test_a_declared_input_over_the_memory_limit_is_refused_and_the_session_lives_on(site):
    session = GPUSession(site.url, TOKENS["alice"], session_id="big-input")
    run(session, "import builtins, os\nbuiltins.kept = 'state'\npid = os.getpid()")
    with site.client("alice") as c:
        lease = c.post("/v1/leases", json={"session": "big-input", "fraction": 0.1}).json()
    with _hello(lease) as s:
        assert wire.recv_frame(s).op == "admitted"
        # A run frame that declares one 48 GiB buffer, and sends none of it.
        head = b'{"op":"run","source":"pass","inputs":[],"bound":[],"deleted":[]}'
        s.sendall(wire._PREFIX.pack(wire.MAGIC, len(head), 1) + wire._LEN.pack(48 << 30) + head)
        s.settimeout(10)
        reply = wire.recv_frame(s)
    assert reply.op == "result" and reply.header["error"]["etype"] == "gpu_attach.ProtocolError", reply.header
    message = reply.header["error"]["message"]
    assert str(48 << 30) in message and str(1 << 30) in message, reply.header
    with site.client("alice") as c:
        c.delete(f"/v1/leases/{lease['id']}")
    ns = run(session, "import builtins, os\nkept = builtins.kept\npid = os.getpid()")
    assert ns["kept"] == "state"
