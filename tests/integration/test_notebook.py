"""The quickstart notebook, executed headless with nbclient on the embedded default."""

from __future__ import annotations

import os
import subprocess
import sys

import nbclient
import nbformat

from conftest import REPO, pid_alive as _alive


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("GPU_ATTACH_BROKER_URL", "GPU_ATTACH_TOKEN")}


def test_quickstart_runs_on_the_embedded_default(monkeypatch, tmp_path):
    for k in ("GPU_ATTACH_BROKER_URL", "GPU_ATTACH_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("GPU_ATTACH_STATE_DIR", str(tmp_path))
    nb = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    code = [c for c in nb.cells if c.cell_type == "code"]

    def text(cell, name=None):
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and (name is None or o.name == name))

    gpu_cell = code[1]
    assert "done" in text(gpu_cell, "stdout")
    assert "embedded broker" in text(gpu_cell, "stderr")
    assert text(gpu_cell, "stderr").count("is a SIMULATED device") == 1
    assert "SIMULATED" not in text(code[3], "stderr"), "the simulated notice shows once per session"
    pool = text(code[2])
    assert pool.startswith("float ") and "0%" in pool and "Simulated" in pool
    assert "numpy (500, 2000)" in text(code[4])
    assert "no GPU (none is held between cells)" in text(code[4])
    assert (tmp_path / "broker.sqlite").exists()


def test_demo_command_prints_outputs_and_timeline():
    r = subprocess.run([sys.executable, "-m", "gpu_attach_server.cli", "demo"], cwd=REPO, env=_clean_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "done" in r.stdout and "Lease timeline" in r.stdout
    assert "every lease lies inside its %%gpu cell: yes" in r.stdout
    assert "every lease released when its cell ended: yes" in r.stdout


def test_embedded_broker_and_agent_stop_with_the_kernel(tmp_path):
    """Killing the kernel (as a restart or crash does) takes its embedded broker and agent along."""
    import time

    from conftest import Kernel

    env = dict(_clean_env(), GPU_ATTACH_STATE_DIR=str(tmp_path))
    k = Kernel(env)
    try:
        k.ok("%%gpu\nv = 1")
        pids = k.value("get_ipython().user_ns.setdefault('_ga', __import__('jupyter_gpu_attach')).get_session().embedded.pids")
        assert set(pids) == {"broker", "agent", "up"}
        assert all(_alive(p) for p in pids.values())
    finally:
        k.km.shutdown_kernel(now=True)  # SIGKILL: no atexit handlers run in the kernel
        k.kc.stop_channels()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids.values()), pids


def test_a_killed_kernel_leaves_no_log_file(tmp_path):
    """Each embedded pool logs to a temporary file; it goes with the pool, also when the kernel
    is killed and cannot clean up after itself."""
    import time

    from conftest import Kernel

    env = dict(_clean_env(), TMPDIR=str(tmp_path))
    k = Kernel(env)
    try:
        k.ok("%%gpu\nv = 1", timeout=120)
        log = k.value("str(__import__('jupyter_gpu_attach').get_session().embedded.log_path)")
        assert log.startswith(str(tmp_path)) and os.path.exists(log)
    finally:
        k.km.shutdown_kernel(now=True)
        k.kc.stop_channels()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and os.path.exists(log):
        time.sleep(0.2)
    assert not os.path.exists(log)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("gpu-attach")], os.listdir(tmp_path)
