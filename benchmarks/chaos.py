"""Chaos trials: SIGKILL the kernel, the agent or the broker mid-cell, and count what went wrong.

Each trial runs on a fresh site (a broker and one agent with one SIMULATED device, real
processes, the agent as root with per-user uids and cgroups where the host allows). Counted:

- stuck slices: a slice still held 1 s after its kernel died (or after the agent came back);
- double grants: two leases holding the one whole GPU at the same time (from the broker's records);
- overlaps: a cell (or a process it started) still running after its slice was granted again,
  from timestamps the cell itself writes every 20 ms;
- orphans: processes a cell started that are alive after their session or agent is gone;
- lost leases: a cell that failed although nothing but the injected fault happened to it, in the
  cases where the system promises to ride the fault out (a broker outage shorter than the TTL);
- recoveries: the next cell after the fault runs.

    python benchmarks/chaos.py --trials 20            # all scenarios, 20 trials each
    python benchmarks/chaos.py --trials 3 --scenario kernel
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from gpu_attach_server.cli import wait_ready

ADMIN, ALICE = "admin-" + secrets.token_hex(12), "alice-" + secrets.token_hex(12)
# The cell, and the child it starts in a new session, send a datagram every 20 ms to the harness,
# which notes when each arrived: that survives the sandbox and its files.
TICK_CELL = textwrap.dedent("""\
    import os, socket, subprocess, sys, threading, time
    LOOP = "import socket, time\\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\\nwhile True:\\n    s.sendto(b't', ('127.0.0.1', PORT))\\n    time.sleep(0.02)\\n"
    def tick(sleep=time.sleep, sock=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)):
        while True:
            sock.sendto(b't', ('127.0.0.1', PORT))
            sleep(0.02)
    threading.Thread(target=tick, daemon=True).start()
    child = 0
    if CHILDREN:
        child = subprocess.Popen([sys.executable, '-c', LOOP], start_new_session=True).pid
    print('HOME', os.environ['HOME'], os.getpid(), child, flush=True)
    time.sleep(SECONDS)
    done = True
""")
KERNEL = textwrap.dedent("""\
    import os, sys, threading, time
    from jupyter_gpu_attach import GPUSession
    from jupyter_gpu_attach.slices import SliceRequest
    url, token, sid, source = sys.argv[1:5]
    s = GPUSession(url, token, default=SliceRequest(gpus=1), session_id=sid)
    def beat():
        while True:
            try:
                s.broker.session_alive(sid)
            except Exception:
                pass
            time.sleep(0.5)
    threading.Thread(target=beat, daemon=True).start()
    try:
        ns = {}
        s.run(source, ns)
        print('RESULT ok', flush=True)
    except Exception as e:
        print('RESULT', type(e).__name__, str(e).replace(chr(10), ' '), flush=True)
""")


@dataclass
class Counts:
    trials: int = 0
    stuck_slices: int = 0
    double_grants: int = 0
    overlaps: int = 0
    orphans: int = 0
    lost_leases: int = 0
    recoveries: int = 0
    notes: list = field(default_factory=list)
    figures: dict = field(default_factory=dict)

    def figure(self, name: str, value: float) -> None:
        self.figures.setdefault(name, []).append(round(value, 4))


class ChaosSite:
    def __init__(self, ttl: float = 8.0, heartbeat: float = 0.2, agent_timeout: float = 15.0):
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-attach-chaos-"))
        self.ttl, self.heartbeat, self.agent_timeout = ttl, heartbeat, agent_timeout
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
            a = socket.socket()
            a.bind(("127.0.0.1", 0))
            self.agent_port = a.getsockname()[1]
            a.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self.broker = self.agent = None
        self.start_broker()
        with self.client(ADMIN) as c:
            self.agent_token = c.post("/v1/agents/chaos/credential").json()["token"]
        self.start_agent()

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=10)

    def start_broker(self) -> None:
        env = dict(os.environ, GPU_ATTACH_ADMIN_TOKEN=ADMIN, GPU_ATTACH_USER_TOKENS=f"alice:{ALICE}",
                   GPU_ATTACH_SESSION_TIMEOUT_S="2")
        self.broker = subprocess.Popen(
            [sys.executable, "-m", "gpu_attach_server.cli", "broker", "--port", str(self.port), "--state-dir",
             str(self.tmp / "broker"), "--lease-ttl", str(self.ttl), "--heartbeat-interval", str(self.heartbeat),
             "--agent-timeout", str(self.agent_timeout)], env=env, stdout=subprocess.PIPE, text=True)
        wait_ready(self.broker, "the broker")

    def start_agent(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_ATTACH")}
        env["GPU_ATTACH_AGENT_TOKEN"] = self.agent_token
        self.agent = subprocess.Popen(
            [sys.executable, "-m", "gpu_attach_server.cli", "agent", "--broker", self.url, "--name", "chaos",
             "--simulate", "1", "--memory", "4GiB", "--state-dir", str(self.tmp / "agent"), "--allow-unenforced",
             "--port", str(self.agent_port)],  # a fixed data port, as a site runs it: a restart keeps its address
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.ready = wait_ready(self.agent, "the agent")

    def kernel(self, source: str, sid: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", KERNEL, self.url, ALICE, sid, source],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def leases(self) -> list[dict]:
        with self.client(ADMIN) as c:
            return c.get("/v1/leases", params={"limit": 1000}).json()["leases"]

    def used(self) -> int:
        with self.client(ADMIN) as c:
            return sum(g["used_memory"] for g in c.get("/v1/pool").json()["gpus"])

    def stop(self) -> None:
        for p in (self.agent, self.broker):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _wait_line(proc: subprocess.Popen, prefix: str, timeout: float = 30.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line.strip()
    raise RuntimeError(f"no {prefix!r} line from the kernel")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _left(pids: list[int]) -> list[int]:
    """Which of a cell's processes (its sandbox, the child it started) are still alive."""
    return [p for p in pids if p and _alive(p)]


def _cell(k: subprocess.Popen) -> tuple[str, list[int]]:
    _, home, pid, child = _wait_line(k, "HOME").split()
    return home, [int(pid), int(child)]


def _grant_again(site: "ChaosSite", counts: "Counts", sid: str, ticks: Ticks, tries: int = 400) -> None:
    """Grant the slice again as soon as the broker will; nothing of the old cell may run after."""
    with site.client(ALICE) as c:
        lease = None
        for _ in range(tries):
            r = c.post("/v1/leases", json={"session": sid, "gpus": 1})
            if r.status_code == 201:
                lease = r.json()
                break
            time.sleep(0.05)
        if lease is None:
            counts.stuck_slices += 1
            counts.notes.append(f"no grant after the fault: {r.text[:200]}")
            return
        time.sleep(0.5)
        late = [t for t in ticks.times if t > lease["granted_at"]]
        counts.overlaps += bool(late)
        counts.figure("ticks_before_regrant", len(ticks.times) - len(late))
        if late:
            counts.notes.append(f"{len(late)} ticks after the slice was granted again")
        c.delete(f"/v1/leases/{lease['id']}")


class Ticks:
    """A UDP port on which a trial's cell and its child say they run; arrival times on our clock."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.times: list[float] = []
        threading.Thread(target=self._recv, daemon=True).start()

    def _recv(self):
        while True:
            try:
                self.sock.recv(16)
            except OSError:
                return
            self.times.append(time.time())

    def cell(self, children: bool, seconds: float) -> str:
        return (TICK_CELL.replace("CHILDREN", str(children)).replace("SECONDS", str(seconds))
                .replace("PORT", str(self.port)))

    def close(self):
        self.sock.close()


def _double_grants(leases: list[dict]) -> int:
    # A lease holds its slice from its grant until it ended or expired, whichever came first (the
    # broker grants an expired lease's slice again before its reaper records the end).
    spans = sorted((lease["granted_at"], min(lease["ended_at"] or time.time(), lease["expires_at"]))
                   for lease in leases)
    return sum(1 for (a0, a1), (b0, b1) in zip(spans, spans[1:]) if b0 < a1 - 1e-6)


def _recover(site: ChaosSite, counts: Counts, sid: str) -> None:
    k = site.kernel("x = 1", sid)
    try:
        line = _wait_line(k, "RESULT", 60)
    except RuntimeError:
        line = "RESULT none"
    k.wait(30)
    if line == "RESULT ok":
        counts.recoveries += 1
    else:
        counts.notes.append(f"recovery failed: {line}")


def trial_kernel(site: ChaosSite, counts: Counts, children: bool = True) -> None:
    sid = "k-" + secrets.token_hex(4)
    ticks = Ticks()
    k = site.kernel(ticks.cell(children, 30), sid)
    home, pids = _cell(k)
    time.sleep(0.3)
    k.kill()
    killed = time.monotonic()
    while site.used() and time.monotonic() - killed < 5:
        time.sleep(0.01)
    freed = time.monotonic() - killed
    counts.figure("slice_freed_s", freed)
    counts.stuck_slices += freed > 1.0
    _grant_again(site, counts, sid + "-again", ticks, tries=20)
    # The session stops beating; its sandbox (and what the cell started) goes within seconds.
    while _left(pids) and time.monotonic() - killed < 10:
        time.sleep(0.05)
    counts.figure("sandbox_reclaimed_s", time.monotonic() - killed)
    counts.orphans += len(_left(pids))
    counts.double_grants += _double_grants(site.leases())
    _recover(site, counts, sid + "-next")


def trial_agent(site: ChaosSite, counts: Counts, children: bool) -> None:
    sid = "a-" + secrets.token_hex(4)
    ticks = Ticks()
    k = site.kernel(ticks.cell(children, 30), sid)
    home, pids = _cell(k)
    time.sleep(0.3)
    site.agent.kill()
    site.agent.wait()
    killed = time.monotonic()
    site.start_agent()  # the restarted agent kills what its previous run left, then registers
    counts.figure("agent_restart_s", time.monotonic() - killed)
    _grant_again(site, counts, sid + "-next", ticks, tries=100)
    counts.orphans += len(_left(pids))
    k.wait(30)
    counts.double_grants += _double_grants(site.leases())
    _recover(site, counts, sid + "-after")


def trial_broker(site: ChaosSite, counts: Counts, outage: float) -> None:
    sid = "b-" + secrets.token_hex(4)
    seconds = 10 if outage < site.ttl else 40
    ticks = Ticks()
    k = site.kernel(ticks.cell(True, seconds), sid)
    home, pids = _cell(k)
    time.sleep(1.0)
    mine = [x for x in site.leases() if x["session"] == sid and x["state"] == "granted"]
    site.broker.kill()
    site.broker.wait()
    down, killed_at = time.monotonic(), time.time()
    time.sleep(outage)
    site.start_broker()
    down_s = time.monotonic() - down
    counts.figure("broker_down_s", down_s)
    if outage < site.ttl:
        line = _wait_line(k, "RESULT", 60)
        # The promise: an outage shorter than what was left of the lease (less the fence margin)
        # does not cost the cell. A longer one (a slow restart) is fenced, as it must be.
        left = (mine[0]["expires_at"] - killed_at) if mine else site.ttl / 3
        promised = down_s < left - min(1.0, site.ttl / 4) - 0.2
        counts.figure("lease_left_at_outage_s", left)
        if line == "RESULT ok":
            counts.recoveries += 1
        elif promised:
            counts.lost_leases += 1
            counts.notes.append(f"short outage ({down_s:.1f} s of {left:.1f} s left): {line}")
        else:
            counts.figure("fenced_outages", 1)
            counts.notes.append(f"outage of {down_s:.1f} s outlasted the lease's {left:.1f} s: fenced")
        k.wait(30)
        if line != "RESULT ok" and not promised:
            _recover(site, counts, sid + "-after")  # the next cell runs
    else:
        # The agent fenced the cell before the TTL; the lease expires; grant the slice again.
        with site.client(ALICE) as c:
            lease = None
            for _ in range(400):
                r = c.post("/v1/leases", json={"session": sid + "-next", "gpus": 1})
                if r.status_code == 201:
                    lease = r.json()
                    break
                time.sleep(0.05)
            if lease is None:
                counts.stuck_slices += 1
            else:
                time.sleep(0.5)
                late = [t for t in ticks.times if t > lease["granted_at"]]
                counts.overlaps += bool(late)
                old = [x for x in site.leases() if x["session"] == sid]
                counts.figure("ticks_before_regrant", len(ticks.times) - len(late))
                if old and ticks.times:
                    # How long before its lease's TTL the cell was stopped (positive: no overlap possible).
                    counts.figure("fenced_before_ttl_s", old[0]["expires_at"] - max(ticks.times))
                c.delete(f"/v1/leases/{lease['id']}")
        k.wait(60)
        counts.orphans += len(_left(pids))
        _recover(site, counts, sid + "-after")
    counts.double_grants += _double_grants(site.leases())


SCENARIOS = {
    "kernel": lambda s, c: trial_kernel(s, c),
    "agent": lambda s, c: trial_agent(s, c, children=False),
    "agent-children": lambda s, c: trial_agent(s, c, children=True),
    "broker-short": lambda s, c: trial_broker(s, c, outage=0.0),  # down only while it restarts (1-2 s)
    "broker-long": lambda s, c: trial_broker(s, c, outage=10.0),
}


SCENARIO_TTL = {"broker-short": 15.0}  # a TTL whose two thirds outlast a broker restart on a busy host


def run(scenarios: list[str], trials: int) -> dict[str, Counts]:
    results = {}
    for name in scenarios:
        counts = results[name] = Counts()
        site = ChaosSite(ttl=SCENARIO_TTL.get(name, 8.0))
        try:
            for _ in range(trials):
                counts.trials += 1
                try:
                    SCENARIOS[name](site, counts)
                except Exception as e:  # a trial that broke the harness counts as not recovered
                    counts.notes.append(f"trial error: {type(e).__name__}: {e}")
                    site.stop()
                    site = ChaosSite(ttl=SCENARIO_TTL.get(name, 8.0))
        finally:
            site.stop()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    args = ap.parse_args()
    for name in args.scenario or list(SCENARIOS):
        c = run([name], args.trials)[name]
        figs = {k: f"median {sorted(v)[len(v) // 2]:.3f} max {max(v):.3f}" for k, v in c.figures.items()}
        print(json.dumps({"scenario": name, "trials": c.trials, "stuck_slices": c.stuck_slices,
                          "double_grants": c.double_grants, "overlaps": c.overlaps, "orphans": c.orphans,
                          "lost_leases": c.lost_leases, "recoveries": c.recoveries, "figures": figs,
                          "notes": c.notes[:5]}), flush=True)


if __name__ == "__main__":
    main()
