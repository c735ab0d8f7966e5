"""Attention-analysis toolkit for video diffusion transformers.

Pipeline, lowest layer first (each imports only from itself and the layers before it; ``tests/test_layers.py``):

    base        toolkit.grid, toolkit.errors, toolkit.device
    models      toolkit.models       Wan DiT with its attention seam, samplers, registry, bundled toy model
    attention   toolkit.attention    exact rows / tiles from q, k (+ lse); Monarch reference; backends
                toolkit.kernels      Triton Monarch attention (folder kernels/)
    capture     toolkit.capture      hooks at the seam -> HDF5 (q, k, v, lse, grid, provenance);
                                     toolkit.open_capture(path) reads a run back
                toolkit.pipeline     a model run from its spec: prepare, sample, save
    analyses    toolkit.analysis     periodic structure, oracle top-k, Monarch approximation
    figures     toolkit.paper_figures
    commands    toolkit.commands     the CLI
"""

from toolkit._version import __version__

__all__ = ["__version__", "open_capture"]


def __getattr__(name: str):
    """``toolkit.open_capture`` without importing torch/h5py at ``import toolkit`` time (the CLI stays fast)."""
    if name == "open_capture":
        from toolkit.capture import open_capture

        return open_capture
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
