"""``gpu-attach admin ...`` as an admin runs it: a real process against a real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from broker_site import TOKENS, BrokerSite


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    s = BrokerSite(tmp_path_factory.mktemp("cli"), "--agent-timeout", "3600")
    s.register_fake_agent("h1", 2)
    yield s
    s.stop()


def admin(site, *argv: str, token: str | None = TOKENS["admin"]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GPU_ATTACH_ADMIN_TOKEN"}
    env["GPU_ATTACH_BROKER_URL"] = site.url
    if token:
        env["GPU_ATTACH_ADMIN_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "gpu_attach_server.cli", "admin", *argv],
                          env=env, capture_output=True, text=True, timeout=60)


def test_every_admin_command(site):
    with site.client("alice") as alice:
        lease = alice.post("/v1/leases", json={"session": "nb", "fraction": 0.5, "label": "train"}).json()
    out = admin(site, "agents")
    assert out.returncode == 0 and out.stdout.splitlines()[0].split()[:3] == ["ID", "ADDRESS", "STATE"]
    assert "h1" in out.stdout
    assert "h1/1" in admin(site, "gpus").stdout
    out = admin(site, "leases", "--user", "alice")
    assert lease["id"] in out.stdout and "train" in out.stdout
    assert json.loads(admin(site, "--json", "queue").stdout)["entries"] == []
    assert admin(site, "user", "set", "alice", "--group", "lab", "--priority", "2").returncode == 0
    assert json.loads(admin(site, "--json", "users").stdout)[0] == {"name": "alice", "group": "lab", "priority": 2,
                                                                    "usage_gpu_s": 0.0}
    assert "alice" in admin(site, "groups").stdout
    out = admin(site, "quota", "set", "group", "lab", "--share", "1.5", "--memory", "20GiB", "--max-lease", "3600")
    assert out.returncode == 0 and "20 GiB" in out.stdout
    assert json.loads(admin(site, "--json", "quota", "list").stdout)[0]["max_share"] == 1.5
    assert json.loads(admin(site, "--json", "quota", "list").stdout)[0]["borrow"] is False
    assert admin(site, "quota", "set", "group", "lab", "--share", "1.5", "--borrow").returncode == 0
    assert json.loads(admin(site, "--json", "quota", "list").stdout)[0]["borrow"] is True
    # A lease granted above a borrowing quota says so in the listing, with the numbers.
    assert admin(site, "quota", "set", "user", "alice", "--share", "0.5", "--borrow").returncode == 0
    with site.client("alice") as alice:
        lent = alice.post("/v1/leases", json={"session": "nb", "fraction": 0.25}).json()
        rows = {r.split()[0]: r for r in admin(site, "leases", "--user", "alice").stdout.splitlines()}
        assert "share 0.5+0.25>0.5" in rows[lent["id"]], rows
        assert "BORROWED" in rows["ID"] and ">" not in rows[lease["id"]]
        alice.delete(f"/v1/leases/{lent['id']}")
    assert admin(site, "quota", "delete", "user", "alice").returncode == 0
    assert admin(site, "quota", "delete", "group", "lab").returncode == 0
    made = json.loads(admin(site, "--json", "token", "create", "erin", "--label", "ci").stdout)
    assert made["user"] == "erin" and len(made["token"]) > 30
    assert made["id"] in admin(site, "token", "list").stdout
    assert admin(site, "token", "revoke", made["id"]).returncode == 0
    assert admin(site, "drain", "gpu", "h1/0", "--reason", "fan").returncode == 0
    assert json.loads(admin(site, "--json", "gpus").stdout)[0]["drained"] is True
    assert admin(site, "undrain", "gpu", "h1/0").returncode == 0
    assert admin(site, "drain", "agent", "h1").returncode == 0
    assert admin(site, "undrain", "agent", "h1").returncode == 0
    assert "revoked" in admin(site, "revoke", lease["id"], "--reason", "test").stdout
    assert "alice" in admin(site, "usage", "--since", "1h").stdout
    audit = admin(site, "audit").stdout
    for action in ("lease.revoke", "agent.undrain", "gpu.drain", "token.create", "quota.set", "user.set"):
        assert action in audit


def test_errors_name_the_fix(site):
    out = admin(site, "agents", token=None)
    assert out.returncode == 2 and "GPU_ATTACH_ADMIN_TOKEN" in out.stderr
    out = admin(site, "agents", token=TOKENS["alice"])
    assert out.returncode == 1 and "admin token" in out.stderr
    out = admin(site, "revoke", "L000000000000")
    assert out.returncode == 1 and "no lease" in out.stderr
    out = admin(site, "drain", "gpu", "h1")
    assert out.returncode != 0 and "AGENT/INDEX" in out.stderr
