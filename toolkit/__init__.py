"""Attention-analysis toolkit for video diffusion transformers.

Pipeline (each layer depends only on the ones above it):

    models      toolkit.models       Wan DiT (bidirectional, Self-Forcing causal, bundled toy model)
    seam        toolkit.models.wan   AttentionSeam: the one place self-attention happens
    capture     toolkit.capture      hooks at the seam -> HDF5 (q, k, v, lse, grid, provenance)
    attention   toolkit.attention    exact rows / tiles from q, k (+ lse); Monarch reference
    analyses    toolkit.analysis     periodic structure, oracle top-k, Monarch approximation
    figures     toolkit.paper_figures
"""

__version__ = "0.1.0"
