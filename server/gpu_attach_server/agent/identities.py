"""Which unprivileged uid runs a broker user's cells on this host.

Each broker user (a JupyterHub user name, where that is the identity) gets a uid of its own, so
the kernel keeps users as separate as it keeps the users of one Linux host: one user's cell cannot
read another's files or memory, nor signal another's processes or the agent. Uids come from an
explicit map (``{"alice": 1001}``: the users' real accounts, for a shared home) or else from a
configured range; a range assignment is kept in the agent's state directory, so a user keeps the
same uid across agent restarts. No /etc/passwd entry is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

USER_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")


class IdentityError(RuntimeError):
    pass


def parse_range(text: str) -> range:
    """``"60000-60999"`` -> ``range(60000, 61000)``."""
    lo, sep, hi = text.partition("-")
    if not sep or not lo.isdigit() or not hi.isdigit() or int(lo) > int(hi):
        raise ValueError(f"uid range {text!r} must look like FIRST-LAST, e.g. 60000-60999")
    first, last = int(lo), int(hi)
    if first < 1000:
        raise ValueError(f"uid range {text!r} starts below 1000: it would overlap system accounts")
    return range(first, last + 1)


class UserIds:
    """Broker user name -> (uid, gid) for that user's sandboxes (gid = uid, no supplementary groups)."""

    def __init__(self, uid_range: range, state_file: Path | None = None, fixed: dict[str, int] | None = None):
        self.range = uid_range
        self.fixed = dict(fixed or {})
        for user, uid in self.fixed.items():
            if int(uid) == 0:
                raise ValueError(f"user {user!r} is mapped to uid 0: cells never run as root")
        self._file = state_file
        self._lock = threading.Lock()
        self._assigned: dict[str, int] = {}
        if state_file is not None and state_file.exists():
            try:
                self._assigned = {k: int(v) for k, v in json.loads(state_file.read_text()).items()
                                  if int(v) in uid_range}
            except (ValueError, AttributeError):
                self._assigned = {}

    def uid_for(self, user: str) -> int:
        if not USER_NAME.match(user or ""):
            raise IdentityError(f"user name {user!r} cannot be mapped to a uid")
        if user in self.fixed:
            return int(self.fixed[user])
        with self._lock:
            uid = self._assigned.get(user)
            if uid is not None:
                return uid
            taken = set(self._assigned.values()) | {int(u) for u in self.fixed.values()}
            if len(taken & set(self.range)) >= len(self.range):
                raise IdentityError(f"the uid range {self.range.start}-{self.range.stop - 1} is used up by "
                                    f"{len(self._assigned)} users: configure a larger --sandbox-uids range")
            # Start from a hash of the name (stable without the state file), probe on collision.
            start = int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "big") % len(self.range)
            for i in range(len(self.range)):
                uid = self.range[(start + i) % len(self.range)]
                if uid not in taken:
                    break
            self._assigned[user] = uid
            self._save()
            return uid

    def _save(self) -> None:
        if self._file is None:
            return
        tmp = self._file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._assigned, f)
        os.replace(tmp, self._file)
