"""What the tests share: the Triton interpreter switch, the one tiny random Wan model factory, the one float64
dense attention reference, and a one-torch-thread fixture.

Triton reads ``TRITON_INTERPRET`` when a kernel is *decorated*, i.e. when ``toolkit.kernels`` is first imported, so
it is set here, before any test module (or anything they import) imports triton: the kernel tests run on CPU
tensors through the interpreter. (``toolkit.kernels`` also defaults it to 1 when there is no CUDA device.)

The helpers are plain functions; test modules import them (``from conftest import tiny_wan``), since module-level
helpers and module-scoped fixtures of several test files build on them.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from toolkit.models.wan import WanConfig, WanModel  # noqa: E402

# Under pytest-xdist (`-n 2`, the README's test command) each worker takes one core: two workers with torch's
# default two intra-op threads each would oversubscribe a 2-core runner.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# The tiny causal Wan config of the capture / analysis / kernel tests: 3 heads of 16 channels, 3 layers, a
# 16-channel latent. A latent of 6 frames × 6 × 10 pixels gives the token grid (6, 3, 5).
TINY_WAN = dict(dim=48, ffn_dim=64, num_heads=3, num_layers=3, text_dim=16, text_len=6, freq_dim=16)


def tiny_config(**overrides) -> WanConfig:
    """``WanConfig`` of ``TINY_WAN`` with ``overrides`` applied."""
    return WanConfig(**{**TINY_WAN, **overrides})


def tiny_wan(cfg: WanConfig | None = None, *, seed: int = 0, dtype: torch.dtype = torch.float32,
             sharpen: float | None = None) -> WanModel:
    """A random ``WanModel(cfg)`` (default ``tiny_config()``) initialised after ``torch.manual_seed(seed)``, in eval
    mode and ``dtype``. ``sharpen`` multiplies every layer's q-norm weight: random init leaves attention nearly
    uniform, and a factor of 4 makes the maps informative."""
    torch.manual_seed(seed)
    model = WanModel(cfg if cfg is not None else tiny_config()).eval().to(dtype)
    if sharpen is not None:
        with torch.no_grad():
            for block in model.blocks:
                block.self_attn.norm_q.weight.mul_(sharpen)
    return model


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): on the 2-core
    CI shared with other jobs, one thread is faster than oversubscribing."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class DenseAttention(NamedTuple):
    logits: torch.Tensor  # ... i j, -inf where masked
    probs: torch.Tensor  # ... i j
    lse: torch.Tensor  # ... i
    out: torch.Tensor | None  # ... i d (None without v)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None, scale: float = 1.0,
                    allowed: torch.Tensor | None = None) -> DenseAttention:
    """Float64 brute force on the full logit matrix: ``q`` ``... i d``, ``k``/``v`` ``... j d`` (any leading dims,
    broadcast), logits ``(q kᵀ)·scale`` set to -inf where the boolean ``allowed`` (``... i j``) is False."""
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    return DenseAttention(logits, probs, torch.logsumexp(logits, dim=-1), None if v is None else probs @ v.double())
