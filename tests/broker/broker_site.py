"""A real ``gpu-attach broker --port 0`` process (and agents) for the broker's own tests and
benchmarks, with known tokens for alice, bob, the admin, agents and the metrics scraper."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from gpu_attach_server.cli import wait_ready

TOKENS = {
    "admin": "admin-token-0123456789abcdef",
    "agent": "agent-token-0123456789abcdef",
    "alice": "alice-token-0123456789abcdef",
    "bob": "bob-token-0123456789abcdef-bob",
    "carol": "carol-token-0123456789abcdef",
    "metrics": "metrics-token-0123456789abcdef",
}


class BrokerSite:
    def __init__(self, tmp: Path, *broker_args: str, heartbeat: float = 0.2, lease_ttl: float = 30.0):
        self.tmp = Path(tmp)
        self.procs: list[subprocess.Popen] = []
        self.credentials: dict[str, str] = {}
        self.env = dict(os.environ, GPU_ATTACH_ADMIN_TOKEN=TOKENS["admin"], GPU_ATTACH_AGENT_TOKEN=TOKENS["agent"],
                        GPU_ATTACH_METRICS_TOKEN=TOKENS["metrics"],
                        GPU_ATTACH_USER_TOKENS=",".join(f"{u}:{TOKENS[u]}" for u in ("alice", "bob", "carol")))
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_attach_server.cli", "broker", "--port", "0", "--state-dir", str(self.tmp),
             "--heartbeat-interval", str(heartbeat), "--lease-ttl", str(lease_ttl), *broker_args],
            env=self.env, stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        self.url = wait_ready(proc, "the broker")["url"]

    def enrol(self, name: str) -> str:
        """The admin issues agent ``name`` its own credential, as a site does (a shared agent token
        registers nothing)."""
        if name not in self.credentials:
            with self.client("admin") as c:
                r = c.post(f"/v1/agents/{name}/credential")
                r.raise_for_status()
                self.credentials[name] = r.json()["token"]
        return self.credentials[name]

    def start_agent(self, name: str, simulate: int = 1, memory: str = "16GiB") -> None:
        env = {k: v for k, v in self.env.items() if k not in ("GPU_ATTACH_USER_TOKENS", "GPU_ATTACH_ADMIN_TOKEN")}
        env["GPU_ATTACH_AGENT_TOKEN"] = self.enrol(name)
        extra = () if os.geteuid() == 0 else ("--allow-unenforced",)
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_attach_server.cli", "agent", "--broker", self.url, "--name", name,
             "--simulate", str(simulate), "--memory", memory, "--spare-sandboxes", "0",
             "--state-dir", str(self.tmp / f"agent-{name}"), *extra],
            env=env, stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        wait_ready(proc, f"agent {name}")

    def register_fake_agent(self, name: str, gpus: int, memory: int = 16 << 30, pool: str = "default") -> dict:
        """Register GPUs without an agent process (no heartbeats: use a long --agent-timeout)."""
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.enrol(name)}"}, timeout=30) as c:
            r = c.post("/v1/agents", json={"agent_id": name, "address": "127.0.0.1:1", "devices": [
                {"index": i, "uuid": f"GPU-{name}-{i}", "model": "Sim", "memory": memory, "simulated": True, "pool": pool}
                for i in range(gpus)]})
            r.raise_for_status()
            return r.json()

    def client(self, who: str = "alice", **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKENS[who]}"}, timeout=30, **kw)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
