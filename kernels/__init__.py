"""Triton kernels (imported as ``toolkit.kernels``; the folder is ``kernels/`` at the repo root).

* :func:`monarch_attention_triton` / :func:`monarch_backend_triton` — Monarch attention forward (T = 1, tiled),
  bidirectional, block-causal and KV-cache (raster-order cache), seam contract; runs as the ``torch.library``
  custom op ``toolkit::monarch_attention``, so models using it work under ``torch.compile``; its gradients come
  from the backward kernels of ``monarch_backward`` (op ``toolkit::monarch_attention_backward``).
* ``monarch_fused`` — the same forward as one CUDA C++ kernel (``monarch_fused.cu``, built by nvcc at first use),
  α/Y kept on chip; private (``monarch._forward(version="fused")``) while it is slower than the two-stage kernel.
* :func:`monarch_factors_apply` / :func:`apply_factors` — M·V and row sums from explicit factors (L, R).
* :func:`monarch_compare` — per query row ‖A − M‖², ‖(A − M)V‖ against dense softmax attention, streaming.

Without a CUDA device the kernels run through Triton's interpreter (slow; for tests). Design notes, FLOP and
byte counts and measured times: ``kernels/NOTES.md``; benchmark: ``toolkit bench`` / ``benchmarks/bench_kernels.py``.
"""

import importlib
import importlib.machinery
import importlib.util
import os
import sys

if __name__ == "kernels":
    # This folder is `toolkit.kernels`; it is found under the top-level name only when the repository root is on
    # sys.path (`python -m ...` run from the root). Hand that name to the PyPI package `kernels` (a dependency of
    # transformers, which diffusers imports when installed) so that it is never shadowed, or fail as a missing one.
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ is toolkit.kernels)",
                                  name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # what `import kernels` returns once this file has run
    _spec.loader.exec_module(_module)

# Lazy exports: importing toolkit.kernels (e.g. for `toolkit bench --help`) does not load torch or Triton.
_EXPORTS = {
    "RowErrors": "compare",
    "monarch_compare": "compare",
    "apply_factors": "explicit",
    "monarch_factors_apply": "explicit",
    "monarch_attention_triton": "monarch",
    "monarch_backend_triton": "monarch",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"toolkit.kernels.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'toolkit.kernels' has no attribute {name!r}")
