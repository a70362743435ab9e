"""pytest-jupyter's server fixtures (jp_fetch, jp_serverapp), for this folder only.

Loaded by import rather than ``pytest_plugins`` so that their autouse fixtures and hooks (a
fresh event loop per test, async test functions) touch no other test folder.
"""

import os

import pytest
from pytest_jupyter.jupyter_core import *  # noqa: F401,F403
from pytest_jupyter.jupyter_core import pytest_pycollect_makeitem, pytest_pyfunc_call  # noqa: F401
from pytest_jupyter.jupyter_server import *  # noqa: F401,F403
from pytest_jupyter.pytest_tornasync import *  # noqa: F401,F403

from tests.conftest import TOKENS


@pytest.fixture
def alice_env(site, monkeypatch):
    """The server's (and so its kernels') environment points at the test site as alice."""
    monkeypatch.setenv("GPU_ATTACH_BROKER_URL", site.url)
    monkeypatch.setenv("GPU_ATTACH_TOKEN", TOKENS["alice"])
    return dict(os.environ)
