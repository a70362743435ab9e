"""A kernel's session lives as long as the kernel does: it beats the broker while it lives, and a
kernel that dies without a word (SIGKILL, a crash) has its sandbox reclaimed within the broker's
session timeout, not the agent's idle limit (10 min by default)."""

from __future__ import annotations

import gc
import io
import os
import time

from conftest import TOKENS, Kernel, pid_alive as _alive
from jupyter_gpu_attach.session import GPUSession

TIMEOUT_S = 3.0  # GPU_ATTACH_SESSION_TIMEOUT_S for these sites: kernels beat every 0.5 s


def _gone_within(pid: int, seconds: float) -> float | None:
    """Seconds until ``pid`` exited, or None if it still runs after ``seconds``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if not _alive(pid):
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


def test_a_live_kernel_keeps_its_sandbox_and_a_killed_one_loses_it(make_site, monkeypatch):
    monkeypatch.setenv("GPU_ATTACH_SESSION_TIMEOUT_S", str(TIMEOUT_S))
    site = make_site()
    k = Kernel(dict(os.environ, GPU_ATTACH_BROKER_URL=site.url, GPU_ATTACH_TOKEN=TOKENS["alice"]))
    try:
        k.ok("%%gpu\nimport os\nsandbox = os.getpid()\ncounter = (i for i in range(3))")  # a generator stays there
        sandbox = k.value("sandbox")
        assert _alive(sandbox)
        time.sleep(TIMEOUT_S * 2.5)  # idle, between cells, well past the timeout
        assert _alive(sandbox), "an idle but live kernel's sandbox was reclaimed"
        k.ok("%%gpu\nfirst = next(counter)")
        assert k.value("first") == 0, "what lived only in the sandbox is still there"
    finally:
        k.km.shutdown_kernel(now=True)  # SIGKILL: no atexit, no DELETE /v1/sessions
        k.kc.stop_channels()
    took = _gone_within(sandbox, TIMEOUT_S + 10)
    assert took is not None, "the sandbox of a killed kernel outlived the session timeout"
    assert took < TIMEOUT_S + 5, took


def test_a_session_dropped_without_close_stops_beating_and_is_reclaimed(make_site, monkeypatch):
    monkeypatch.setenv("GPU_ATTACH_SESSION_TIMEOUT_S", str(TIMEOUT_S))
    site = make_site()
    s = GPUSession(site.url, TOKENS["alice"])
    ns: dict = {}
    s.run("import os\npid = os.getpid()", ns, stdout=io.StringIO(), stderr=io.StringIO())
    time.sleep(TIMEOUT_S * 1.5)
    assert _alive(ns["pid"]), "the session beats while it is referenced"
    del s
    gc.collect()
    assert _gone_within(ns["pid"], TIMEOUT_S + 10) is not None, "a dropped session beat on"


def test_a_cell_right_after_close_starts_a_new_session_that_the_late_end_does_not_stop(make_site):
    """close() (``%gpu detach``) ends the session; agents hear of it a moment later. A cell run at
    once after it must not be the one that end stops: it runs in a new session, with a new id."""
    site = make_site()
    s = GPUSession(site.url, TOKENS["alice"], session_id="nb-detach")
    quiet = {"stdout": io.StringIO(), "stderr": io.StringIO()}
    ns: dict = {}
    s.run("import os\nfirst = os.getpid()", ns, **quiet)
    for attempt in range(3):
        s.close()
        s.run("import os, time\npid = os.getpid()\ntime.sleep(0.5)", ns, **quiet)
        assert ns["pid"] != ns["first"], "the ended session's sandbox ran the next session's cell"
        time.sleep(0.5)  # the end has reached the agent by now
        s.run("import os\nagain = os.getpid()", ns, **quiet)
        assert ns["again"] == ns["pid"], "the new session's sandbox was stopped by the old session's end"
        ns["first"] = ns["pid"]
    assert s.session_id == "nb-detach.4"


def test_a_cell_right_after_gpu_detach_runs_in_the_next_session(make_site):
    site = make_site()
    k = Kernel(dict(os.environ, GPU_ATTACH_BROKER_URL=site.url, GPU_ATTACH_TOKEN=TOKENS["alice"]))
    try:
        k.ok("%%gpu\nimport os\nfirst = os.getpid()")
        k.ok("%gpu detach")
        k.ok("%%gpu\nimport os, time\npid = os.getpid()\ntime.sleep(0.5)")
        time.sleep(0.5)  # the end of the detached session has reached the agent by now
        k.ok("%%gpu\nagain = os.getpid()")
        first, pid, again = k.value("[first, pid, again]")
        assert again == pid != first
        sid = k.value("__import__('jupyter_gpu_attach').connection.current_session().session_id")
        assert sid.endswith(".2"), sid  # k-<kernel id>.<pid>.2 in a Jupyter server's kernels
        k.ok("%gpu detach")
        k.ok("%%gpu\nthird = os.getpid()")
        third = k.value("__import__('jupyter_gpu_attach').connection.current_session().session_id")
        assert third == sid[:-2] + ".3", (sid, third)
    finally:
        k.stop()
