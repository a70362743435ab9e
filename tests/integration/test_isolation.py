"""What a cell cannot do: outlive its lease, replay a grant, lose output written outside Python."""

from __future__ import annotations

import io
import socket
import time

import pytest

from conftest import TOKENS
from jupyter_gpu_attach import GPUSession, wire


@pytest.fixture(scope="module")
def session(site):
    return GPUSession(site.url, TOKENS["alice"])


def run(session, source, ns=None):
    out, err = io.StringIO(), io.StringIO()
    ns = {} if ns is None else ns
    session.run(source, ns, stdout=out, stderr=err)
    return ns, out.getvalue(), err.getvalue()


def test_threads_a_cell_starts_are_frozen_between_cells(session):
    """The sandbox is frozen while no cell (no lease) is running, background threads included.

    The thread holds everything it uses (no global name a sandbox could clear), and the next cell
    checks that it still ticks: so a thread that died cannot pass for a frozen one."""
    ns, _, _ = run(session, "import threading, time\n"
                            "ticks = []\n"
                            "def tick(ticks=ticks, now=time.time, sleep=time.sleep):\n"
                            "    while True:\n"
                            "        ticks.append(now())\n"
                            "        sleep(0.02)\n"
                            "threading.Thread(target=tick, daemon=True).start()\n"
                            "import builtins\nbuiltins.gpu_attach_test_ticks = ticks\n"
                            "time.sleep(0.2)\nended = time.time()")
    time.sleep(1.0)
    ns2, _, _ = run(session, "import builtins, time\nnow = time.time()\ntime.sleep(0.3)\n"
                             "seen = list(builtins.gpu_attach_test_ticks)")
    between = [t for t in ns2["seen"] if ns["ended"] + 0.1 < t < ns2["now"] - 0.05]
    assert not between, f"{len(between)} ticks ran while the session held no lease"
    assert any(t <= ns["ended"] for t in ns2["seen"]), "the thread did run during its cell"
    assert any(t > ns2["now"] for t in ns2["seen"]), "the thread was alive, and ran again in the next cell"


def test_output_of_child_processes_and_c_code_reaches_the_cell(session):
    _, out, _ = run(session, "import subprocess\nsubprocess.run(['echo', 'from-a-child'])\n"
                             "import os\nos.write(2, b'raw-fd-2\\n')")
    assert "from-a-child" in out
    _, _, err = run(session, "import os\nos.write(2, b'raw-fd-2\\n')")
    assert "raw-fd-2" in err


def test_a_flood_of_child_output_does_not_hang_the_cell(session):
    _, out, _ = run(session, "import subprocess\nsubprocess.run(['seq', '1', '200000'])\nfinished = True")
    assert out.rstrip().endswith("200000")


def test_logging_set_up_in_one_cell_still_reaches_the_next(session):
    run(session, "import logging\nlogging.basicConfig(level=logging.INFO, force=True)")
    _, _, err = run(session, "import logging\nlogging.getLogger('nb').info('still here')")
    assert "still here" in err


def test_a_grant_admits_one_cell_only(site):
    with site.client("alice") as c:
        lease = c.post("/v1/leases", json={"session": "replay", "fraction": 0.1}).json()
    host, port = lease["agent"]["address"].rsplit(":", 1)
    run_frame = {"op": "run", "source": "x = 1", "inputs": [], "bound": ["x"], "deleted": []}
    with socket.create_connection((host, int(port))) as s:
        wire.send_frame(s, {"op": "hello", "token": lease["token"]})
        assert wire.recv_frame(s).op == "admitted"
        wire.send_frame(s, run_frame)
        assert wire.recv_frame(s).op == "result"
    with socket.create_connection((host, int(port))) as s:
        wire.send_frame(s, {"op": "hello", "token": lease["token"]})
        reply = wire.recv_frame(s)
        assert reply.op == "reject" and "used already" in reply.header["message"]
    with site.client("alice") as c:
        c.delete(f"/v1/leases/{lease['id']}")


def test_hello_that_never_completes_is_dropped(site):
    """A client that opens the data port and trickles bytes cannot hold an admission forever."""
    host, port = None, None
    with site.client("alice") as c:
        lease = c.post("/v1/leases", json={"session": "slow", "fraction": 0.1}).json()
        c.delete(f"/v1/leases/{lease['id']}")
    host, port = lease["agent"]["address"].rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"GPA1")  # a frame that never finishes
        s.settimeout(20)
        t0 = time.monotonic()
        reply = wire.recv_frame(s)
        assert reply.op == "reject" and "in time" in reply.header["message"]
        assert time.monotonic() - t0 < 15


def test_large_inputs_show_progress_and_arrive_intact(session):
    import numpy as np

    a = np.arange(40 * 1024**2, dtype=np.float64)  # 320 MiB
    ns, _, err = run(session, "total = float(a.sum())\nb = a[::1024].copy()", {"a": a})
    assert "sending 320 MiB of inputs" in err
    assert ns["total"] == float(a.sum()) and np.array_equal(ns["b"], a[::1024])


def test_a_cell_that_ignores_interrupts_is_abandoned_and_the_session_recovers(session, monkeypatch):
    import jupyter_gpu_attach.session as session_module
    from jupyter_gpu_attach import CellTimeout

    monkeypatch.setattr(session_module, "INTERRUPT_GRACE_S", 1.0)
    stubborn = ("import time\n"
                "while True:\n"
                "    try:\n"
                "        time.sleep(10)\n"
                "    except KeyboardInterrupt:\n"
                "        pass\n")
    t0 = time.monotonic()
    with pytest.raises(CellTimeout, match="did not stop"):
        session.run(stubborn, {}, timeout=1)
    assert time.monotonic() - t0 < 10
    ns, _, _ = run(session, "after = 'fresh sandbox'")  # the stuck one is replaced, not resumed
    assert ns["after"] == "fresh sandbox"
