"""A kernel's session lives as long as the kernel does: it beats the broker while it lives, and a
kernel that dies without a word (SIGKILL, a crash) has its sandbox reclaimed within the broker's
session timeout, not the agent's idle limit (10 min by default)."""

from __future__ import annotations

import gc
import io
import os
import time

from conftest import TOKENS, Kernel
from jupyter_gpu_attach.session import GPUSession

TIMEOUT_S = 3.0  # GPU_ATTACH_SESSION_TIMEOUT_S for these sites: kernels beat every 0.5 s


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


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
