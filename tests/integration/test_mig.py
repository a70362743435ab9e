"""MIG: an agent whose GPUs are in MIG mode offers their instances, and a cell asks for one by
profile (``%%gpu --mig 1g.10gb``). Real MIG discovery needs a GPU in MIG mode (NVML); these run on
the agent's SIMULATED MIG layout, through the real broker, agent and sandbox."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from conftest import TOKENS, Site
from jupyter_gpu_attach import GPUSession
from jupyter_gpu_attach.errors import GPUAttachError
from jupyter_gpu_attach.magics import _CELL, _parse, _request
from jupyter_gpu_attach.slices import SliceRequest


@pytest.fixture(scope="module")
def mig_site(tmp_path_factory):
    s = Site(tmp_path_factory.mktemp("mig"))
    s.start_broker()
    s.start_agent("mig-host", simulate=1, extra=("--simulate-mig", "3g.40gb,2g.20gb,1g.10gb*2"))
    yield s
    s.stop()


def test_the_agent_offers_each_instance_with_its_profile(mig_site):
    gpus = mig_site.pool()["gpus"]
    assert [(g["id"], g["memory"] >> 30) for g in gpus] == [
        ("mig-host/0", 40), ("mig-host/1", 20), ("mig-host/2", 10), ("mig-host/3", 10)]
    assert all(g["simulated"] and "MIG" in g["model"] for g in gpus)


def test_a_cell_runs_on_an_instance_of_the_profile_it_asks_for(mig_site):
    args = _parse(_CELL, "--mig 1g.10gb")
    request = _request(args)
    assert request == SliceRequest(mig="1g.10gb")
    session = GPUSession(mig_site.url, TOKENS["alice"], session_id="mig-nb")
    ns: dict = {"x": 20}
    result = session.run("y = x + 1", ns, request, stdout=io.StringIO(), stderr=io.StringIO())
    assert ns["y"] == 21
    device = result.lease["gpus"][0]
    assert device["mig"] == "1g.10gb" and device["memory"] == 10 << 30
    assert result.lease["fraction"] == pytest.approx(1 / 7)


def test_instances_are_exclusive_and_other_slices_are_refused_with_the_fix(mig_site):
    with mig_site.client("bob") as bob:
        held = [bob.post("/v1/leases", json={"session": "b", "mig": "1g.10gb"}) for _ in range(2)]
        assert [r.status_code for r in held] == [201, 201]
        assert {r.json()["gpus"][0]["id"] for r in held} == {"mig-host/2", "mig-host/3"}
        r = bob.post("/v1/leases", json={"session": "b", "mig": "1g.10gb"})
        assert r.status_code == 409 and r.json()["reason"] == "busy"
        r = bob.post("/v1/leases", json={"session": "b", "fraction": 0.5})
        assert r.status_code == 409 and r.json()["reason"] == "too_large"
        assert "--mig (1g.10gb, 2g.20gb, 3g.40gb)" in r.json()["detail"]
        r = bob.post("/v1/leases", json={"session": "b", "mig": "7g.80gb"})
        assert r.status_code == 409 and r.json()["reason"] == "too_large"
        assert bob.post("/v1/leases", json={"session": "b", "mig": "1g.10gb", "gpus": 1}).status_code == 422
        assert bob.post("/v1/leases", json={"session": "b", "mig": "1g"}).status_code == 422
        for r in held:
            bob.delete(f"/v1/leases/{r.json()['id']}")


def test_a_bad_layout_is_refused_at_start(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gpu_attach_server.cli", "agent", "--broker", "http://127.0.0.1:9",
                          "--simulate", "1", "--simulate-mig", "3g.40gb,bogus"], capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin", "GPU_ATTACH_AGENT_TOKEN": "x" * 32})
    assert out.returncode == 2 and "not a MIG layout" in out.stderr


def test_magic_rejects_two_sizes():
    with pytest.raises(Exception, match="--mig"):
        _request(_parse(_CELL, "--gpus 1 --mig 1g.10gb"))
