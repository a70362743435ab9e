"""The gpu-attach command line: refusals that protect a site, and the `up` handshake."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _agent(*args, env=None):
    return subprocess.run([sys.executable, "-m", "gpu_attach_server.cli", "agent", *args], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, GPU_ATTACH_AGENT_TOKEN="t" * 20, **(env or {})))


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal is about agents running as root")
def test_root_single_user_agent_serving_other_hosts_is_refused():
    """A root agent runs each user's cells as that user's uid; --single-user (cells as the agent's
    own uid, root here) is only for a loopback pool."""
    r = _agent("--broker", "http://127.0.0.1:9", "--host", "0.0.0.0", "--simulate", "1", "--single-user")
    assert r.returncode == 2
    assert "--single-user" in r.stderr


def test_agent_without_a_token_says_which_to_set():
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_ATTACH")}
    r = subprocess.run([sys.executable, "-m", "gpu_attach_server.cli", "agent", "--broker", "http://127.0.0.1:9"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "GPU_ATTACH_AGENT_TOKEN" in r.stderr


def test_broker_without_user_tokens_refuses_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_ATTACH")}
    env["GPU_ATTACH_AGENT_TOKEN"] = "t" * 20
    r = subprocess.run([sys.executable, "-m", "gpu_attach_server.cli", "broker", "--port", "0",
                        "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "GPU_ATTACH_USER_TOKENS" in r.stderr


def test_up_prints_one_json_line_and_stops_on_sigterm(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "gpu_attach_server.cli", "up", "--json", "--simulate", "2",
                          "--state-dir", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(p.stdout.readline())
        assert info["url"].startswith("http://127.0.0.1:") and len(info["token"]) >= 16
        assert [d["simulated"] for d in info["agent"]["devices"]] == [True, True]
    finally:
        p.terminate()
        assert p.wait(20) == 0
