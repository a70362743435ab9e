"""The Python API for scripts (``lease`` and ``@remote``), in real script processes on the embedded default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import numpy as np
    import jupyter_gpu_attach as gpa

    def where(a, scale=1.0):
        import cupy as cp
        print("printed remotely")
        return {"pid": os.getpid(), "sum": float((cp.asarray(a) * scale).sum()), "arr": cp.asarray(a) * 2}

    def boom():
        raise KeyError("remote key")

    def unpicklable():
        return (i for i in range(3))

    @gpa.remote(fraction=0.5)
    def double(a):
        return a * 2

    @gpa.remote
    def remote_pid():
        return os.getpid()

    out = {"pid": os.getpid()}
    out["bare_remote_pid"] = remote_pid()
    with gpa.lease(memory="1GiB") as g:
        r = g.run(where, np.arange(4.0), scale=0.5)
        out["remote_pid"], out["sum"] = r["pid"], r["sum"]
        out["arr_type"] = type(r["arr"]).__module__ + "." + type(r["arr"]).__name__
        out["arr"] = r["arr"].tolist()
        out["lease_memory"] = g.last.lease["memory_per_gpu"]
        out["lease_state_after"] = gpa.get_session().broker.lease(g.last.lease["id"])["state"]
        try:
            g.run(boom)
        except KeyError as e:
            out["error"] = repr(e)
        try:
            g.run(unpicklable)
        except TypeError as e:
            out["unpicklable"] = str(e)
    out["double"] = double(np.arange(3)).tolist()
    out["double_local"] = double.local(np.arange(3)).tolist()
    out["double_fraction"] = double.lease.last.lease["fraction"]
    out["used_after"] = sum(gpu["used_memory"] for gpu in gpa.get_session().pool()["gpus"])
    try:
        gpa.lease(pool="no-such-pool").run(double.local, 1)
    except gpa.NoCapacity as e:
        out["pool"] = str(e)
    try:
        gpa.lease(memory="lots")
    except ValueError as e:
        out["bad_option"] = str(e)
    print("RESULT=" + json.dumps(out))
''')


def _run(tmp_path, script: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("GPU_ATTACH_BROKER_URL", "GPU_ATTACH_TOKEN")}
    env["GPU_ATTACH_STATE_DIR"] = str(tmp_path / "state")
    path = tmp_path / "script.py"
    path.write_text(script)
    return subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)


def test_lease_and_remote_run_functions_on_a_leased_slice(tmp_path):
    r = _run(tmp_path, SCRIPT)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.split("RESULT=")[1])
    assert out["remote_pid"] != out["pid"], "the function ran in this process, not on the GPU host"
    assert out["bare_remote_pid"] != out["pid"], "@remote without options runs remotely too"
    assert out["sum"] == 3.0
    assert out["arr_type"] == "numpy.ndarray" and out["arr"] == [0.0, 2.0, 4.0, 6.0], "GPU arrays come back as NumPy"
    assert "printed remotely" in r.stdout, "the function's output streams into the script's"
    assert out["lease_memory"] == 2**30, "the lease asked for the memory given to lease()"
    assert out["lease_state_after"] == "released", "the slice is released as the call returns"
    assert out["error"] == "KeyError('remote key')", "a remote exception is raised with its own type"
    assert "cannot come back" in out["unpicklable"]
    assert out["double"] == [0, 2, 4] and out["double_local"] == [0, 2, 4]
    assert out["double_fraction"] == 0.5, "@remote's options reach the lease"
    assert out["used_after"] == 0, "no slice is held between calls or after the block"
    assert "not a size: 'lots'" in out["bad_option"]
    assert "no-such-pool" in out.get("pool", ""), "a pool without a size is still asked for"
    assert "Traceback" not in r.stderr, r.stderr


def test_the_documented_example_runs(tmp_path):
    r = _run(tmp_path, (REPO / "examples" / "python_api.py").read_text())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sum: 499999500000.0" in r.stdout and "scaled sum: 249999750000.0" in r.stdout
    assert "normalised: ndarray [-1.567" in r.stdout
