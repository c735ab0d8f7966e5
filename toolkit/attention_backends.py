"""``--attention dense|monarch[:f,h,w]``: what computes self-attention at every seam of a model.

* ``dense``: PyTorch SDPA (the seam's default; cuDNN / flash backends on GPU).
* ``monarch`` / ``monarch:F,H,W``: zero-shot variational MonarchAttention (T = 1) with tiling
  (f_tied, h_reduce, w_reduce) — default (1, 1, 1), framewise. Triton kernels on GPU (``toolkit.kernels``),
  the PyTorch reference (``toolkit.attention.monarch``) on CPU.
"""

from __future__ import annotations

from torch import nn

from toolkit.errors import ToolkitError
from toolkit.models.seam import seams


def parse_attention(spec: str) -> tuple[str, tuple[int, int, int] | None]:
    """'dense' -> ('dense', None); 'monarch' -> ('monarch', (1,1,1)); 'monarch:3,1,1' -> ('monarch', (3,1,1))."""
    name, _, rest = spec.partition(":")
    if name == "dense" and not rest:
        return "dense", None
    if name == "monarch":
        if not rest:
            return "monarch", (1, 1, 1)
        try:
            tiling = tuple(int(x) for x in rest.split(","))
        except ValueError:
            tiling = ()
        if len(tiling) == 3 and all(t >= 1 for t in tiling):
            return "monarch", tiling  # type: ignore[return-value]
    raise ToolkitError(f"--attention {spec!r}: expected 'dense', 'monarch' or 'monarch:F,H,W' (e.g. monarch:1,2,1)")


def install_backend(model: nn.Module, spec: str) -> None:
    """Set the backend of every seam of ``model`` according to ``spec`` (see module docstring)."""
    name, tiling = parse_attention(spec)
    backend = None
    if name == "monarch":
        device = next(model.parameters()).device
        if device.type == "cuda":
            from toolkit.kernels import monarch_backend_triton

            backend = monarch_backend_triton(tiling)
        else:
            from toolkit.attention.monarch import monarch_backend

            backend = monarch_backend(tiling)
    for seam in seams(model):
        seam.backend = backend
