"""Keeping the notebook's namespace and its sandbox's in step, by content hash.

The sandbox keeps the session's namespace between cells. For each cell the notebook sends only
the names the cell reads whose content the sandbox does not already hold, and takes back the
names the cell bound, created, deleted or changed in place. Names whose values cannot travel
stay in the sandbox; the session knows which, and says so when they are lost. No IPython here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, MutableMapping

from . import wire
from .cell_analysis import CellNames, globals_used, is_shippable_name, pure_names
from .errors import InputError, RemoteStateLost


@dataclass
class CellInputs:
    """What one cell sends: the run frame's input fields and the values to pickle together."""

    header: dict
    values: dict[str, Any]
    hashes: dict[str, str]
    failures: dict[str, str] = field(default_factory=dict)


def _plain_array(value: Any) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and type(value) is np.ndarray and not value.dtype.hasobject


class RemoteNamespace:
    """The notebook's view of its sandbox's namespace."""

    def __init__(self):
        self.synced: dict[str, str] = {}  # name -> content hash that the sandbox holds as well
        self.remote_only: dict[str, str] = {}  # name -> why it stays in the sandbox
        self.lost: dict[str, str] = {}  # name -> where it lived, for objects whose sandbox ended
        self.sandbox: str | None = None  # the instance that holds the above
        self.agent: str | None = None

    def forget(self) -> list[str]:
        """The sandbox was replaced: what it held is gone. Returns the names that lived only there."""
        gone = sorted(self.remote_only)
        for name in gone:
            self.lost[name] = f"the session's sandbox on agent {self.agent}"
        self.synced.clear()
        self.remote_only.clear()
        self.sandbox = None
        return gone

    def plan(self, names: CellNames, namespace: MutableMapping[str, Any]) -> CellInputs:
        """Decide what the cell must send, hashing the values it reads."""
        reads = {n for n in globals_used(set(names.reads), namespace) if is_shippable_name(n)}
        lost = sorted(n for n in reads if n not in namespace and n in self.lost and n not in names.binds)
        if lost:
            raise RemoteStateLost(
                f"{', '.join(lost)} lived only in {self.lost[lost[0]]}, which has ended since (idle too long, its "
                "agent restarted, or the cell ran on another host, or on other GPUs once a GPU library was loaded "
                "there). Re-run the cells that made them.")
        present = {n: namespace[n] for n in reads if n in namespace}
        plain, modules = wire.split_modules(present)
        hashes, failures = wire.fingerprints(plain, namespace)
        for name, why in failures.items():
            if name in names.reads and name not in names.binds:
                raise InputError(f"cannot send {name!r} to the GPU: {why}. Compute it inside a %%gpu cell (it then "
                                 "stays on the GPU host for later %%gpu cells), or convert it to something "
                                 "picklable (arrays, lists, dicts, dataframes) first.")
        send = {n for n, h in hashes.items() if self.synced.get(n) != h}
        # Names that are one object here travel together, so they are one object there too.
        by_id: dict[int, set[str]] = {}
        for n in hashes:
            by_id.setdefault(id(plain[n]), set()).add(n)
        for group in by_id.values():
            if len(group) > 1 and group & send:
                send |= group
        cached = {n: hashes[n] for n in hashes if n not in send}
        absent = sorted(n for n in reads if n not in namespace and n not in self.remote_only)
        expect = sorted(n for n in reads if n not in namespace and n in self.remote_only)
        # Arrays the cell only reads need no hashing afterwards to see if they changed in place
        # (unless the cell made a view of one: the sandbox checks for that).
        pure = {n for n in pure_names(names, namespace) & set(hashes) if _plain_array(plain[n])}
        header = {"modules": modules, "hashes": {n: hashes[n] for n in send}, "cached": cached,
                  "absent": absent, "expect": expect, "bound": sorted(names.binds),
                  "watch": sorted((set(hashes) - pure) | set(expect)), "pure": sorted(pure)}
        return CellInputs(header, {n: plain[n] for n in sorted(send)}, hashes, failures)

    def sent(self, inputs: CellInputs) -> None:
        for n in inputs.header["hashes"]:
            self.synced[n] = inputs.hashes[n]
            self.remote_only.pop(n, None)
        for n in inputs.header["absent"]:
            self.synced.pop(n, None)

    def apply(self, header: dict, values: dict[str, Any], namespace: MutableMapping[str, Any],
              load_failures: dict[str, str]) -> list[str]:
        """Bring the cell's results into the notebook; returns the names bound here."""
        modules = wire.load_modules(header.get("modules") or {}, load_failures)
        stays = dict(header.get("remote") or {})
        stays.update(load_failures)
        replaced: dict[int, Any] = {}
        for name in header.get("inplace") or []:  # changed in place there: its other names here follow
            old = namespace.get(name)
            if name in values and old is not None and old is not values[name]:
                replaced[id(old)] = values[name]
        for name in list(values) + list(modules) + list(header.get("remote") or {}):
            self.lost.pop(name, None)
        for name, value in values.items():
            namespace[name] = value
            digest = (header.get("hashes") or {}).get(name)
            if digest:
                self.synced[name] = digest
            self.remote_only.pop(name, None)
        for name, value in modules.items():
            namespace[name] = value
            self.synced.pop(name, None)
            self.remote_only.pop(name, None)
        # b = a here, a[0] = 7 there: b is a here still.
        if replaced:
            for name, value in list(namespace.items()):
                new = replaced.get(id(value))
                if new is not None and name not in values and is_shippable_name(name):
                    namespace[name] = new
                    self.synced.pop(name, None)
        for name, why in stays.items():
            self.remote_only[name] = why
            self.synced.pop(name, None)
            namespace.pop(name, None)
        for name in header.get("deleted") or []:
            namespace.pop(name, None)
            self.synced.pop(name, None)
            self.remote_only.pop(name, None)
        return sorted(set(values) | set(modules))
