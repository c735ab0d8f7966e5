"""Triton kernels (imported as ``toolkit.kernels``; the folder is ``kernels/`` at the repo root).

* :func:`monarch_attention_triton` / :func:`monarch_backend_triton` — Monarch attention forward (T = 1, tiled),
  bidirectional, block-causal and KV-cache (raster-order cache), seam contract; runs as the ``torch.library``
  custom op ``toolkit::monarch_attention``, so models using it work under ``torch.compile``; its gradients come
  from the backward kernels of ``monarch_backward`` (op ``toolkit::monarch_attention_backward``).
* :func:`monarch_factors_apply` / :func:`apply_factors` — M·V and row sums from explicit factors (L, R).
* :func:`monarch_compare` — per query row ‖A − M‖², ‖(A − M)V‖ against dense softmax attention, streaming.

Without a CUDA device the kernels run through Triton's interpreter (slow; for tests). Design notes, FLOP and
byte counts and measured times: ``kernels/NOTES.md``; benchmark: ``toolkit bench`` / ``benchmarks/bench_kernels.py``.
"""

import importlib

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
