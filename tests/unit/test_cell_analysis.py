"""Unit tests for jupyter_gpu_attach.cell_analysis: which names a cell reads, binds and deletes."""

import textwrap

import pytest

from jupyter_gpu_attach.cell_analysis import CellNames, analyse, is_shippable_name


def names(src: str) -> CellNames:
    return analyse(textwrap.dedent(src))


def test_plain_reads():
    n = names("print(a + b)\nc.method(d[0])\n")
    assert {"print", "a", "b", "c", "d"} <= n.reads
    assert n.binds == frozenset()
    assert n.deletes == frozenset()


def test_assignment_binds_without_reading():
    n = names("y = 1\nz, w = 2, 3\n")
    assert n.binds == {"y", "z", "w"}
    assert not ({"y", "z", "w"} & n.reads)


def test_read_then_rebind_is_both():
    n = names("x = x + 1\n")
    assert "x" in n.reads and "x" in n.binds


def test_augmented_assignment_is_read_and_bound():
    n = names("total += step\n")
    assert {"total", "step"} <= n.reads
    assert n.binds == {"total"}


def test_attribute_and_subscript_assignment_read_the_object():
    n = names("obj.attr = 1\narr[0] = v\n")
    assert {"obj", "arr", "v"} <= n.reads
    assert not ({"obj", "arr"} & n.binds)


def test_imports_are_bound_not_read():
    n = names("import numpy as np\nimport os.path\nfrom math import sqrt, pi as PI\nimport json\n")
    assert n.binds == {"np", "os", "sqrt", "PI", "json"}
    assert not ({"np", "os", "sqrt", "PI", "json", "numpy", "math"} & n.reads)


def test_function_defined_in_cell_is_bound_and_its_globals_are_read():
    n = names(
        """
        def f(a, b=default_b):
            local = a * scale + offset
            return helper(local, b)
        """
    )
    assert "f" in n.binds
    # Globals the function body uses, and the default evaluated at definition, come from the notebook.
    assert {"scale", "offset", "helper", "default_b"} <= n.reads
    # Parameters and locals of the function are neither read nor bound in the notebook.
    assert not ({"a", "b", "local"} & n.reads)
    assert not ({"a", "b", "local"} & n.binds)


def test_function_local_shadowing_a_notebook_name_is_not_a_read():
    n = names(
        """
        def f():
            data = [1, 2, 3]
            return sum(data)
        """
    )
    assert "data" not in n.reads
    assert "data" not in n.binds
    assert "sum" in n.reads


def test_nested_function_free_variables_are_not_reads_but_globals_are():
    n = names(
        """
        def outer():
            x = 1
            def inner():
                return x + q
            return inner
        """
    )
    assert "q" in n.reads
    assert "x" not in n.reads
    assert n.binds == {"outer"}


def test_lambda_body_reads_globals():
    n = names("g = lambda t: t * factor\n")
    assert "factor" in n.reads
    assert "t" not in n.reads
    assert n.binds == {"g"}


def test_decorator_is_read():
    n = names(
        """
        @decorate
        def f():
            pass
        """
    )
    assert "decorate" in n.reads
    assert "f" in n.binds


def test_class_body():
    n = names(
        """
        class Model(Base):
            size = 3
            doubled = size * 2 + bias
            def forward(self, inp):
                return inp @ weights
        """
    )
    assert "Model" in n.binds
    assert {"Base", "bias", "weights"} <= n.reads
    # Class-body names are class attributes, not notebook names.
    assert not ({"size", "doubled", "forward", "self", "inp"} & n.reads)
    assert not ({"size", "doubled", "forward"} & n.binds)


def test_comprehension_variables_stay_local():
    n = names("squares = [v * v for v in values if v > threshold]\npairs = {k: w for k, w in items}\n")
    assert {"values", "threshold", "items"} <= n.reads
    assert not ({"v", "k", "w"} & n.reads)
    assert not ({"v", "k", "w"} & n.binds)
    assert n.binds == {"squares", "pairs"}


def test_generator_expression_reads_globals():
    n = names("s = sum(x * scale for x in xs)\n")
    assert {"sum", "scale", "xs"} <= n.reads
    assert "x" not in n.reads and "x" not in n.binds


def test_walrus_in_comprehension_binds_in_cell():
    n = names("r = [last := f(v) for v in data]\n")
    assert "last" in n.binds
    assert {"f", "data"} <= n.reads


def test_global_in_function_that_assigns_binds():
    n = names(
        """
        def bump():
            global counter
            counter += 1
        bump()
        """
    )
    assert "counter" in n.binds
    assert "counter" in n.reads
    assert "bump" in n.binds


def test_global_in_function_only_read_is_not_bound():
    n = names(
        """
        def peek():
            global counter
            return counter
        """
    )
    assert "counter" in n.reads
    assert "counter" not in n.binds


def test_for_loop_and_with_targets_are_bound():
    n = names(
        """
        for i in range(n):
            pass
        with open(path) as fh:
            pass
        """
    )
    assert {"i", "fh"} <= n.binds
    assert {"range", "n", "open", "path"} <= n.reads


def test_del_at_top_level_is_a_delete_and_a_bind():
    n = names("del x\n")
    assert n.deletes == {"x"}
    assert "x" in n.binds


def test_del_several_names():
    n = names("del a, b\n")
    assert n.deletes == {"a", "b"}


def test_del_attribute_or_item_is_not_a_delete_of_the_name():
    n = names("del obj.attr\ndel d['k']\n")
    assert n.deletes == frozenset()
    assert {"obj", "d"} <= n.reads


def test_del_inside_function_is_not_a_cell_delete():
    n = names(
        """
        def f():
            tmp = 1
            del tmp
        """
    )
    assert n.deletes == frozenset()
    assert "tmp" not in n.binds


def test_deleted_notebook_name_is_read_so_that_it_is_shipped():
    # The sandbox runs each cell in a fresh namespace holding only the shipped reads
    # (agent/sandbox.py: ns = {...}; ns.update(inputs)), so `del x` of a notebook variable can
    # only succeed remotely if `x` is shipped, i.e. if analyse() counts it as read.
    n = names("del x\n")
    assert "x" in n.reads


def test_del_in_a_nested_block_is_a_delete():
    # `del` under if/for/try at the cell's top level deletes a notebook name just as well.
    n = names(
        """
        if big:
            del x
        """
    )
    assert "x" in n.deletes


def test_del_of_a_parenthesised_tuple_is_a_delete():
    n = names("del (a, b)\n")
    assert n.deletes == {"a", "b"}


def test_syntax_error_raised():
    with pytest.raises(SyntaxError):
        analyse("def f(:\n    pass\n")


def test_syntax_error_carries_filename_and_line():
    with pytest.raises(SyntaxError) as e:
        analyse("x = 1\ny = (\n", filename="<cell-7>")
    assert e.value.filename == "<cell-7>"
    assert e.value.lineno is not None and e.value.lineno >= 2


def test_empty_cell():
    assert analyse("") == CellNames(frozenset(), frozenset(), frozenset())


def test_result_sets_are_frozen():
    n = names("a = b\n")
    assert isinstance(n.reads, frozenset)
    assert isinstance(n.binds, frozenset)
    assert isinstance(n.deletes, frozenset)


# -- is_shippable_name ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["In", "Out", "get_ipython", "exit", "quit", "_ih", "_oh", "_dh", "_sh",
     "_", "__", "___", "_i", "_ii", "_iii", "_i3", "_i42", "_5", "_123",
     "__name__", "__builtins__", "__doc__"],
)
def test_ipython_and_dunder_names_are_not_shipped(name):
    assert is_shippable_name(name) is False


@pytest.mark.parametrize(
    "name", ["_x", "_private", "x", "data", "_index", "_i_x", "_1a", "In_", "out", "_Out", "i3", "__x", "x__"]
)
def test_ordinary_names_are_shipped(name):
    assert is_shippable_name(name) is True


# -- read-only uses (inputs that need no re-hashing after the cell) -----------------------------

import numpy as _np  # noqa: E402

from jupyter_gpu_attach.cell_analysis import pure_names  # noqa: E402

_NS = {"np": _np, "a": _np.zeros(3), "b": _np.ones(3), "f": print}


@pytest.mark.parametrize("source, pure", [
    ("first = a[0]", {"a"}),
    ("s = float(a.sum())", {"a"}),
    ("y = np.dot(a, b)", {"a", "b", "np"}),
    ("print(a.shape, len(b))", {"a", "b"}),
    ("x = a.T", {"a"}),  # a view: the sandbox checks views of it after the cell
    ("a[0] = 1", set()),
    ("a.sort()", set()),
    ("a += 1", set()),
    ("for r in a:\n    r[0] = 1", set()),
    ("c = (a, b)", set()),
    ("np.copyto(a, b)", set()),
    ("np.add(a, b, out=a)", set()),
    ("f(a)", set()),  # through a notebook function: it may change its argument
    ("def g():\n    a[0] = 1\nb.mean()", {"b"}),
    ("%timeit a.sum()", set()),
])
def test_pure_reads(source, pure):
    assert pure_names(analyse(source), _NS) & {"a", "b", "np"} == pure


def test_a_shadowed_builtin_is_not_pure():
    assert pure_names(analyse("n = len(a)"), dict(_NS, len=lambda x: x.fill(0))) == set()
