"""A session keeps its sandbox, and so everything its cells left there, when the broker gives
its next cell another GPU: on a shared pool that is the common case, not the exception."""

from __future__ import annotations

import io
from types import SimpleNamespace

from conftest import TOKENS
from gpu_attach_server.agent.agent import Agent, SandboxHandle
from jupyter_gpu_attach import GPUSession
from jupyter_gpu_attach.slices import SliceRequest


def run(session, source, ns):
    out, err = io.StringIO(), io.StringIO()
    result = session.run(source, ns, stdout=out, stderr=err)
    # Nothing said of a new sandbox, or of state lost or sent again.
    assert "lost" not in err.getvalue() and "new sandbox" not in err.getvalue(), err.getvalue()
    return result, out.getvalue()


def test_a_cell_on_another_gpu_runs_in_the_same_sandbox_with_the_same_namespace(make_site):
    site = make_site(simulate=2)
    alice = GPUSession(site.url, TOKENS["alice"], SliceRequest(gpus=1), session_id="nb")
    ns: dict = {}
    first, _ = run(alice, "import os, threading\nlock = threading.Lock()\nsquares = (i * i for i in range(5))\n"
                          "pid = os.getpid()\nprint(next(squares))", ns)
    assert set(first.not_returned) >= {"lock", "squares"}  # these stay in the sandbox
    gpu = first.lease["gpus"][0]["id"]
    # Bob takes the GPU Alice's cell used, so her next cell must go to the other one.
    with site.client("bob") as bob:
        leases = [bob.post("/v1/leases", json={"session": "b", "gpus": 1}).json() for _ in range(2)]
        keep = next(x for x in leases if x["gpus"][0]["id"] == gpu)
        for x in leases:
            if x is not keep:
                bob.delete(f"/v1/leases/{x['id']}")
        second, out = run(alice, "with lock:\n    print(next(squares))\nsame = os.getpid() == pid", ns)
        bob.delete(f"/v1/leases/{keep['id']}")
    assert second.lease["gpus"][0]["id"] != gpu
    assert out == "1\n"  # the generator went on where it was
    assert ns["same"] is True
    third, out = run(alice, "print(next(squares))", ns)
    assert out == "4\n"


def test_a_sandbox_that_loaded_a_gpu_library_is_replaced_not_moved():
    """CUDA binds a process to the devices it saw when it started: such a sandbox cannot follow
    its session to other GPUs (the kernel then sends its namespace to a new one)."""
    real = {i: SimpleNamespace(simulated=False, uuid=f"GPU-{i}") for i in range(4)}
    sim = {i: SimpleNamespace(simulated=True, uuid=f"SIM-{i}") for i in range(4)}
    handle = SandboxHandle(("alice", "nb"), proc=None, ctl=None, workdir="/tmp", devices=(0,))
    may = Agent._may_run_on
    assert may(SimpleNamespace(devices=real), handle, {"gpus": [0]})
    assert may(SimpleNamespace(devices=real), handle, {"gpus": [1]})  # no GPU library yet: re-pinned
    handle.gpu_bound = True
    assert may(SimpleNamespace(devices=real), handle, {"gpus": [0]})
    assert not may(SimpleNamespace(devices=real), handle, {"gpus": [1]})
    assert not may(SimpleNamespace(devices=real), handle, {"gpus": [0, 1]})
    moved = SandboxHandle(("alice", "nb"), proc=None, ctl=None, workdir="/tmp", devices=(0,), simulated=True,
                          gpu_bound=True)
    assert may(SimpleNamespace(devices=sim), moved, {"gpus": [3]})  # simulated devices hold no context
    assert not may(SimpleNamespace(devices=real), moved, {"gpus": [3]})  # nor does it become real
    assert Agent._visible(SimpleNamespace(devices=real), [2, 0]) == "GPU-2,GPU-0"
    assert Agent._visible(SimpleNamespace(devices=sim), [1]) == ""
