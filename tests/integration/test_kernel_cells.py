"""``%%gpu`` cells in a real kernel against a real broker and agent (simulated devices)."""

from __future__ import annotations

import re
import threading
import time

import pytest


def test_cell_result_returns_and_slice_is_free_after_each_cell(kernel, site):
    kernel.ok("import numpy as np\nx = np.arange(12.0).reshape(3, 4)")
    assert site.used_memory() == 0
    for i in range(3):
        reply = kernel.ok(f"%%gpu --memory 2GiB\nimport cupy as cp\ny = float((cp.asarray(x) @ cp.asarray(x).T).sum()) + {i}\nprint('done', y)")
        assert "done" in reply["stdout"]
        assert site.used_memory() == 0, "the slice must be back in the pool as soon as the cell ends"
    assert kernel.value("y") == pytest.approx(float((__import__("numpy").arange(12.0).reshape(3, 4) @ __import__("numpy").arange(12.0).reshape(3, 4).T).sum()) + 2)
    mine = [lz for lz in site.leases() if lz["user"] == "alice"]
    assert mine and all(lz["state"] == "released" for lz in mine)


def test_simulated_notice_once_per_session(kernel):
    first = kernel.ok("%%gpu\nimport cupy as cp\na = cp.ones(3)")
    second = kernel.ok("%%gpu\nimport cupy as cp\nb = cp.ones(3)")
    # The fixture's kernel may already have run cells; across both, the notice shows at most once.
    assert (first["stderr"] + second["stderr"]).count("SIMULATED") <= 1
    assert "SIMULATED" not in second["stderr"]
    assert kernel.value("type(a).__module__") == "numpy"


def test_inputs_are_only_what_the_cell_reads(kernel):
    kernel.ok("import threading\nlock = threading.Lock()\nn = 20")
    # `lock` cannot be pickled, but the cell does not read it: it must not matter.
    kernel.ok("%%gpu\nm = n * 2")
    assert kernel.value("m") == 40
    reply = kernel.run("%%gpu\nwith lock:\n    k = 1")
    assert reply["status"] == "error"
    assert reply["ename"] == "InputError"
    assert "lock" in reply["evalue"] and "picklable" in reply["evalue"]


def test_functions_and_classes_travel_by_value(kernel):
    kernel.ok("def double(v):\n    return 2 * v\nclass Box:\n    def __init__(self, v):\n        self.v = v")
    kernel.ok("%%gpu\nbox = Box(double(21))\ndef triple(v):\n    return 3 * v")
    assert kernel.value("[box.v, triple(2)]") == [42, 6]


def test_deleted_names_are_deleted(kernel):
    kernel.ok("gone = 1")
    kernel.ok("%%gpu\ndel gone")
    assert kernel.value("'gone' in globals()") is False


def test_remote_exception_has_type_and_remote_traceback(kernel, site):
    before = site.used_memory()
    reply = kernel.run("%%gpu\nvals = [1, 2]\nvals[5]")
    assert reply["status"] == "error"
    assert reply["ename"] == "IndexError"
    tb = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(reply["traceback"]))
    # As a local cell shows it: the cell's own line, nothing of the transport.
    assert re.search(r"Cell In\[\d+\], line 2", tb) and "vals[5]" in tb
    assert not re.search(r"session\.py|magics\.py|wire\.py|interactiveshell\.py", tb), tb
    assert site.used_memory() == before == 0


def test_syntax_error_is_reported_before_any_lease(kernel, site):
    count = len(site.leases())
    reply = kernel.run("%%gpu\ndef broken(:\n    pass")
    assert reply["status"] == "error"
    assert reply["ename"] == "SyntaxError"
    assert len(site.leases()) == count, "a cell that does not parse must not take a lease"


def test_bad_options_name_the_fix(kernel, site):
    reply = kernel.run("%%gpu --memory 2GiB --fraction 0.5\nx = 1")
    assert reply["status"] == "error" and "one of" in reply["evalue"]
    reply = kernel.run("%%gpu --memory lots\nx = 1")
    assert reply["status"] == "error" and "2GiB" in reply["evalue"]
    reply = kernel.run("%%gpu --memory 64GiB\nx = 1")
    assert reply["status"] == "error" and reply["ename"] == "NoCapacity"
    assert "16 GiB" in reply["evalue"]


def test_output_streams_while_the_cell_runs(kernel):
    reply = kernel.ok("%%gpu\nimport time\nprint('first', flush=True)\ntime.sleep(1.5)\nprint('second')")
    stamps = {c["text"].strip(): t for t, kind, c in reply["outputs"] if kind == "stream" and c["name"] == "stdout"}
    assert "first" in stamps and "second" in stamps
    assert stamps["second"] - stamps["first"] > 1.0, "the first line must arrive before the cell finishes"


def test_timeout_stops_the_cell_and_releases(kernel, site):
    t0 = time.monotonic()
    reply = kernel.run("%%gpu --timeout 1\nimport time\ntime.sleep(30)")
    assert reply["status"] == "error" and reply["ename"] == "CellTimeout"
    assert time.monotonic() - t0 < 10
    assert site.used_memory() == 0
    kernel.ok("%%gpu\nafter_timeout = 1")  # the session still works


def test_interrupt_stops_remote_code_and_releases(kernel, site):
    result = {}

    def run():
        result["reply"] = kernel.run("%%gpu\nimport time\nfor _ in range(300):\n    time.sleep(0.1)")

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while site.used_memory() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert site.used_memory() > 0, "the cell should be holding a slice while it runs"
    time.sleep(0.3)
    kernel.km.interrupt_kernel()
    t.join(20)
    reply = result["reply"]
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
    assert site.used_memory() == 0
    kernel.ok("%%gpu\nafter_interrupt = 2")
    assert kernel.value("after_interrupt") == 2


def test_status_and_pool_magics(kernel):
    out = kernel.ok("%gpu pool")["stdout"]
    assert "gpu-host-1/0" in out and "Simulated" in out
    kernel.ok("%gpu attach --fraction 0.5")
    kernel.ok("%%gpu\nfrac = 1")
    status = kernel.ok("%gpu status")["stdout"]
    assert "0.5 of one GPU" in status and "no GPU" in status
    kernel.ok("%gpu attach")
