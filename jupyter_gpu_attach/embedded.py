"""The zero-configuration default: a broker and agent on 127.0.0.1, started for this kernel.

They run as a child process tree (``gpu-attach up``) with random ports and tokens, and stop
when the kernel exits, however it exits (they watch the kernel's pid).
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from gpu_attach_server.cli import NotReady, wait_ready


class EmbeddedPool:
    def __init__(self, timeout: float = 60.0):
        cmd = [sys.executable, "-m", "gpu_attach_server.cli", "--log-level", "info", "up", "--json",
               "--exit-with-parent", str(os.getpid())]
        state_dir = os.environ.get("GPU_ATTACH_STATE_DIR")
        if state_dir:  # kept afterwards (the demo reads the broker's records from it)
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            cmd += ["--state-dir", state_dir]
            self.log_path = Path(state_dir) / "embedded.log"
            self._own_log = False
        else:  # `up` makes a private state folder (signing key included) and removes it on exit
            fd, name = tempfile.mkstemp(prefix=f"gpu-attach-embedded-{os.getpid()}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
            self._own_log = True  # removed when the pool stops
        # The broker's and agent's logs go to a file: in a kernel, inherited stderr would land in cells.
        with open(self.log_path, "ab") as log:
            # Its own session: the stop button signals the kernel's whole process group (JupyterLab
            # does), and must interrupt the cell, not kill the pool every later cell needs.
            env = dict(os.environ, GPU_ATTACH_UP_LOG=str(self.log_path)) if self._own_log else None
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
                                         start_new_session=True, env=env)
        try:
            info = wait_ready(self.proc, "the embedded broker and agent", timeout)
        except NotReady as e:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
            raise RuntimeError(f"{e}. Their log ({self.log_path}) ends with:\n{tail}") from None
        self.url: str = info["url"]
        self.token: str = info["token"]
        self.admin_token: str = info["admin_token"]
        self.devices: list[dict] = info["agent"]["devices"]
        self.pids: dict[str, int] = dict(info["pids"], up=self.proc.pid)
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._own_log:
            self.log_path.unlink(missing_ok=True)
