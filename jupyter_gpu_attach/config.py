"""Every notebook-side setting, in one place (traitlets; set in ipython_config.py or the environment)."""

from __future__ import annotations

import os

from traitlets import Float, Unicode, default
from traitlets.config import Configurable


class GPUAttach(Configurable):
    """How the kernel (and the Jupyter Server extension) reach the GPU pool.

    ``c.GPUAttach.broker_url = ...`` in IPython config, or in jupyter_server_config.py for the panel.
    """

    broker_url = Unicode(
        help="URL of the broker. Empty: start an embedded broker and agent on 127.0.0.1 for this kernel. "
        "Default: $GPU_ATTACH_BROKER_URL.",
    ).tag(config=True)

    token = Unicode(help="Bearer token for the broker. Default: $GPU_ATTACH_TOKEN.").tag(config=True)

    refresh_interval = Float(
        2.0, min=0.5, max=300,
        help="Seconds between the JupyterLab panel's and the notebook widget's refreshes of the pool. "
        "Default: $GPU_ATTACH_REFRESH_S, else 2.",
    ).tag(config=True)

    wait_s = Float(
        600.0, min=0, max=86400,
        help="Seconds a %%gpu cell waits in the broker's queue when no GPU is free (0: fail at once; "
        "%%gpu --wait S overrides it per cell). Default: $GPU_ATTACH_WAIT_S, else 600.",
    ).tag(config=True)

    @default("wait_s")
    def _wait_s_default(self):
        return float(os.environ.get("GPU_ATTACH_WAIT_S", "600"))

    @default("refresh_interval")
    def _refresh_interval_default(self):
        return float(os.environ.get("GPU_ATTACH_REFRESH_S", "2"))

    @default("broker_url")
    def _broker_url_default(self):
        return os.environ.get("GPU_ATTACH_BROKER_URL", "")

    @default("token")
    def _token_default(self):
        return os.environ.get("GPU_ATTACH_TOKEN", "")
