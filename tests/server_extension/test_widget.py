"""The notebook widget against a real broker and simulated agent: it draws the pool and this
notebook's leases, refreshes live, and sets the notebook's default request like ``%gpu attach``."""

from __future__ import annotations

import time

import pytest

from jupyter_gpu_attach import connection, widget
from jupyter_gpu_attach.slices import SliceRequest
from tests.conftest import TOKENS


@pytest.fixture
def pool_widget(site, monkeypatch):
    monkeypatch.setenv("GPU_ATTACH_BROKER_URL", site.url)
    monkeypatch.setenv("GPU_ATTACH_TOKEN", TOKENS["alice"])
    connection.close_session()
    w = widget(refresh_interval=0.5)
    yield w
    w.close()
    connection.close_session()


def test_widget_draws_the_pool_and_follows_leases_live(pool_widget, site):
    assert "gpu-host-1/0" in pool_widget.view.value and "simulated" in pool_widget.view.value
    assert "Your leases</b>: none" in pool_widget.view.value
    session = pool_widget.session.session_id
    with site.client("alice") as c:
        lease = c.post("/v1/leases", json={"fraction": 0.5, "session": session, "label": "fit <b>x</b>"}).json()
    try:
        deadline = time.monotonic() + 10
        while lease["id"] not in pool_widget.view.value and time.monotonic() < deadline:
            time.sleep(0.1)
        html = pool_widget.view.value
        assert lease["id"] in html and "this notebook" in html
        assert "fit &lt;b&gt;x&lt;/b&gt;" in html, "cell labels must be escaped"
        assert 'width:50.0%' in html
    finally:
        with site.client("alice") as c:
            c.delete(f"/v1/leases/{lease['id']}")


@pytest.mark.parametrize("kind,amount,expected", [
    ("memory", "2GiB", SliceRequest(memory=2 * 2**30)),
    ("fraction", "0.25", SliceRequest(fraction=0.25)),
    ("gpus", "1", SliceRequest(gpus=1)),
    ("mig", "1g.10gb", SliceRequest(mig="1g.10gb")),
])
def test_set_default_changes_the_sessions_request(pool_widget, kind, amount, expected):
    pool_widget.kind.value, pool_widget.amount.value = kind, amount
    pool_widget.set_default()
    assert pool_widget.session.default == expected
    assert expected.describe() in pool_widget.default_view.value and pool_widget.message.value == ""


def test_a_default_set_elsewhere_shows_at_the_next_refresh(pool_widget):
    pool_widget.session.default = SliceRequest(fraction=0.125)  # what `%gpu attach --fraction 0.125` does
    pool_widget.refresh()
    assert SliceRequest(fraction=0.125).describe() in pool_widget.default_view.value


@pytest.mark.parametrize("kind,amount", [("fraction", "3"), ("gpus", "one"), ("memory", "lots"), ("mig", "half")])
def test_a_bad_amount_says_why_and_changes_nothing(pool_widget, kind, amount):
    before = pool_widget.session.default
    pool_widget.kind.value, pool_widget.amount.value = kind, amount
    pool_widget.set_default()
    assert pool_widget.session.default == before
    assert "error-color" in pool_widget.message.value
