"""Triton kernels (imported as ``toolkit.kernels``; the folder is ``kernels/`` at the repo root).

* :func:`monarch_attention_triton` / :func:`monarch_backend_triton` — Monarch attention forward (T = 1, tiled),
  bidirectional, block-causal and KV-cache (raster-order cache), seam contract.
* :func:`monarch_factors_apply` / :func:`apply_factors` — M·V and row sums from explicit factors (L, R).
* :func:`monarch_compare` — per query row ‖A − M‖², ‖(A − M)V‖ against dense softmax attention, streaming.

Without a CUDA device the kernels run through Triton's interpreter (slow; for tests). Design notes, FLOP and
byte counts and measured times: ``kernels/NOTES.md``; benchmark: ``toolkit bench`` / ``benchmarks/bench_kernels.py``.
"""

from toolkit.kernels.compare import RowErrors, monarch_compare
from toolkit.kernels.explicit import apply_factors, monarch_factors_apply
from toolkit.kernels.monarch import monarch_attention_triton, monarch_backend_triton

__all__ = [
    "RowErrors",
    "apply_factors",
    "monarch_attention_triton",
    "monarch_backend_triton",
    "monarch_compare",
    "monarch_factors_apply",
]
