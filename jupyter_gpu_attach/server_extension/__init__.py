"""The Jupyter Server extension: the GPU pool and this user's leases for the JupyterLab panel.

Enabled by ``pip install`` (``etc/jupyter/jupyter_server_config.d/jupyter_gpu_attach.json``).
With ``c.GPUAttach.broker_url`` (or ``$GPU_ATTACH_BROKER_URL``) it reads that broker with the
server's token. With neither, it starts ONE embedded broker and agent for the whole Jupyter server.
Either way it puts the broker's URL and token in this process's environment, so every kernel the
server starts from then on uses the same pool: the panel and ``%gpu pool`` show the same GPUs and leases.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path

from .. import __version__
from ..broker_client import BrokerClient
from ..config import GPUAttach
from .handlers import setup_handlers
from .pool_view import PoolView

LABEXTENSION_DIR = Path(__file__).resolve().parent.parent / "labextension"
BUILD_HINT = ("the JupyterLab panel was not built (no Node.js when this package was installed from source): "
              "install Node.js 20+, then `pip install .` again, or `cd labextension && npm install && npm run build`")


class GPUAttachExtension:
    """The extension's lifetime state: its config, its :class:`PoolView`, and any embedded pool."""

    def __init__(self, config: GPUAttach, log):
        self.version = __version__
        self.log = log
        self.refresh_interval = config.refresh_interval
        self.embedded = None
        self.view: PoolView | None = None
        self.problem = ""
        self.labextension_built = (LABEXTENSION_DIR / "package.json").exists() or _installed_labextension()
        url, token = config.broker_url, config.token
        if url and not token:
            self.problem = ("c.GPUAttach.broker_url (or GPU_ATTACH_BROKER_URL) is set but no token: set "
                            "c.GPUAttach.token or GPU_ATTACH_TOKEN for the Jupyter server, and restart it")
            return
        if not url:
            url, token = self._start_embedded()
            if not url:
                return
        # Kernels inherit the server's environment: from here on they all use this one pool
        # (connection.get_session reads these), whether it came from config or is embedded.
        os.environ["GPU_ATTACH_BROKER_URL"] = url
        os.environ["GPU_ATTACH_TOKEN"] = token
        self.view = PoolView(BrokerClient(url, token, timeout=10), embedded=self.embedded is not None,
                             refresh_interval=self.refresh_interval)

    def _start_embedded(self) -> tuple[str, str]:
        from ..embedded import EmbeddedPool

        try:
            self.embedded = EmbeddedPool()
        except Exception as e:  # the server still starts; the panel says why the pool is missing
            self.problem = (f"the embedded GPU broker did not start: {e}. Set c.GPUAttach.broker_url and "
                            "c.GPUAttach.token to use a running broker instead")
            self.log.error("gpu-attach: %s", self.problem)
            return "", ""
        atexit.register(self.stop)
        sim = " simulated" if all(d["simulated"] for d in self.embedded.devices) else ""
        self.log.info("gpu-attach: no broker configured; started an embedded broker at %s with %d%s device(s) "
                      "for this server and its kernels", self.embedded.url, len(self.embedded.devices), sim)
        return self.embedded.url, self.embedded.token

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
            for name in ("GPU_ATTACH_BROKER_URL", "GPU_ATTACH_TOKEN"):
                if os.environ.get(name) in (self.embedded.url, self.embedded.token):
                    del os.environ[name]
            self.embedded = None


def _installed_labextension() -> bool:
    try:
        from jupyter_core.paths import jupyter_path
    except ImportError:
        return False
    return any(Path(p, "jupyter-gpu-attach", "package.json").exists() for p in jupyter_path("labextensions"))


def _jupyter_server_extension_points():
    return [{"module": "jupyter_gpu_attach.server_extension"}]


def _load_jupyter_server_extension(serverapp) -> None:
    """Called by Jupyter Server at start-up: read config, connect (or start the pool), add handlers."""
    config = GPUAttach(parent=serverapp)
    extension = GPUAttachExtension(config, serverapp.log)
    setup_handlers(serverapp.web_app, extension)
    if not extension.labextension_built:
        serverapp.log.warning("gpu-attach: %s", BUILD_HINT)
    if extension.problem:
        serverapp.log.warning("gpu-attach: %s", extension.problem)
    else:
        serverapp.log.info("gpu-attach: panel API at /gpu-attach/api/ (broker %s)", extension.view.broker.url)
