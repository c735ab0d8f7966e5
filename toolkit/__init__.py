"""Attention-analysis toolkit for video diffusion transformers.

Pipeline (each layer depends only on the ones above it):

    models      toolkit.models       Wan DiT (bidirectional, Self-Forcing causal, bundled toy model)
    seam        toolkit.models.seam  AttentionSeam: the one place self-attention happens
    capture     toolkit.capture      hooks at the seam -> HDF5 (q, k, v, lse, grid, provenance);
                                     toolkit.open_capture(path) reads a run back
    attention   toolkit.attention    exact rows / tiles from q, k (+ lse); Monarch reference
    analyses    toolkit.analysis     periodic structure, oracle top-k, Monarch approximation
    kernels     toolkit.kernels      Triton Monarch attention (folder kernels/)
    figures     toolkit.paper_figures
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``toolkit.open_capture`` without importing torch/h5py at ``import toolkit`` time (the CLI stays fast)."""
    if name == "open_capture":
        from toolkit.capture import open_capture

        return open_capture
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
