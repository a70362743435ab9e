"""With the broker down, or misconfigured, the API answers an error that says what to do."""

from __future__ import annotations

import json
import socket

import pytest
from tornado.httpclient import HTTPClientError

EXT = {"jupyter_gpu_attach.server_extension": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jp_server_config():
    # Nothing listens on this port: the broker is "down".
    return {"ServerApp": {"jpserver_extensions": EXT},
            "GPUAttach": {"broker_url": f"http://127.0.0.1:{_free_port()}", "token": "t" * 20}}


@pytest.mark.parametrize("path", ["state", "pool", "leases"])
async def test_broker_down_is_502_naming_the_fix(jp_fetch, path):
    with pytest.raises(HTTPClientError) as e:
        await jp_fetch("gpu-attach", "api", path)
    assert e.value.code == 502
    detail = json.loads(e.value.response.body)["detail"]
    assert "cannot reach the broker" in detail and "GPU_ATTACH_BROKER_URL" in detail
