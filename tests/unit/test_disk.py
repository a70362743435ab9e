"""agent/disk.py: the sparse image a sandbox's HOME lives on (mounted by the sandbox itself; see
tests/security/test_cell_attacks.py for a cell filling one)."""

from __future__ import annotations

import os

import pytest

from gpu_attach_server.agent import disk

pytestmark = pytest.mark.skipif(disk.mkfs() is None and not os.environ.get("CI"),
                                reason="no mkfs.ext4 here (.ci/run installs e2fsprogs)")


def test_an_image_is_sparse_and_private(tmp_path):
    image = str(tmp_path / "s.img")
    disk.make_image(image, 1 << 30)
    st = os.stat(image)
    assert st.st_size == 1 << 30 and st.st_blocks * 512 < 16 << 20, "a 1 GiB image takes MiBs of the host's disk"
    assert st.st_mode & 0o777 == 0o600


def test_a_failed_mkfs_leaves_no_image_behind(tmp_path):
    image = str(tmp_path / "tiny.img")
    with pytest.raises(OSError, match="mkfs.ext4 failed"):
        disk.make_image(image, 4096)  # too small for any ext4
    assert not os.path.exists(image)


def test_a_timed_out_mkfs_leaves_no_image_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(disk, "MKFS_TIMEOUT_S", 0.0)
    image = str(tmp_path / "slow.img")
    with pytest.raises(Exception):
        disk.make_image(image, 1 << 30)
    assert not os.path.exists(image)
