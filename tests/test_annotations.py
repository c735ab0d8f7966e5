"""Type hints on every public function (the project rule): every module-level function and every method of a
module-level class in ``toolkit``, ``toolkit.kernels`` and ``toolkit.paper_figures`` whose name does not start with
``_`` (plus the constructors ``__init__`` / ``__new__`` / ``__post_init__`` of public classes) has a return
annotation and an annotation on every parameter but ``self`` / ``cls``, ``*args`` and ``**kwargs`` included.
Triton kernels (``@triton.jit``, ``@triton.autotune``, ``@triton.heuristics``) are exempt. Pure AST: nothing is
imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
FOLDERS = ("toolkit", "kernels", "paper_figures")
CONSTRUCTORS = ("__init__", "__new__", "__post_init__")
KERNEL_DECORATORS = ("jit", "autotune", "heuristics")  # triton.jit & co. (bare or called with arguments)

Function = ast.FunctionDef | ast.AsyncFunctionDef


def _is_kernel(node: Function) -> bool:
    for d in node.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        if isinstance(d, ast.Attribute) and d.attr in KERNEL_DECORATORS:
            return True
    return False


def _public_functions(tree: ast.Module) -> list[Function]:
    found: list[Function] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append(node)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            found += [m for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return [f for f in found if (not f.name.startswith("_") or f.name in CONSTRUCTORS) and not _is_kernel(f)]


def missing_annotations(path: Path) -> list[str]:
    """``file:line name [what is missing]`` for each public function of ``path`` that is not fully annotated."""
    out = []
    for node in _public_functions(ast.parse(path.read_text(), filename=str(path))):
        a = node.args
        missing = ["return"] if node.returns is None else []
        missing += [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs
                    if p.annotation is None and p.arg not in ("self", "cls")]
        if a.vararg is not None and a.vararg.annotation is None:
            missing.append("*" + a.vararg.arg)
        if a.kwarg is not None and a.kwarg.annotation is None:
            missing.append("**" + a.kwarg.arg)
        if missing:
            out.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{node.lineno} "
                       f"{node.name} {missing}")
    return out


def test_every_public_function_is_fully_annotated():
    gaps = [gap for folder in FOLDERS for path in sorted((ROOT / folder).rglob("*.py"))
            for gap in missing_annotations(path)]
    assert not gaps, f"{len(gaps)} public functions lack type hints:\n" + "\n".join(gaps)


def test_the_checker_sees_a_missing_hint(tmp_path):
    """The test above can fail: planted gaps are reported, private helpers, kernels and annotated code are not."""
    source = tmp_path / "m.py"
    source.write_text(
        "import triton\n"
        "def f(a, b: int, *args, c, **kw): ...\n"
        "def g(x: int) -> int: ...\n"
        "def _private(x): ...\n"
        "@triton.jit\n"
        "def kernel(X, N): ...\n"
        "@triton.autotune(configs=[], key=[])\n"
        "def tuned(X): ...\n"
        "class A:\n"
        "    def __init__(self, x): ...\n"
        "    def m(self, y: int): ...\n"
        "    @classmethod\n"
        "    def make(cls) -> 'A': ...\n"
        "    def __repr__(self): ...\n"
        "class _Hidden:\n"
        "    def m(self, y): ...\n"
    )
    names = [gap.split()[1] for gap in missing_annotations(source)]
    assert names == ["f", "__init__", "m"], names
    assert "['return', 'a', 'c', '*args', '**kw']" in missing_annotations(source)[0]
