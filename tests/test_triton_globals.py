"""Every Triton kernel reads only globals that Triton's compiler accepts.

The CPU suite runs the kernels in Triton's interpreter, which executes them as Python and so accepts a plain
module-level constant (`FP8 = 2`) read inside a kernel; the compiler refuses it ("Cannot access global variable
... from within @jit'ed function"), so such a kernel passes every CPU test and fails on the first GPU. This test
reads each jitted function's source and checks every global it names: a module, another jitted function, a
`tl.constexpr`, or a builtin.
"""

import ast
import builtins
import importlib
import inspect
import pkgutil
import textwrap
import types

import pytest

from triton_guard import require_triton

require_triton(module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import dsmoe.kernels  # noqa: E402


def python_function(obj):
    """The plain function under a jit / interpreter / autotuner wrapper, or None for anything else."""
    seen = 0
    while hasattr(obj, "fn") and seen < 5:
        obj, seen = obj.fn, seen + 1
    return obj if seen and isinstance(obj, types.FunctionType) else None


def jitted_functions():
    for info in pkgutil.iter_modules(dsmoe.kernels.__path__):
        if not info.name.startswith("triton_"):
            continue
        module = importlib.import_module(f"dsmoe.kernels.{info.name}")
        for name, obj in vars(module).items():
            fn = python_function(obj)
            if fn is not None and fn.__module__ == module.__name__:
                yield f"{info.name}.{name}", fn


def bad_globals(fn) -> list[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    tree.decorator_list = []  # the decorators (autotune configs and keys) run in Python, not in the kernel
    local = {a.arg for a in ast.walk(tree) if isinstance(a, ast.arg)}
    local |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Name) or not isinstance(node.ctx, ast.Load) or node.id in local:
            continue
        if node.id not in fn.__globals__:
            if not hasattr(builtins, node.id):
                bad.append(f"{node.id} (undefined)")
            continue
        value = fn.__globals__[node.id]
        if not (isinstance(value, (types.ModuleType, tl.constexpr)) or python_function(value) is not None
                or value is triton.cdiv or callable(value) and getattr(value, "__module__", "").startswith("triton")):
            bad.append(f"{node.id} = {value!r}")
    return sorted(set(bad))


KERNELS = dict(jitted_functions())


def test_the_kernels_are_found():
    assert {"triton_quant._wq_matmul_kernel", "triton_moe_decode._decode_up_kernel",
            "triton_router._route_kernel"} <= set(KERNELS)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_reads_only_globals_the_compiler_accepts(name):
    assert bad_globals(KERNELS[name]) == [], f"{name} reads module globals Triton cannot compile: use literals " \
                                             "or tl.constexpr(...)"
