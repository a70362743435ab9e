"""Schemathesis against the live OpenAPI document of a real broker process, with a user's and
the admin's token: no 5xx, every status code documented, every response conforming to its schema.

Schemathesis's own pytest plugin does not load under pytest 9, so the cases are drawn from its
per-operation Hypothesis strategies here, and checked with its checks.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from broker_site import TOKENS, BrokerSite

EXAMPLES_PER_OPERATION = 15


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    s = BrokerSite(tmp_path_factory.mktemp("fuzz"), "--agent-timeout", "3600")
    s.register_fake_agent("h1", 2)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def operations(live):
    api = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    ops = [result.ok() for result in api.get_all_operations()]
    assert len(ops) > 25, "the document lost routes"
    return ops


def _fuzz(operations, who: str) -> None:
    headers = {"Authorization": f"Bearer {TOKENS[who]}"}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def check(case):
            case.call_and_validate(headers=headers)
        check()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("who", ["alice", "admin"])
def test_the_api_keeps_its_document(operations, who):
    _fuzz(operations, who)
