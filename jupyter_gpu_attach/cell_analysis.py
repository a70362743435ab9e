"""Which names a cell reads from the notebook, and which it binds or deletes.

From the cell's symbol table: a name the cell's top level refers to, or that a function or
class defined in the cell uses as a global, is read; a name assigned, imported or defined at
top level (or declared ``global`` and assigned in a function) is bound. The notebook's
namespace is never shipped whole: only what the cell reads travels, so an object the cell does
not use cannot get in the way.
"""

from __future__ import annotations

import ast
import functools
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


@functools.lru_cache(maxsize=512)
def analyse(source: str, filename: str = "<gpu-cell>") -> CellNames:
    """Raise SyntaxError for a cell that does not parse, else return its names.

    Cached by source: a notebook re-runs the same cells, and parsing costs more than the rest
    of a trivial cell's client side."""
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
    deletes: set[str] = set()
    for node in _top_level_nodes(tree):
        if isinstance(node, ast.Delete):
            deletes.update(_target_names(node.targets))
        elif isinstance(node, ast.AugAssign):
            # symtable marks `x += 1` as an assignment only, but it reads x first.
            reads.update(_target_names([node.target]))
    for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        declared = {name for n in ast.walk(fn) if isinstance(n, ast.Global) for name in n.names}
        for n in ast.walk(fn):
            if isinstance(n, ast.AugAssign):
                reads.update(declared & _target_names([n.target]))
    # `del x` needs x in the sandbox to delete it there.
    return CellNames(frozenset(reads | deletes), frozenset(binds | deletes), frozenset(deletes))


def _top_level_nodes(tree: ast.Module):
    """Every node that runs in the cell's own scope: not inside a function, lambda or class body."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        stack.extend(ast.iter_child_nodes(node))


def _target_names(targets) -> set[str]:
    names: set[str] = set()
    for t in targets:
        if isinstance(t, ast.Name):
            names.add(t.id)
        elif isinstance(t, (ast.Tuple, ast.List)):
            names |= _target_names(t.elts)
        elif isinstance(t, ast.Starred):
            names |= _target_names([t.value])
    return names


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
