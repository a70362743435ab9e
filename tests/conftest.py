"""Shared fixtures: a real site (broker + agent processes on loopback) and real Jupyter kernels."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from gpu_attach_server.cli import wait_ready

REPO = Path(__file__).resolve().parents[1]
TOKENS = {
    "admin": "admin-token-0123456789abcdef",
    "agent": "agent-token-0123456789abcdef",
    "alice": "alice-token-0123456789abcdef",
    "bob": "bob-token-0123456789abcdef-bob",
    "agent9": "agent9-token-0123456789abcdef",  # bound to agent id gpu-host-9
}


@dataclass
class Site:
    """A broker and its agents, each a real process, with known tokens for alice, bob and the admin."""

    tmp: Path
    heartbeat: float = 0.2
    agent_timeout: float = 3.0
    lease_ttl: float = 30.0
    procs: list = field(default_factory=list)
    agents: dict = field(default_factory=dict)
    credentials: dict = field(default_factory=dict)
    ready: dict = field(default_factory=dict)
    url: str = ""

    def env(self) -> dict:
        return dict(os.environ, GPU_ATTACH_ADMIN_TOKEN=TOKENS["admin"], GPU_ATTACH_AGENT_TOKEN=TOKENS["agent"],
                    GPU_ATTACH_AGENT_TOKENS=f"gpu-host-9:{TOKENS['agent9']}",
                    GPU_ATTACH_USER_TOKENS=f"alice:{TOKENS['alice']},bob:{TOKENS['bob']}")

    def start_broker(self) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_attach_server.cli", "broker", "--port", "0", "--state-dir", str(self.tmp),
             "--heartbeat-interval", str(self.heartbeat), "--agent-timeout", str(self.agent_timeout),
             "--lease-ttl", str(self.lease_ttl)],
            env=self.env(), stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        self.url = wait_ready(proc, "the broker")["url"]

    def enrol(self, name: str) -> str:
        """The admin issues agent ``name`` its own credential (as a site would)."""
        if name not in self.credentials:
            with self.client("admin") as c:
                r = c.post(f"/v1/agents/{name}/credential")
                assert r.status_code == 201, r.text
                self.credentials[name] = r.json()["token"]
        return self.credentials[name]

    def start_agent(self, name: str = "gpu-host-1", simulate: int | None = 2, memory: str = "16GiB",
                    extra: tuple = ()) -> subprocess.Popen:
        """An enrolled agent: ``simulate`` SIMULATED devices of ``memory`` each, or with
        ``simulate=None`` this host's real GPUs (NVML)."""
        env = {k: v for k, v in self.env().items()
               if k not in ("GPU_ATTACH_USER_TOKENS", "GPU_ATTACH_ADMIN_TOKEN", "GPU_ATTACH_AGENT_TOKENS")}
        env["GPU_ATTACH_AGENT_TOKEN"] = TOKENS["agent9"] if name == "gpu-host-9" else self.enrol(name)
        if os.geteuid() != 0:  # no per-user uids or cgroups without root: say so, and run anyway
            extra = (*extra, "--allow-unenforced")
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_attach_server.cli", *os.environ.get("GPA_TEST_AGENT_LOG", "").split(), "agent", "--broker", self.url, "--name", name,
             *(() if simulate is None else ("--simulate", str(simulate), "--memory", memory)),
             "--state-dir", str(self.tmp / f"agent-{name}"), *extra],
            env=env, stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        self.ready[name] = wait_ready(proc, f"agent {name}")
        self.agents[name] = proc
        return proc

    def agents_address(self, name: str = "gpu-host-1") -> str:
        """The data port address of agent ``name``."""
        return self.ready[name]["address"]

    def client(self, who: str = "alice") -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKENS[who]}"}, timeout=30)

    def pool(self) -> dict:
        with self.client("admin") as c:
            return c.get("/v1/pool").json()

    def used_memory(self) -> int:
        return sum(g["used_memory"] for g in self.pool()["gpus"])

    def leases(self) -> list[dict]:
        with self.client("admin") as c:
            return c.get("/v1/leases", params={"limit": 1000}).json()["leases"]

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def make_site(tmp_path):
    """``make_site(agent="name", **timings)``: a fresh site with one agent (one simulated device),
    stopped after the test."""
    made = []

    def make(agent: str = "a1", simulate: int = 1, **timings) -> Site:
        s = Site(tmp_path / f"site{len(made)}", **timings)
        made.append(s)
        s.start_broker()
        s.start_agent(agent, simulate=simulate)
        return s

    yield make
    for s in made:
        s.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    s = Site(tmp_path_factory.mktemp("site"))
    s.start_broker()
    s.start_agent()
    yield s
    s.stop()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Kernel:
    """A real IPython kernel (jupyter_client) with the extension loaded."""

    def __init__(self, env: dict):
        from jupyter_client.manager import start_new_kernel

        self.km, self.kc = start_new_kernel(kernel_name="python3", env=env)
        self.run("%load_ext jupyter_gpu_attach")

    def run(self, code: str, timeout: float = 60) -> dict:
        """Execute ``code``; return its reply content with the outputs gathered, timestamped."""
        outputs = []

        def hook(msg):
            kind = msg["msg_type"]
            if kind in ("stream", "error", "execute_result", "display_data"):
                outputs.append((time.monotonic(), kind, msg["content"]))

        reply = self.kc.execute_interactive(code, output_hook=hook, timeout=timeout)
        content = dict(reply["content"])
        content["outputs"] = outputs
        content["stdout"] = "".join(c.get("text", "") for _, k, c in outputs if k == "stream" and c["name"] == "stdout")
        content["stderr"] = "".join(c.get("text", "") for _, k, c in outputs if k == "stream" and c["name"] == "stderr")
        content["finished"] = time.monotonic()
        return content

    def ok(self, code: str, timeout: float = 60) -> dict:
        reply = self.run(code, timeout)
        assert reply["status"] == "ok", f"{reply.get('ename')}: {reply.get('evalue')}\n" + "\n".join(reply.get("traceback", []))
        return reply

    def value(self, expr: str):
        reply = self.ok(f"import json as _j; print(_j.dumps({expr}))")
        return json.loads(reply["stdout"].strip().splitlines()[-1])

    def stop(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def kernel(site):
    """alice's kernel, pointed at the site's broker."""
    env = dict(os.environ, GPU_ATTACH_BROKER_URL=site.url, GPU_ATTACH_TOKEN=TOKENS["alice"])
    k = Kernel(env)
    yield k
    k.stop()
