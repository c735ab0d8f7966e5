"""Triton kernels (imported as ``toolkit.kernels``; the folder is ``kernels/`` at the repo root)."""
