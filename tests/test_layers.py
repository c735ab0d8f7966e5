"""Imports follow the pipeline, so the layering the README describes stays true: every module of ``toolkit``,
``toolkit.kernels`` and ``toolkit.paper_figures`` imports only from its own layer or the ones below it, and no
modules import each other in a circle — imports inside functions included (they are read from the source)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"toolkit": ROOT / "toolkit", "toolkit.kernels": ROOT / "kernels",
            "toolkit.paper_figures": ROOT / "paper_figures"}

# lowest first; a module belongs to the layer of its longest matching prefix
LAYERS = (
    ("base", ("toolkit._version", "toolkit.errors", "toolkit.device", "toolkit.grid", "toolkit.indices")),
    ("models", ("toolkit.models",)),  # the Wan DiT with its attention seam, samplers, registry, bundled model
    ("attention", ("toolkit.attention", "toolkit.kernels")),  # exact, Monarch reference, kernels, backends
    ("capture", ("toolkit.capture", "toolkit.pipeline")),  # hooks -> HDF5, reader; preparing and sampling runs
    ("analyses", ("toolkit.analysis",)),
    ("figures", ("toolkit.paper_figures",)),
    ("commands", ("toolkit.commands", "toolkit.cli", "toolkit")),  # the CLI and the package's root facade
)


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "toolkit" and path.is_relative_to(PACKAGES["toolkit.kernels"]):
                continue
            found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of ours that ``name`` imports anywhere in its source; ``from pkg import sub`` counts as ``pkg.sub``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    out.add(sub)
                elif base in known:
                    out.add(base)
    out.discard(name)
    return out


def layer(name: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{name} is in no layer: add it to LAYERS"
    return rank


def test_every_module_imports_only_its_own_layer_or_below():
    known = modules()
    upward = []
    for name, path in known.items():
        for target in imports(name, path, known):
            if layer(target) > layer(name):
                upward.append(f"{name} ({LAYERS[layer(name)][0]}) imports {target} ({LAYERS[layer(target)][0]})")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_circles():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    # a package importing its own submodules is how packages are built; a submodule importing its package's
    # __init__ back (rather than a sibling) would close a circle and is reported
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_checker_sees_an_upward_import_and_a_circle(tmp_path):
    """The two tests above can fail: a planted upward import and a planted circle are found."""
    pkg = tmp_path / "toolkit"
    (pkg / "models").mkdir(parents=True)
    (pkg / "analysis").mkdir()
    for init in (pkg, pkg / "models", pkg / "analysis"):
        (init / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("def f():\n    from toolkit.analysis import b\n")
    (pkg / "analysis" / "b.py").write_text("from toolkit.models import a\n")
    known = {"toolkit.models.a": pkg / "models" / "a.py", "toolkit.analysis.b": pkg / "analysis" / "b.py"}
    assert imports("toolkit.models.a", known["toolkit.models.a"], known) == {"toolkit.analysis.b"}
    assert layer("toolkit.analysis.b") > layer("toolkit.models.a")
    assert imports("toolkit.analysis.b", known["toolkit.analysis.b"], known) == {"toolkit.models.a"}
