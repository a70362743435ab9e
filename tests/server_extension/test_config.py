"""Configuration problems surface in the API (503 with the fix), and the embedded default pool."""

from __future__ import annotations

import json
import os

import pytest
from tornado.httpclient import HTTPClientError

EXT = {"jupyter_gpu_attach.server_extension": True}


async def _in_kernel(serverapp, kernel_id: str, code: str) -> str:
    kc = serverapp.kernel_manager.get_kernel(kernel_id).client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        out = []
        reply = await kc.execute_interactive(code, output_hook=lambda m: out.append(m["content"].get("text", "")),
                                             timeout=60)
        assert reply["content"]["status"] == "ok", reply["content"]
        return "".join(out).strip()
    finally:
        kc.stop_channels()


class TestUrlWithoutToken:
    @pytest.fixture
    def jp_server_config(self):
        return {"ServerApp": {"jpserver_extensions": EXT},
                "GPUAttach": {"broker_url": "http://127.0.0.1:9", "token": ""}}

    async def test_says_to_set_the_token(self, jp_fetch, monkeypatch):
        info = json.loads((await jp_fetch("gpu-attach", "api", "info")).body)
        assert info["connected"] is False and "c.GPUAttach.token" in info["problem"]
        with pytest.raises(HTTPClientError) as e:
            await jp_fetch("gpu-attach", "api", "state")
        assert e.value.code == 503 and "GPU_ATTACH_TOKEN" in json.loads(e.value.response.body)["detail"]


class TestEmbedded:
    @pytest.fixture
    def jp_server_config(self, monkeypatch):
        monkeypatch.setenv("GPU_ATTACH_BROKER_URL", "")
        monkeypatch.setenv("GPU_ATTACH_TOKEN", "")
        return {"ServerApp": {"jpserver_extensions": EXT}}

    async def test_one_embedded_pool_for_the_server_and_its_kernels(self, jp_fetch, jp_serverapp):
        ext = jp_serverapp.web_app.settings["gpu_attach"]
        try:
            info = json.loads((await jp_fetch("gpu-attach", "api", "info")).body)
            assert info["connected"] and info["embedded"]
            # Kernels inherit the server's environment, so they join this pool instead of starting one.
            assert os.environ["GPU_ATTACH_BROKER_URL"] == info["broker_url"] == ext.embedded.url
            assert os.environ["GPU_ATTACH_TOKEN"] == ext.embedded.token
            pool = json.loads((await jp_fetch("gpu-attach", "api", "pool")).body)
            assert pool["simulated"] and len(pool["gpus"]) >= 1
            # A notebook's kernel started by this server uses that same pool (what `%gpu pool` reads).
            r = await jp_fetch("api", "sessions", method="POST", body=json.dumps(
                {"path": "a.ipynb", "type": "notebook", "name": "a.ipynb", "kernel": {"name": "python3"}}))
            kernel_id = json.loads(r.body)["kernel"]["id"]
            seen = await _in_kernel(jp_serverapp, kernel_id,
                                    "from jupyter_gpu_attach import connection; s = connection.get_session(); "
                                    "print(s.broker.url, s.embedded is None, [g['id'] for g in s.pool()['gpus']])")
            assert seen == f"{ext.embedded.url} True {[g['id'] for g in pool['gpus']]}"
        finally:
            ext.stop()


class TestConfiguredByTraitlets:
    @pytest.fixture
    def jp_server_config(self, site, monkeypatch):
        monkeypatch.setenv("GPU_ATTACH_BROKER_URL", "")
        monkeypatch.setenv("GPU_ATTACH_TOKEN", "")
        from tests.conftest import TOKENS

        return {"ServerApp": {"jpserver_extensions": EXT},
                "GPUAttach": {"broker_url": site.url, "token": TOKENS["alice"]}}

    async def test_kernels_get_the_configured_broker(self, jp_fetch, site):
        from tests.conftest import TOKENS

        info = json.loads((await jp_fetch("gpu-attach", "api", "info")).body)
        assert info["connected"] and not info["embedded"] and info["broker_url"] == site.url
        # c.GPUAttach in the server's config reaches the kernels through their inherited environment.
        assert os.environ["GPU_ATTACH_BROKER_URL"] == site.url
        assert os.environ["GPU_ATTACH_TOKEN"] == TOKENS["alice"]
