"""First run outside the checkout, as a new user meets it: the wheel's demo, the licence, and the
one clear line an agent or broker prints when it cannot start (at once, saying what to do)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, TOKENS

CLI = [sys.executable, "-m", "gpu_attach_server.cli"]


class Lines:
    """A child process whose stderr lines are collected as they come (it may run on)."""

    def __init__(self, cmd: list[str], env: dict):
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            # The agent's report of what isolation it enforces is said at every start, by design.
            if " isolation: " not in line:
                self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> float:
        """Seconds until a line matches ``pattern``; fails after ``timeout``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if any(re.search(pattern, line) for line in self.lines):
                return time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; stderr so far: {self.lines}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._reader.join(5)


def _agent_env(token: str = TOKENS["agent"]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_ATTACH_")}
    env["GPU_ATTACH_AGENT_TOKEN"] = token
    return env


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the agent -----------------------------------------------------------------------------------

def test_agent_with_a_wrong_token_says_which_variable_at_once(make_site):
    site = make_site()
    agent = Lines(CLI + ["agent", "--broker", site.url, "--name", "wrong", "--simulate", "1"],
                  _agent_env("not-the-agent-token-0123456789"))
    try:
        assert agent.proc.wait(15) == 2, "a token the broker does not know cannot become right by waiting"
    finally:
        agent.stop()
    assert len(agent.lines) == 1, agent.lines
    line = agent.lines[0]
    assert "GPU_ATTACH_AGENT_TOKEN" in line and "refused this agent's credential" in line and "enrol" in line
    assert not re.search(r"\bGPU_ATTACH_TOKEN\b", line), "the user's variable is not the agent's fix"


def test_agent_with_an_unreachable_broker_says_so_at_once(tmp_path):
    agent = Lines(CLI + ["agent", "--broker", f"http://127.0.0.1:{_closed_port()}", "--simulate", "1"], _agent_env())
    try:
        assert agent.wait_for("cannot reach the broker at http://127.0.0.1:", 15) < 15  # start-up included; not 60 s
        time.sleep(1.5)  # it keeps trying (the broker may be starting), without repeating itself
        assert agent.proc.poll() is None
        assert len(agent.lines) == 1, agent.lines
        assert "--broker" in agent.lines[0] and "retrying" in agent.lines[0]
    finally:
        agent.stop()


def test_agent_whose_name_is_taken_says_so_at_once(make_site):
    site = make_site(agent="taken")  # its credential, used by a second process under the same name
    agent = Lines(CLI + ["agent", "--broker", site.url, "--name", "taken", "--simulate", "1",
                         "--state-dir", str(site.tmp / "second-agent")], _agent_env(site.enrol("taken")))
    try:
        assert agent.wait_for(r"agent id 'taken' is in use by a live agent", 15) < 15
        time.sleep(1)
        assert len(agent.lines) == 1, agent.lines
        assert "--name" in agent.lines[0]
    finally:
        agent.stop()


def test_agent_that_falls_back_to_simulated_devices_says_so_by_default(make_site):
    """No --simulate and no NVIDIA GPU here: the agent serves a simulated device and says so at the
    default log level (warning), not only in an info line."""
    pytest.importorskip("requests")
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this host has an NVIDIA GPU: the agent serves it, nothing falls back")
    except Exception:
        pass
    site = make_site()
    agent = Lines(CLI + ["agent", "--broker", site.url, "--name", "fallback"], _agent_env())
    try:
        agent.wait_for(r"^gpu-attach agent: no NVIDIA GPU .*SIMULATED device", 15)
    finally:
        agent.stop()


# -- the broker ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variable, value, named", [
    ("GPU_ATTACH_USER_TOKENS", "alice:short", "GPU_ATTACH_USER_TOKENS (entry 'alice')"),
    ("GPU_ATTACH_ADMIN_TOKEN", "tiny", "GPU_ATTACH_ADMIN_TOKEN"),
    ("GPU_ATTACH_AGENT_TOKEN", "0123456789", "GPU_ATTACH_AGENT_TOKEN"),
])
def test_broker_with_a_short_token_prints_one_line(tmp_path, variable, value, named):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_ATTACH_")}
    env.update(GPU_ATTACH_USER_TOKENS=f"bob:{TOKENS['bob']}", GPU_ATTACH_AGENT_TOKEN=TOKENS["agent"])
    env[variable] = value
    r = subprocess.run(CLI + ["broker", "--port", "0", "--state-dir", str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert named in lines[0] and "at least 16" in lines[0], lines[0]
    assert value not in lines[0].replace(named, ""), "the secret itself is not printed"


def test_broker_with_a_malformed_token_list_prints_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_ATTACH_")}
    env.update(GPU_ATTACH_USER_TOKENS="alice", GPU_ATTACH_AGENT_TOKEN=TOKENS["agent"])
    r = subprocess.run(CLI + ["broker", "--port", "0", "--state-dir", str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "NAME:TOKEN" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# -- the demo and the wheel ----------------------------------------------------------------------

def test_demo_with_a_missing_notebook_prints_one_line(tmp_path):
    r = subprocess.run(CLI + ["demo", "--notebook", str(tmp_path / "nope.ipynb")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [f"gpu-attach demo: cannot read the notebook: [Errno 2] No such file or "
                                             f"directory: '{tmp_path / 'nope.ipynb'}'"]


def test_licence_is_bsd_3_clause():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License") and "Copyright (c) 2026, jupyter-gpu-attach developers" in text


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                    str(REPO)], check=True, timeout=300)
    return next(out.glob("jupyter_gpu_attach-*.whl"))


def test_wheel_ships_the_quickstart_and_the_licence(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "gpu_attach_server/demo_notebooks/quickstart.ipynb" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


@pytest.mark.timeout(400)
def test_demo_runs_from_the_installed_wheel_outside_the_checkout(wheel, tmp_path):
    """A venv with only the wheel's files for this project (dependencies borrowed from the test
    environment's site-packages), run from a folder that has no examples/."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True, timeout=120)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # A plain path line: the test env's editable finder for this project is not activated by it.
    (Path(site) / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = subprocess.run([str(py), "-c", "import gpu_attach_server, jupyter_gpu_attach; print(gpu_attach_server.__file__, "
                            "jupyter_gpu_attach.__file__)"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert str(REPO) not in where, f"the wheel's copy must be the one imported: {where}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_ATTACH_")}
    r = subprocess.run([str(venv / "bin" / "gpu-attach"), "demo"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "demo_notebooks/quickstart.ipynb" in r.stdout
    assert "every lease released when its cell ended: yes" in r.stdout
