"""Broker user names map to unprivileged uids: stable, distinct, never root."""

from __future__ import annotations

import pytest

from gpu_attach_server.agent.identities import IdentityError, UserIds, parse_range


def test_a_range_is_parsed_and_system_uids_are_refused():
    assert parse_range("60000-60009") == range(60000, 60010)
    with pytest.raises(ValueError, match="FIRST-LAST"):
        parse_range("60000")
    with pytest.raises(ValueError, match="system accounts"):
        parse_range("0-100")


def test_users_get_distinct_stable_uids_that_survive_a_restart(tmp_path):
    ids = UserIds(range(60000, 60004), tmp_path / "uids.json")
    got = {u: ids.uid_for(u) for u in ("alice", "bob", "carol", "dave")}
    assert len(set(got.values())) == 4 and all(60000 <= v < 60004 for v in got.values())
    assert ids.uid_for("alice") == got["alice"]
    again = UserIds(range(60000, 60004), tmp_path / "uids.json")
    assert {u: again.uid_for(u) for u in got} == got
    assert oct((tmp_path / "uids.json").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(IdentityError, match="used up"):
        again.uid_for("eve")


def test_a_fixed_map_comes_first_and_never_maps_to_root():
    assert UserIds(range(60000, 60010), fixed={"alice": 1001}).uid_for("alice") == 1001
    with pytest.raises(ValueError, match="uid 0"):
        UserIds(range(60000, 60010), fixed={"mallory": 0})
    with pytest.raises(IdentityError):
        UserIds(range(60000, 60010)).uid_for("../etc")
