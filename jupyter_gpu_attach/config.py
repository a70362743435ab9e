"""Every notebook-side setting, in one place (traitlets; set in ipython_config.py or the environment)."""

from __future__ import annotations

import os

from traitlets import Unicode, default
from traitlets.config import Configurable


class GPUAttach(Configurable):
    """How the kernel reaches the GPU pool. ``c.GPUAttach.broker_url = ...`` in IPython config."""

    broker_url = Unicode(
        help="URL of the broker. Empty: start an embedded broker and agent on 127.0.0.1 for this kernel. "
        "Default: $GPU_ATTACH_BROKER_URL.",
    ).tag(config=True)

    token = Unicode(help="Bearer token for the broker. Default: $GPU_ATTACH_TOKEN.").tag(config=True)

    @default("broker_url")
    def _broker_url_default(self):
        return os.environ.get("GPU_ATTACH_BROKER_URL", "")

    @default("token")
    def _token_default(self):
        return os.environ.get("GPU_ATTACH_TOKEN", "")
