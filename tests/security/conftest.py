"""The security suite: a real site whose root agent runs each user's cells as that user's uid."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TOKENS, Site  # noqa: E402

from jupyter_gpu_attach import GPUSession  # noqa: E402

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="per-user uids and cgroups need a root agent")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    s = Site(tmp_path_factory.mktemp("secsite"), lease_ttl=5.0)
    s.start_broker()
    # Small limits, so a fork bomb, a memory hog and a disk filler hit them fast.
    s.start_agent("gpu-host-1", simulate=2, memory="1GiB",
                  extra=("--sandbox-pids", "64", "--sandbox-memory", "1GiB", "--sandbox-disk", "64MiB"))
    yield s
    s.stop()


def run(session: GPUSession, source: str, ns: dict | None = None) -> dict:
    ns = {} if ns is None else ns
    session.run(source, ns, stdout=io.StringIO(), stderr=io.StringIO())
    return ns


@pytest.fixture(scope="module")
def bob(site):
    """The neighbour: bob's session, holding a secret in memory and in a file of his sandbox."""
    session = GPUSession(site.url, TOKENS["bob"], session_id="bob-nb")
    ns = run(session, "import builtins, os, time\n"
                      "builtins.bob_secret = 'BOB-SECRET-' + 'x' * 8\n"
                      "open(os.path.join(os.environ['HOME'], 'secret.txt'), 'w').write(builtins.bob_secret)\n"
                      "pid, home, uid = os.getpid(), os.environ['HOME'], os.getuid()")
    session.info = {"pid": ns["pid"], "home": ns["home"], "uid": ns["uid"]}
    return session


@pytest.fixture
def neighbour_survives(bob):
    """After the attack, bob's next cell runs, with his state intact."""
    yield
    ns = run(bob, "import builtins, os\nsecret = builtins.bob_secret\n"
                  "on_disk = open(os.path.join(os.environ['HOME'], 'secret.txt')).read()\npid = os.getpid()")
    assert ns["secret"].startswith("BOB-SECRET-") and ns["on_disk"] == ns["secret"]
    assert ns["pid"] == bob.info["pid"], "bob's sandbox was replaced: his state was lost"


@pytest.fixture(scope="module")
def alice(site):
    return GPUSession(site.url, TOKENS["alice"], session_id="alice-nb")
