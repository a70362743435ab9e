"""PoolView, the panel's core, without a web server: leases named by notebook, queue positions,
history sampling, and the ``%gpu attach`` line."""

from __future__ import annotations

import pytest

from jupyter_gpu_attach.broker_client import BrokerClient
from jupyter_gpu_attach.server_extension.pool_view import PoolView, attach_line, notebooks_by_session
from tests.conftest import TOKENS


class QueueingBroker:
    """Stands in for a broker that queues (issue 8): the one answer today's broker cannot give."""

    url = "http://broker.invalid"

    def leases(self, state=None, limit=100):
        return [x for x in self._all() if state in (None, x["state"])][:limit]

    def _all(self):
        return [
            {"id": "L000000000001", "state": "queued", "session": "k-abc", "label": "big = train()",
             "gpus": [], "fraction": None, "queued_at": 1.0, "position": 2, "of": 5},
            {"id": "L000000000002", "state": "released", "session": "k-abc", "label": "", "gpus": ["g/0"],
             "fraction": 0.5, "granted_at": 1.0},
        ]


def test_queued_leases_carry_their_position_and_notebook():
    view = PoolView(QueueingBroker())
    (lease,) = view.leases(notebooks_by_session([{"path": "a/b.ipynb", "kernel": {"id": "abc"}}]))
    assert lease["state"] == "queued" and lease["position"] == 2 and lease["of"] == 5
    assert lease["notebook"] == "a/b.ipynb" and lease["kernel_id"] == "abc"


def test_history_keeps_one_point_per_half_interval_and_is_bounded(site):
    view = PoolView(BrokerClient(site.url, TOKENS["alice"]), refresh_interval=0.01)
    for _ in range(70):
        view.pool()
    points = view.history("gpu-host-1/0")
    assert 1 < len(points) <= 60
    slow = PoolView(BrokerClient(site.url, TOKENS["alice"]), refresh_interval=60)
    slow.pool()
    slow.pool()
    assert len(slow.history("gpu-host-1/0")) == 1


def test_release_refuses_what_is_not_a_lease_id(site):
    view = PoolView(BrokerClient(site.url, TOKENS["alice"]))
    with pytest.raises(ValueError, match="not a lease id"):
        view.release("../v1/pool")


@pytest.mark.parametrize("body,line", [
    ({"memory": 3 * 2**30 // 2}, "%gpu attach --memory 1.5GiB"),
    ({"memory": 1000001}, "%gpu attach --memory 1000001"),
])
def test_attach_line_keeps_the_exact_size(body, line):
    assert attach_line(body) == line


def test_outside_a_kernel_the_session_id_is_left_to_the_session():
    from jupyter_gpu_attach.connection import kernel_session_id

    assert kernel_session_id() is None


@pytest.mark.parametrize("session,kernel", [
    ("k-0f3c-77.4242", "0f3c-77"),
    ("k-0f3c-77.4242.3", "0f3c-77"),  # the session after two %gpu detach in that kernel
    ("k-0f3c-77", "0f3c-77"),
    ("k-0f3c-77.4242.3.1", None),
    ("nb-0f3c77", None),
])
def test_a_lease_is_mapped_to_its_kernel_through_detaches(session, kernel):
    from jupyter_gpu_attach.server_extension.pool_view import kernel_id_of

    assert kernel_id_of(session) == kernel
