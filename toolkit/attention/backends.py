"""``--attention dense|monarch[:f,h,w]``: what computes self-attention at every seam of a model.

* ``dense``: PyTorch SDPA (the seam's default; cuDNN / flash backends on GPU).
* ``monarch`` / ``monarch:F,H,W``: zero-shot variational MonarchAttention (T = 1) with tiling
  (f_tied, h_reduce, w_reduce) — default (1, 1, 1), framewise. Triton kernels on GPU (``toolkit.kernels``),
  the PyTorch reference (``toolkit.attention.monarch``) on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from toolkit.attention.monarch import monarch_backend
from toolkit.errors import ToolkitError
from toolkit.models.seam import Backend, set_backend, use_backend


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


def backend_for(spec: str, device: torch.device | str = "cpu") -> Backend | None:
    """The seam backend an ``--attention`` spec names, for a model on ``device`` (``None``: dense)."""
    name, tiling = parse_attention(spec)
    if name == "dense":
        return None
    if torch.device(device).type == "cuda":
        from toolkit.kernels import monarch_backend_triton  # needs Triton: imported only where it runs

        return monarch_backend_triton(tiling)
    return monarch_backend(tiling)


def set_attention(model: nn.Module, spec: str) -> None:
    """Every seam of ``model`` computes attention as ``spec`` says, from now on."""
    set_backend(model, backend_for(spec, next(model.parameters()).device))


@contextmanager
def use_attention(model: nn.Module, spec: str) -> Iterator[nn.Module]:
    """Every seam of ``model`` computes attention as ``spec`` says inside the block; as before after it."""
    with use_backend(model, backend_for(spec, next(model.parameters()).device)):
        yield model
