"""Which names a cell reads from the notebook, and which it binds or deletes.

From the cell's symbol table: a name the cell's top level refers to, or that a function or
class defined in the cell uses as a global, is read; a name assigned, imported or defined at
top level (or declared ``global`` and assigned in a function) is bound. The notebook's
namespace is never shipped whole: only what the cell reads travels, so an object the cell does
not use cannot get in the way.
"""

from __future__ import annotations

import ast
import re
import symtable
from dataclasses import dataclass

# Names IPython puts in the user namespace that a remote cell never needs.
_IPYTHON_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "_ih", "_oh", "_dh", "_sh"})
_IPYTHON_HISTORY = re.compile(r"^_+$|^_i+\d*$|^_\d+$")


@dataclass(frozen=True)
class CellNames:
    reads: frozenset[str]
    binds: frozenset[str]
    deletes: frozenset[str]


def analyse(source: str, filename: str = "<gpu-cell>") -> CellNames:
    """Raise SyntaxError for a cell that does not parse, else return its names."""
    tree = ast.parse(source, filename=filename)
    table = symtable.symtable(source, filename, "exec")
    reads: set[str] = set()
    binds: set[str] = set()
    for sym in table.get_symbols():
        if sym.is_referenced():
            reads.add(sym.get_name())
        if sym.is_assigned() or sym.is_imported() or sym.is_namespace():
            binds.add(sym.get_name())
    _nested(table, reads, binds)
    deletes = {
        t.id
        for node in tree.body
        if isinstance(node, ast.Delete)
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    # `del x` needs x in the sandbox to delete it there.
    return CellNames(frozenset(reads | deletes), frozenset(binds | deletes), frozenset(deletes))


def _nested(table: symtable.SymbolTable, reads: set[str], binds: set[str]) -> None:
    for child in table.get_children():
        for sym in child.get_symbols():
            if sym.is_global() and sym.is_referenced():
                reads.add(sym.get_name())
            if sym.is_declared_global() and sym.is_assigned():
                binds.add(sym.get_name())
        _nested(child, reads, binds)


def is_shippable_name(name: str) -> bool:
    """False for dunders and IPython's own history names."""
    if name.startswith("__") and name.endswith("__"):
        return False
    return name not in _IPYTHON_NAMES and not _IPYTHON_HISTORY.match(name)
