"""Monarch Triton kernels vs PyTorch SDPA (cuDNN / flash / efficient) at the MonarchRT shapes.

    python benchmarks/bench_kernels.py --out DIR [--shapes full-111 ar-111 ...] [--analysis] [--low-memory]

Same as ``toolkit bench``; the implementation and the argument list are in ``toolkit/kernels/bench.py``
(``kernels/bench.py`` in the repo). Checks every variant against a reference, then times it; one failing variant
is reported and skipped. Writes DIR/bench_kernels.json and DIR/bench_kernels.md. Runs from a plain checkout too
(no ``pip install``): the repo root is put on the path and ``kernels/`` mapped to ``toolkit.kernels``.
"""

import importlib.util
import sys
from pathlib import Path


def _import_toolkit_kernels() -> None:
    try:
        import toolkit.kernels  # noqa: F401 - installed (pip install -e .)
        return
    except ImportError:
        pass
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    import toolkit

    spec = importlib.util.spec_from_file_location(
        "toolkit.kernels", root / "kernels" / "__init__.py", submodule_search_locations=[str(root / "kernels")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["toolkit.kernels"] = module
    spec.loader.exec_module(module)
    toolkit.kernels = module


if __name__ == "__main__":
    _import_toolkit_kernels()
    from toolkit.kernels.bench import main

    sys.exit(main())
