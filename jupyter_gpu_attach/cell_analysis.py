"""Which names a cell reads from the notebook, and which it binds or deletes.

The cell is first put through IPython's own input transformer (``%timeit x``, ``!ls $d``,
``%%timeit`` bodies become Python), then read through its symbol table: a name the cell's top
level refers to, or that a function or class defined in the cell uses as a global, is read; a name
assigned, imported or defined at top level (or declared ``global`` and assigned in a function) is
bound. Code inside magic arguments (``%timeit np.dot(a, b)``) and ``$name`` / ``{expr}`` in shell
commands is read too. The notebook's namespace is never shipped whole: only what the cell reads
travels, so an object the cell does not use cannot get in the way.
"""

from __future__ import annotations

import ast
import functools
import re
import symtable
import types
from dataclasses import dataclass, field
from typing import Any, Mapping

# Names IPython puts in the user namespace that a remote cell never needs.
_IPYTHON_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "_ih", "_oh", "_dh", "_sh", "_exit_code"})
_IPYTHON_HISTORY = re.compile(r"^_+$|^_i+\d*$|^_\d+$")
_SHELL_VARS = re.compile(r"\$\$?([A-Za-z_]\w*)|\{([^{}]+)\}")
_MAGIC_CALLS = {"run_line_magic", "run_cell_magic", "system", "getoutput"}


@dataclass(frozen=True)
class CellNames:
    reads: frozenset[str]
    binds: frozenset[str]
    deletes: frozenset[str]
    python: str = field(default="", compare=False)  # the cell as Python, after IPython's transformation
    #: Names the cell only reads without changing, each with the names its calls go through (a
    #: call ``np.dot(a, b)`` leaves ``a`` alone if ``np`` is a module); see :func:`_pure_reads`.
    pure: tuple = field(default=(), compare=False)


def transform(source: str) -> str:
    """The cell as IPython would compile it (magics and shell escapes become calls)."""
    from IPython.core.inputtransformer2 import TransformerManager

    return _transformer(TransformerManager).transform_cell(source)


@functools.lru_cache(maxsize=1)
def _transformer(cls):
    return cls()


@functools.lru_cache(maxsize=512)
def analyse(source: str, filename: str = "<gpu-cell>") -> CellNames:
    """Raise SyntaxError for a cell that does not parse, else return its names.

    Cached by source: a notebook re-runs the same cells, and parsing costs more than the rest
    of a trivial cell's client side."""
    python = transform(source)
    tree = ast.parse(python, filename=filename)
    table = symtable.symtable(python, filename, "exec")
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
    magic = _magic_reads(tree)
    reads |= magic
    pure = tuple(sorted((n, frozenset(c)) for n, c in _pure_reads(tree).items() if n not in magic | binds | deletes))
    # `del x` needs x in the sandbox to delete it there.
    return CellNames(frozenset(reads | deletes), frozenset(binds | deletes), frozenset(deletes), python, pure)


#: Attributes and methods of an array that read it without changing it.
_READING_ATTRS = frozenset({
    "shape", "dtype", "size", "ndim", "nbytes", "itemsize", "T", "real", "imag", "flat", "strides", "base",
    "sum", "mean", "std", "var", "min", "max", "argmin", "argmax", "any", "all", "copy", "astype", "reshape",
    "ravel", "flatten", "tolist", "item", "nonzero", "cumsum", "cumprod", "prod", "round", "dot", "transpose",
    "squeeze", "clip", "conj", "trace", "diagonal", "ptp", "view", "tobytes", "get", "compress", "take",
    "repeat", "searchsorted", "argsort", "swapaxes", "__array__"})
#: Module functions that write into an argument (besides any call with ``out=``).
_WRITING_FUNCS = frozenset({"shuffle", "copyto", "put", "place", "putmask", "fill_diagonal", "put_along_axis",
                            "setdiag", "seed", "at"})
_READING_BUILTINS = frozenset({"print", "len", "repr", "str", "float", "int", "bool", "type", "isinstance",
                               "abs", "round", "min", "max", "sum", "hash", "id", "format", "complex"})


def _pure_reads(tree: ast.Module) -> dict[str, set[str]]:
    """Names whose every use in the cell only reads them, each with the names its calls go through.

    Used to skip re-hashing a large input after the cell to see whether it changed in place: only
    for arrays, and the sandbox still checks whether the cell bound a view of one. Conservative:
    any use not in a known reading position (a method not known to read, a call through anything
    but a module, iteration, a container, a nested function) makes the name one to check."""
    parents: dict[int, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[id(child)] = node
    nested: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            nested.update(id(n) for n in ast.walk(node) if n is not node)
    verdict: dict[str, set[str] | None] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)):
            continue
        roots = None if id(node) in nested else _reading_use(node, parents)
        if roots is None or verdict.get(node.id, set()) is None:
            verdict[node.id] = None
        else:
            verdict.setdefault(node.id, set()).update(roots)
    return {n: r for n, r in verdict.items() if r is not None}


def _reading_use(name: ast.Name, parents: dict[int, ast.AST]) -> set[str] | None:
    node: ast.AST = name
    while True:  # up through a.x, a[i], a.sum() ...
        p = parents.get(id(node))
        if isinstance(p, ast.Subscript) and p.value is node and isinstance(p.ctx, ast.Load):
            node = p
        elif isinstance(p, ast.Attribute) and p.value is node and isinstance(p.ctx, ast.Load) \
                and p.attr in _READING_ATTRS:
            call = parents.get(id(p))
            if isinstance(call, ast.Call) and call.func is p:
                if any(k.arg == "out" for k in call.keywords):
                    return None
                node = call
            else:
                node = p
        else:
            break
    p = parents.get(id(node))
    if isinstance(p, ast.Subscript) and p.slice is node:
        return set()
    if isinstance(p, (ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.FormattedValue, ast.Expr)):
        return set()
    if isinstance(p, (ast.Assign, ast.AnnAssign)) and p.value is node:
        return set()
    if isinstance(p, ast.keyword):
        p = parents.get(id(p))
    if isinstance(p, ast.Call) and p.func is not node:
        if any(k.arg == "out" for k in p.keywords):
            return None
        if isinstance(p.func, ast.Name) and p.func.id in _READING_BUILTINS:
            return {p.func.id}  # a builtin, unless the notebook shadows it
        chain = p.func
        if isinstance(chain, ast.Attribute) and chain.attr in _WRITING_FUNCS:
            return None
        while isinstance(chain, ast.Attribute):
            chain = chain.value
        if isinstance(chain, ast.Name) and chain is not p.func:
            return {chain.id}  # np.dot(a): reads a if np is a module
        return None
    return None


def _magic_reads(tree: ast.Module) -> set[str]:
    """Names read by code that IPython keeps in strings: magic arguments and shell commands."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in _MAGIC_CALLS):
            continue
        for arg in node.args:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names |= _code_names(arg.value)
    return names


def _code_names(text: str) -> set[str]:
    """Names in a magic's argument text: every whitespace-suffix that parses as Python counts (the
    leading words may be options such as ``-n 10``), and ``$x`` / ``{expr}`` expansions."""
    names: set[str] = set()
    for m in _SHELL_VARS.finditer(text):
        names |= _parse_names(m.group(1) or m.group(2) or "")
    lines = text.splitlines() or [""]
    body = "\n".join(lines[1:])
    if body.strip():
        names |= _parse_names(body)  # a cell magic's body (%%timeit's statement)
    words = lines[0].split(" ")
    for i in range(len(words)):
        names |= _parse_names(" ".join(words[i:]))
    return names


@functools.lru_cache(maxsize=1024)
def _parse_names(text: str) -> frozenset[str]:
    try:
        tree = ast.parse(text.strip())
    except (SyntaxError, ValueError):
        return frozenset()
    return frozenset(n.id for n in ast.walk(tree) if isinstance(n, ast.Name))


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


def pure_names(names: CellNames, namespace: Mapping[str, Any]) -> set[str]:
    """The cell's read-only uses that hold for this namespace: the calls they go through are to
    modules (``np.dot``) or to builtins the notebook does not shadow."""
    out = set()
    for name, through in names.pure:
        if all(isinstance(namespace.get(r), types.ModuleType) if r in namespace else r in _READING_BUILTINS
               for r in through):
            out.add(name)
    return out


def globals_used(names: set[str], namespace: Mapping[str, Any]) -> set[str]:
    """``names`` plus every global that the notebook functions and classes among them use, and so
    on: a function defined in an earlier cell reads the notebook's current values when called."""
    seen: set[str] = set()
    todo = [n for n in names if n in namespace]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for g in _code_globals(namespace[name]):
            if g in namespace and g not in seen:
                todo.append(g)
    return seen | set(names)


def _code_globals(value: Any) -> set[str]:
    codes: list[types.CodeType] = []
    if isinstance(value, types.FunctionType) and value.__module__ == "__main__":
        codes.append(value.__code__)
    elif isinstance(value, type) and value.__module__ == "__main__":
        for attr in vars(value).values():
            fn = getattr(attr, "__func__", attr)
            if isinstance(fn, types.FunctionType):
                codes.append(fn.__code__)
    out: set[str] = set()
    while codes:
        code = codes.pop()
        out.update(code.co_names)
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return out


def is_shippable_name(name: str) -> bool:
    """False for dunders and IPython's own history names."""
    if name.startswith("__") and name.endswith("__"):
        return False
    return name not in _IPYTHON_NAMES and not _IPYTHON_HISTORY.match(name)
