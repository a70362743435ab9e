"""The sandbox's launcher: join the sandbox's cgroup, enter a private mount namespace, then exec.

Run by a root agent as ``python -m gpu_attach_server.agent.jail`` with ``GPU_ATTACH_JAIL`` (JSON)
in its environment; it replaces itself with the sandbox process (same pid, so the sandbox's
parent-death signal still names the agent). Before any user code exists it:

- writes its own pid into the sandbox's cgroup(s), so everything the cell ever starts is in it;
- enters a new mount namespace (private propagation) with a fresh tmpfs on ``/tmp`` and
  ``/dev/shm``: a cell's temporary files are its own, and it sees no other user's;
- masks directories an unprivileged uid could not read anyway (``/root`` of a root agent, the
  agent's state directory) with empty tmpfs, then binds back only the interpreter and library
  paths the sandbox needs to run (a venv under ``/root`` then still works after ``setuid``);
- mounts a ``/proc`` of its own with ``hidepid=invisible``: once the sandbox runs as its user's
  uid, it sees only that uid's processes, not the agent's or other users' (their command lines,
  their ``/proc/PID`` at all). Kernels before 5.8 share one set of proc options per pid namespace,
  so this would hide processes on the host too; there, and where the mount is refused (a user
  namespace with masked /proc paths), ``/proc`` is left as it is, and the agent says so
  (:func:`probe_private_proc`).

The uid change itself happens in the sandbox when it is claimed for a user.
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source or fstype} on {target}")


def _tmpfs(target: str, mode: str) -> None:
    _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode},size=50%")


def _hidden_ancestor(path: str) -> str | None:
    """The top-most ancestor of ``path`` that others cannot search (so an unprivileged uid could
    not reach ``path``), or None."""
    parts = os.path.abspath(path).split("/")[1:]
    cur = ""
    for part in parts[:-1]:
        cur += "/" + part
        try:
            st = os.stat(cur)
        except OSError:
            return None
        if not st.st_mode & stat.S_IXOTH:
            return cur
    return None


def private_proc_supported(release: str | None = None) -> bool:
    """Whether a ``/proc`` mounted in the sandbox's mount namespace gets options of its own
    (Linux 5.8 and later: one proc instance per mount)."""
    release = release or os.uname().release
    try:
        major, minor = (int(x) for x in release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8)


def probe_private_proc() -> str | None:
    """Whether this host lets the jail mount a /proc of its own (None) or why not: tried in a
    throwaway process, once, when a root agent starts. A user namespace whose /proc has masked
    paths (rootless podman, LXC) refuses the mount; there /proc is left as it is."""
    if not private_proc_supported():
        return f"Linux {os.uname().release} shares proc options with the host (5.8 or later needed)"
    import subprocess

    try:
        done = subprocess.run([sys.executable, "-m", "gpu_attach_server.agent.jail", "--probe-proc"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    return None if done.returncode == 0 else (done.stderr.strip() or f"exit code {done.returncode}")[-300:]


def _mount_private_proc() -> None:
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible")


def needed_paths() -> list[str]:
    """What the sandbox's interpreter reads: its executable, prefixes and import path."""
    paths = {os.path.dirname(os.path.realpath(sys.executable)), sys.prefix, sys.base_prefix, sys.exec_prefix,
             sys.base_exec_prefix}
    paths.update(p for p in sys.path if p and os.path.isdir(p))
    out = sorted({os.path.realpath(p) for p in paths} | {os.path.abspath(p) for p in paths})
    # Only the outermost of nested paths needs binding.
    return [p for p in out if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in out)]


def enter(config: dict) -> None:
    for procs in config.get("cgroup_procs", []):
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    # An IPC namespace too: System V shared memory, semaphores and message queues outlive the
    # process that made them; in a namespace of the sandbox's own they go when the sandbox does.
    _private_namespace(CLONE_NEWNS | CLONE_NEWIPC)
    keep = [p for p in config.get("keep", []) + config.get("needed", []) if os.path.exists(p)]
    # Open what is bound back before anything is covered: after a mount, the path shows the tmpfs.
    fds = {p: os.open(p, os.O_PATH) for p in keep}
    covers = set()
    for p in config.get("hide", []):
        if os.path.isdir(p):
            covers.add(os.path.abspath(p))
    for p in keep:
        a = _hidden_ancestor(p)
        if a is not None:
            covers.add(a)
    covers = {c for c in covers if not any(c != d and c.startswith(d + "/") for d in covers)}
    for c in sorted(covers):
        _tmpfs(c, "0755")
    if config.get("private_tmp", True):
        _tmpfs("/tmp", "1777")
        # The host's other world-writable places: a cell filling them would fill the host's disk.
        for shared in ("/dev/shm", "/var/tmp", "/run/lock"):
            if os.path.isdir(shared) and not os.path.islink(shared):
                _tmpfs(shared, "1777")
    hidden = set(os.path.abspath(h) for h in config.get("hide", []))
    for p, fd in fds.items():
        ap = os.path.abspath(p)
        covered = any(ap == c or ap.startswith(c + "/") for c in covers) or ap.startswith("/tmp/") \
            or ap.startswith(("/dev/shm/", "/var/tmp/", "/run/lock/"))
        if not covered or any(ap == h or ap.startswith(h + "/") for h in hidden):
            continue
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(ap, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(ap), exist_ok=True)
            open(ap, "a").close()
        _mount(f"/proc/self/fd/{fd}", ap, None, MS_BIND | MS_REC)
    for fd in fds.values():
        os.close(fd)
    # Last: the binds above name their sources through the host's /proc/self/fd.
    if config.get("private_proc"):  # the agent probed it (probe_private_proc)
        _mount_private_proc()


def _private_namespace(flags: int = CLONE_NEWNS) -> None:
    _check(_libc.unshare(flags), "unshare(CLONE_NEWNS | CLONE_NEWIPC)" if flags & CLONE_NEWIPC else "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks back to the host


def _probe_disk(image: str, target: str) -> None:
    from .disk import mount_image

    mount_image(image, target, None, None)
    with open(os.path.join(target, "probe"), "wb") as f:
        f.write(b"x")


def _probe(what) -> None:
    """Try ``what`` in a mount namespace of this throwaway process's own; exit 0 if it worked."""
    try:
        _private_namespace()
        what()
    except OSError as e:
        print(e, file=sys.stderr)
        os._exit(1)
    os._exit(0)


def main() -> None:
    if sys.argv[1:] == ["--probe-proc"]:
        _probe(_mount_private_proc)
    if sys.argv[1:2] == ["--probe-disk"] and len(sys.argv) == 4:
        _probe(lambda: _probe_disk(sys.argv[2], sys.argv[3]))
    config = json.loads(os.environ.pop("GPU_ATTACH_JAIL"))
    try:
        enter(config)
    except OSError as e:
        print(f"gpu-attach jail: cannot isolate the sandbox: {e}", file=sys.stderr, flush=True)
        os._exit(71)
    argv = config["exec"]
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
