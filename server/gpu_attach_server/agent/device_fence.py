"""Which GPUs a sandbox can open: the kernel's device cgroup, not an environment variable.

``CUDA_VISIBLE_DEVICES`` only asks CUDA to enumerate some GPUs; a cell that clears it before
CUDA starts, or opens ``/dev/nvidiaN`` itself, would reach every GPU on the host, other users'
slices included. The fence makes the kernel refuse ``open()`` of every NVIDIA GPU node
(character major 195, minors 0-253) except the minors of the devices the sandbox is pinned to.
``/dev/nvidiactl`` (195:255), ``/dev/nvidia-modeset`` (195:254), ``/dev/nvidia-uvm`` (a major
of its own) and every other device stay as they were: CUDA needs them, and they reach no GPU's
memory by themselves.

- cgroup v2: a ``BPF_PROG_TYPE_CGROUP_DEVICE`` program attached to the sandbox's cgroup with
  ``BPF_F_ALLOW_MULTI``, so a policy its parents have (systemd's ``DevicePolicy``, a container
  runtime's) still applies as well. Re-pinning attaches the new program before it detaches the
  old one: in between, both must allow, which is never more than either.
- cgroup v1: the ``devices`` hierarchy, one ``devices.deny`` entry per fenced minor (in a
  default-allow cgroup an ``allow`` only removes a ``deny`` entry that matches exactly, so a
  wildcard deny could not be opened up again for the pinned minors).

The check happens at ``open()``: a file descriptor opened before a re-pin is not closed by it,
nor is device memory mapped through one. So before each cell the agent looks for GPU nodes the
sandbox's processes hold (:func:`held_minors`) and replaces a sandbox that holds one outside the
cell's lease (``Agent._may_run_on``). A sandbox starts fenced from every GPU until a cell is
admitted on it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import stat
import struct
import sys
from pathlib import Path
from typing import Iterable

#: The NVIDIA driver's character major: /dev/nvidia0.. are minors 0.., nvidiactl is 255.
NVIDIA_MAJOR = 195
#: Minors from here on are the driver's control nodes (254 nvidia-modeset, 255 nvidiactl).
FIRST_CONTROL_MINOR = 254

# Little-endian machines only: the instructions and attributes are packed little-endian.
_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "ppc64le": 361}
_BPF_PROG_LOAD, _BPF_PROG_ATTACH, _BPF_PROG_DETACH = 5, 8, 9
_BPF_PROG_TYPE_CGROUP_DEVICE = 15
_BPF_CGROUP_DEVICE = 6
_BPF_F_ALLOW_MULTI = 2
_BPF_DEVCG_DEV_CHAR = 2


class FenceError(OSError):
    pass


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def device_program(allowed_minors: Iterable[int]) -> bytes:
    """The eBPF program: deny a character device of major 195 with a minor below 254 that is not
    in ``allowed_minors``; allow everything else. ``ctx`` is ``struct bpf_cgroup_dev_ctx``
    (``access_type`` with the device type in its low 16 bits, ``major``, ``minor``)."""
    allowed = sorted(set(int(m) for m in allowed_minors))
    checks = [m for m in allowed if 0 <= m < FIRST_CONTROL_MINOR]
    ldx_w, and_k, mov_k, exit_ = 0x61, 0x57, 0xB7, 0x95
    jne_k, jeq_k, jge_k = 0x55, 0x15, 0x35
    head = [
        _insn(ldx_w, dst=2, src=1, off=0),  # r2 = ctx->access_type
        _insn(and_k, dst=2, imm=0xFFFF),  # r2 = the device type
        _insn(ldx_w, dst=3, src=1, off=4),  # r3 = ctx->major
        _insn(ldx_w, dst=4, src=1, off=8),  # r4 = ctx->minor
    ]
    # Each test jumps forward to the "allow" tail; the offset counts from the next instruction.
    tests = [(jne_k, 2, _BPF_DEVCG_DEV_CHAR), (jne_k, 3, NVIDIA_MAJOR), (jge_k, 4, FIRST_CONTROL_MINOR)]
    tests += [(jeq_k, 4, m) for m in checks]
    body = []
    for i, (code, reg, imm) in enumerate(tests):
        to_deny = len(tests) - i - 1  # tests left after this one
        body.append(_insn(code, dst=reg, off=to_deny + 2, imm=imm))  # + the two deny instructions
    tail = [_insn(mov_k, dst=0, imm=0), _insn(exit_), _insn(mov_k, dst=0, imm=1), _insn(exit_)]
    return b"".join(head + body + tail)


def _bpf(cmd: int, attr: bytes) -> int:
    number = _BPF_SYSCALL.get(platform.machine())
    if number is None or sys.byteorder != "little":
        raise FenceError(errno.ENOSYS, f"no bpf() syscall number known for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    buf = ctypes.create_string_buffer(attr, len(attr))
    ret = libc.syscall(ctypes.c_long(number), ctypes.c_int(cmd), buf, ctypes.c_uint(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise FenceError(err, f"bpf({cmd}): {os.strerror(err)}")
    return ret


def load_program(allowed_minors: Iterable[int]) -> int:
    """Load the program into the kernel; its file descriptor (the caller closes it)."""
    code = device_program(allowed_minors)
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")

    def load(log_level: int, log) -> int:
        attr = struct.pack("<IIQQIIQII16sII", _BPF_PROG_TYPE_CGROUP_DEVICE, len(code) // 8,
                           ctypes.addressof(insns), ctypes.addressof(license_), log_level,
                           len(log) if log is not None else 0, ctypes.addressof(log) if log is not None else 0,
                           0, 0, b"gpu_attach_dev", 0, _BPF_CGROUP_DEVICE)
        return _bpf(_BPF_PROG_LOAD, attr)

    try:
        # No verifier log unless it fails: a log that fills its buffer fails the load (ENOSPC).
        return load(0, None)
    except FenceError as e:
        log = ctypes.create_string_buffer(1 << 16)
        try:
            return load(1, log)  # once more, to say why
        except FenceError:
            pass
        verifier = log.value.decode(errors="replace").strip()[-2000:]
        raise FenceError(e.errno, f"{e.strerror}{': ' + verifier if verifier else ''}") from None


def _attach(cgroup_fd: int, prog_fd: int, detach: bool = False) -> None:
    flags = 0 if detach else _BPF_F_ALLOW_MULTI
    _bpf(_BPF_PROG_DETACH if detach else _BPF_PROG_ATTACH,
         struct.pack("<IIIII", cgroup_fd, prog_fd, _BPF_CGROUP_DEVICE, flags, 0))


class BpfFence:
    """The fence of one cgroup v2 directory: the program attached now, replaced at each pin."""

    def __init__(self, cgroup_dir: Path):
        self.dir = cgroup_dir
        self._prog: int | None = None

    def pin(self, minors: Iterable[int]) -> None:
        """Attach the program for ``minors``, then detach the last one. If the detach fails, both
        stay attached (the sandbox may open only what both allow) and this raises: the caller
        replaces the sandbox."""
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            new = load_program(minors)
            try:
                _attach(fd, new)
            except BaseException:
                os.close(new)
                raise
            old, self._prog = self._prog, new
            if old is not None:
                try:
                    _attach(fd, old, detach=True)
                finally:
                    os.close(old)  # attached or not, the cgroup holds what the kernel needs
        finally:
            os.close(fd)

    def close(self) -> None:
        """Forget the program (the kernel frees it with the cgroup)."""
        if self._prog is not None:
            os.close(self._prog)
            self._prog = None


class ListFence:
    """The fence of one cgroup v1 ``devices`` directory: a deny entry per fenced GPU minor.

    Only in a default-allow cgroup (``devices.list`` is ``a *:* rwm``): there a deny entry fences
    its device. Under a default-deny parent (a container's device list) a deny entry only removes
    an allow entry that matches it exactly, so it would fence nothing; the fence refuses to pin
    there, and the agent reports it as missing."""

    def __init__(self, cgroup_dir: Path):
        self.dir = cgroup_dir
        self._denied: set[int] | None = None

    def pin(self, minors: Iterable[int]) -> None:
        if self._denied is None:
            listed = (self.dir / "devices.list").read_text().split()
            if listed != ["a", "*:*", "rwm"]:
                raise FenceError(errno.EPERM, f"{self.dir} is not a default-allow devices cgroup (its list: "
                                              f"{' '.join(listed)[:200]}): deny entries would fence nothing")
        allowed = {int(m) for m in minors if 0 <= int(m) < FIRST_CONTROL_MINOR}
        deny = set(range(FIRST_CONTROL_MINOR)) - allowed
        before = self._denied if self._denied is not None else set()
        # Deny first, then open: in between the sandbox is fenced from more, never from less.
        with open(self.dir / "devices.deny", "w") as f:
            for m in sorted(deny - before):
                f.write(f"c {NVIDIA_MAJOR}:{m} rwm")
                f.flush()  # the kernel takes one entry per write
        with open(self.dir / "devices.allow", "w") as f:
            for m in sorted(allowed & before):
                f.write(f"c {NVIDIA_MAJOR}:{m} rwm")
                f.flush()
        self._denied = deny

    def close(self) -> None:
        pass


_NODE = re.compile(r"^/dev/nvidia(\d+)$")


def held_minors(pids: Iterable[int], major: int = NVIDIA_MAJOR, node: re.Pattern = _NODE) -> set[int]:
    """The GPU minors these processes hold open (a file descriptor on the node) or mapped (device
    memory stays mapped after its descriptor is closed). The fence checks at ``open()`` only, so
    a sandbox that holds a GPU it is no longer pinned to must be replaced, not re-pinned; this
    also finds a descriptor passed in from another process over a unix socket."""
    held: set[int] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == major:
                held.add(os.minor(st.st_rdev))
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) == 6:
                        m = node.match(parts[5].strip())
                        if m:
                            held.add(int(m.group(1)))
        except OSError:
            continue
    return {m for m in held if m < FIRST_CONTROL_MINOR}
