"""A real JupyterLab (with this package's server extension and prebuilt panel) pointed at the test
site's broker as alice, and Debian's Chromium driven by Playwright."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, TOKENS

BUILT = REPO / "jupyter_gpu_attach" / "labextension"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
LAB_TOKEN = "lab-token-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    def __init__(self, url: str, proc: subprocess.Popen, root: Path, log: Path):
        self.url, self.proc, self.root, self.log = url, proc, root, log
        self.token = LAB_TOKEN

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"token {LAB_TOKEN}"}, timeout=30)


def start_lab(tmp: Path, broker_url: str, token: str, extension: bool = True) -> Lab:
    """JupyterLab on a free port, with the panel as just built and (or without) the server extension."""
    if not (BUILT / "package.json").exists():
        pytest.fail("the JupyterLab panel is not built: `pip install -e .` with Node.js, or "
                    "`cd labextension && npm install && npm run build`")
    root, data, config = tmp / "root", tmp / "data", tmp / "config"
    for d in (root, data / "labextensions", config):
        d.mkdir(parents=True)
    # The panel as just built (JUPYTER_PATH comes first), not a copy an earlier install left.
    (data / "labextensions" / "jupyter-gpu-attach").symlink_to(BUILT)
    (config / "jupyter_server_config.json").write_text(json.dumps(
        {"ServerApp": {"jpserver_extensions": {"jupyter_gpu_attach.server_extension": extension}},
         "GPUAttach": {"refresh_interval": 1.0}}))
    # No "Would you like to get notified about Jupyter news?" toast over the screenshots.
    notify = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    notify.mkdir(parents=True)
    (notify / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port = _free_port()
    env = dict(os.environ, JUPYTER_PATH=str(data), JUPYTER_CONFIG_DIR=str(config),
               GPU_ATTACH_BROKER_URL=broker_url, GPU_ATTACH_TOKEN=token)
    log = tmp / "lab.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
             f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={LAB_TOKEN}", "--ServerApp.allow_root=True",
             "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             "--LabApp.expose_app_in_browser=True", "--JupyterNotebookApp.expose_app_in_browser=True",
             f"--LabApp.user_settings_dir={tmp / 'settings'}",
             f"--LabApp.workspaces_dir={tmp / 'workspaces'}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    lab = Lab(url, proc, root, log)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/api/status", headers={"Authorization": f"token {LAB_TOKEN}"}, timeout=2).status_code == 200:
                return lab
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            lab.stop()
            pytest.fail(f"JupyterLab did not start; its log ends with:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def lab(site, tmp_path_factory):
    """JupyterLab whose server (and so its kernels) uses the test site's broker as alice."""
    lab = start_lab(tmp_path_factory.mktemp("lab"), site.url, TOKENS["alice"])
    yield lab
    lab.stop()


@pytest.fixture(scope="module")
def browser():
    # On a developer's machine a missing browser skips these tests; in CI (.ci/run installs both)
    # it is a failure, so a broken install cannot pass as green.
    missing = pytest.fail if os.environ.get("CI") else pytest.skip
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Playwright is not installed: `pip install playwright` (.ci/run does)")
    if not Path(CHROMIUM).exists():
        missing("Chromium is not installed: `apt-get install -y chromium` (.ci/run does)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()
