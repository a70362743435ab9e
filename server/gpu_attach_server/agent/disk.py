"""A disk limit per sandbox: the session's working directory (its ``HOME``) is a filesystem of
its own, ``--sandbox-disk`` in size.

The agent makes a sparse ext4 image for each sandbox it claims (it costs host disk only for what
the cell writes), and the sandbox, still root in its own mount namespace, mounts it on its
working directory through a loop device before it becomes the user. A cell that fills it gets
``ENOSPC`` there, having used at most ``--sandbox-disk`` of the host's disk. The mount lives in
the sandbox's namespace only: when the sandbox's last process exits, the kernel unmounts it and
frees the loop device (autoclear); the agent then deletes the image. (A descriptor of a file on
it, passed to another process of the same user, keeps the device, and those blocks, until that
process closes it.) The images are sparse and not reserved: the sizes of all sandboxes' disks may
add up to more than the host has free.

The sandbox's ``/tmp``, ``/var/tmp``, ``/run/lock`` and ``/dev/shm`` are tmpfs, charged to its
memory limit (``jail.py``). What else of the host a sandbox may write to: docs/security.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

MKFS_TIMEOUT_S = 30.0
PROBE_SIZE = 8 << 20


def mkfs() -> str | None:
    return shutil.which("mkfs.ext4") or next((p for p in ("/sbin/mkfs.ext4", "/usr/sbin/mkfs.ext4")
                                              if os.access(p, os.X_OK)), None)


def make_image(path: str, size: int) -> None:
    """A sparse ext4 image of ``size`` bytes at ``path`` (mode 0600): no blocks reserved for root
    (the cell's user gets all of it), inode tables and journal initialised lazily (~12 ms for 20 GiB)."""
    tool = mkfs()
    if tool is None:
        raise OSError("mkfs.ext4 not found (Debian: apt install e2fsprogs)")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        done = subprocess.run([tool, "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1", path],
                              capture_output=True, text=True, timeout=MKFS_TIMEOUT_S)
        if done.returncode != 0:
            raise OSError(f"mkfs.ext4 failed: {done.stderr.strip()[-300:]}")
    except BaseException:  # a failure or a timeout: no half-made image left behind
        os.unlink(path)
        raise


def mount_image(image: str, target: str, uid: int | None, gid: int | None) -> None:
    """Mount ``image`` on ``target`` through a loop device, in this process's mount namespace
    (the sandbox's; it must be private), owned by the cell's user, mode 0700."""
    tool = shutil.which("mount") or "/bin/mount"
    # -n: not a line in a host's /etc/mtab (where that is still a file); discard: what the cell
    # deletes is given back to the host's disk (the image's blocks are freed again).
    done = subprocess.run([tool, "-n", "-t", "ext4", "-o", "loop,nosuid,nodev,discard", image, target],
                          capture_output=True, text=True, timeout=MKFS_TIMEOUT_S)
    if done.returncode != 0:
        raise OSError(f"cannot mount the session's disk: {done.stderr.strip()[-300:] or done.returncode}")
    try:
        os.rmdir(os.path.join(target, "lost+found"))  # the cell's HOME starts empty, as before
    except OSError:
        pass
    if uid is not None:
        os.chown(target, uid, gid if gid is not None else uid)
    os.chmod(target, 0o700)


def probe(root: str) -> str | None:
    """Whether sandboxes here can get a disk of their own (None) or why not: a small image made
    and mounted once, in a throwaway mount namespace, when a root agent starts."""
    if mkfs() is None:
        return "mkfs.ext4 not found (Debian: apt install e2fsprogs)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control)"
    work = tempfile.mkdtemp(prefix=".disk-probe-", dir=root)
    try:
        image = os.path.join(work, "probe.img")
        make_image(image, PROBE_SIZE)
        os.mkdir(os.path.join(work, "mnt"))
        done = subprocess.run([sys.executable, "-m", "gpu_attach_server.agent.jail", "--probe-disk", image,
                               os.path.join(work, "mnt")], capture_output=True, text=True, timeout=60)
        return None if done.returncode == 0 else (done.stderr.strip() or f"exit code {done.returncode}")[-300:]
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)[-300:]
    finally:
        shutil.rmtree(work, ignore_errors=True)
