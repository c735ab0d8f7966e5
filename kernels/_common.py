"""Shared pieces of the Monarch kernels: tile geometry on raster-order tensors, launch configs, disk-cached tuning.

Geometry (aligned base ``fh,w``; ``docs/monarch.md`` "Layouts"). A frame range ``[start, end)`` of the
token grid (frames, height, width) with tiling (f_tied, h_reduce, w_reduce) has
``((end - start) / f_tied) · h_reduce · w_reduce`` tiles of ``b1 = f_tied · H'`` rows by ``b2 = W'`` columns
(H' = height / h_reduce, W' = width / w_reduce). Tile t = (α · h_reduce + γ) · w_reduce + ε, row i, column j
sit at the raster token (relative to the range's first token)

    ((α · f_tied + i // H') · height + γ · H' + i % H') · width + ε · W' + j

so the kernels read q, k, v and write out in ordinary raster order by stride arithmetic (no permuted copies).
For w_reduce = 1 each tile row (fixed i) is one contiguous run of ``width`` tokens.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from toolkit.errors import ToolkitError

if not torch.cuda.is_available():  # Triton kernels run on the CPU only through its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import triton.testing  # noqa: E402, F401 - do_bench for tuning

LOG2E = 1.4426950408889634


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def tile_token(tile, i, j, height, width, h_in, w_in, f_tied, h_reduce, w_reduce):
    """Raster token (relative to the range start) of tile ``tile``, row ``i``, column ``j`` (any broadcast)."""
    alpha = tile // (h_reduce * w_reduce)
    gamma = (tile // w_reduce) % h_reduce
    eps = tile % w_reduce
    return ((alpha * f_tied + i // h_in) * height + gamma * h_in + i % h_in) * width + eps * w_in + j


@triton.jit
def mma(a, b, UPCAST: tl.constexpr):
    """``tl.dot(a, b)``; with UPCAST the operands go to fp32 first (set only under the interpreter, whose bf16
    dot multiplies the raw uint16 bit patterns; bf16×bf16 products are exact in fp32, so the result is the
    tensor-core result)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b)


def upcast_dots(dtype: torch.dtype) -> bool:
    return interpreted() and dtype == torch.bfloat16


@dataclass(frozen=True)
class TileGeometry:
    """Tiles of one frame range; the integers every kernel needs to locate tokens."""

    grid: tuple[int, int, int]
    tiling: tuple[int, int, int]
    frames: tuple[int, int]  # [start, end) frames of the range

    def __post_init__(self) -> None:
        F, H, W = self.grid
        f_t, c_h, c_w = self.tiling
        start, end = self.frames
        if min(f_t, c_h, c_w) < 1 or H % c_h or W % c_w:
            raise ToolkitError(f"tiling {self.tiling} does not divide the grid {self.grid}")
        if not (0 <= start < end <= F) or start % f_t or end % f_t:
            raise ToolkitError(f"frames {self.frames} must be a non-empty range of whole f_tied={f_t} groups of {F}")

    @property
    def h_in(self) -> int:
        return self.grid[1] // self.tiling[1]

    @property
    def w_in(self) -> int:
        return self.grid[2] // self.tiling[2]

    @property
    def b1(self) -> int:
        return self.tiling[0] * self.h_in

    @property
    def b2(self) -> int:
        return self.w_in

    @property
    def num_tiles(self) -> int:
        return (self.frames[1] - self.frames[0]) // self.tiling[0] * self.tiling[1] * self.tiling[2]

    @property
    def n_tokens(self) -> int:
        return (self.frames[1] - self.frames[0]) * self.grid[1] * self.grid[2]

    def tile_first_frame(self) -> torch.Tensor:
        """Absolute first frame of every tile: ``num_tiles`` longs."""
        t = torch.arange(self.num_tiles)
        return self.frames[0] + t // (self.tiling[1] * self.tiling[2]) * self.tiling[0]

    def args(self) -> tuple[int, ...]:
        """(height, width, h_in, w_in, f_tied, h_reduce, w_reduce) in :func:`tile_token` order."""
        return (self.grid[1], self.grid[2], self.h_in, self.w_in, *self.tiling)


_ALLOWED_ON_DEVICE: dict = {}


def key_tiles_allowed_on(
    device: torch.device, queries: TileGeometry, keys: TileGeometry, block_causal_frames: int | None
) -> torch.Tensor:
    """:func:`key_tiles_allowed` on ``device``, memoised (no host-to-device copy per call)."""
    key = (str(device), queries, keys, block_causal_frames)
    if key not in _ALLOWED_ON_DEVICE:
        _ALLOWED_ON_DEVICE[key] = key_tiles_allowed(queries, keys, block_causal_frames).to(device)
    return _ALLOWED_ON_DEVICE[key]


def key_tiles_allowed(
    queries: TileGeometry, keys: TileGeometry, block_causal_frames: int | None
) -> torch.Tensor:
    """Number of key tiles (a prefix, keys are frame-major) each query tile attends: int32 ``num_query_tiles``.

    Block-causal (``docs/monarch.md`` "Block-causal and KV-cache modes"): a query tile in chunk
    c = frame // block_causal_frames sees the key tiles that start before the end of chunk c; both softmaxes
    (R over columns, L over (tile, row)) see only those.
    """
    n_q = queries.num_tiles
    if block_causal_frames is None:
        return torch.full((n_q,), keys.num_tiles, dtype=torch.int32)
    cb = int(block_causal_frames)
    if cb < 1 or cb % queries.tiling[0]:
        raise ToolkitError(f"f_tied={queries.tiling[0]} must divide block_causal_frames={cb}")
    end_frame = (queries.tile_first_frame() // cb + 1) * cb  # exclusive end of each query tile's chunk
    allowed = (keys.tile_first_frame()[None, :] < end_frame[:, None]).sum(1)
    if int(allowed.min()) < 1:
        raise ToolkitError("a query chunk attends no key tile (key frames start after the query chunk ends)")
    return allowed.to(torch.int32)


# fp32-accurate tensor-core products (3×tf32) for the analysis kernels; IEEE fp32 under the interpreter, or after
# a Triton rejects tf32x3 once.
_FP32_PRECISION = ["ieee" if interpreted() else "tf32x3"]


def run_with_precision(launch: Callable[[str], None]) -> None:
    """``launch(precision)`` with the fp32 dot precision mode, falling back to IEEE if tf32x3 fails to compile."""
    try:
        launch(_FP32_PRECISION[0])
    except Exception:  # noqa: BLE001 - compile-time rejection of the precision mode
        if _FP32_PRECISION[0] == "ieee":
            raise
        _FP32_PRECISION[0] = "ieee"
        launch("ieee")


# Tests set this to NaN-fill kernel scratch buffers, so that an intermediate no program wrote cannot pass.
POISON_SCRATCH = False


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    buf = torch.empty(shape, dtype=dtype, device=device)
    return buf.fill_(float("nan")) if POISON_SCRATCH else buf


def output_buffer(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """``out`` (checked) or a fresh tensor; callers may pass a NaN-filled ``out`` to catch unwritten elements."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != torch.device(device):
        raise ToolkitError(f"out must be {tuple(shape)} {dtype} on {device}, got {tuple(out.shape)} {out.dtype}")
    if out.stride(-1) != 1:
        raise ToolkitError("out needs a contiguous last dim")
    return out


def pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    p = max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
    return min(p, hi) if hi is not None else p


def check_head_dim(d: int) -> None:
    if d < 16 or d & (d - 1):
        raise ToolkitError(f"head dim must be a power of two >= 16 (64, 128 in practice), got {d}")


def token_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, head) strides of a ``b n h d`` tensor whose last dim is contiguous."""
    if x.stride(-1) != 1:
        raise ToolkitError("kernel inputs need a contiguous head dim (call .contiguous())")
    return x.stride(0), x.stride(1), x.stride(2)


# ---------------------------------------------------------------------------------------------------------
# Launch configurations: heuristic defaults, optionally tuned once per shape and cached on disk.


def cache_path() -> Path:
    root = os.environ.get("TOOLKIT_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "toolkit"
    )
    return Path(root) / "kernel_tuning.json"


def _load_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _store_cache(key: str, value: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = _load_cache()
        cache[key] = value
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs re-tuning


_PICKED: dict[tuple[str, bool], dict] = {}

# What the last `pick_config` call did, for the benchmark: {"key", "source": cached|tuned|default, "seconds"}.
TUNING_LOG: list[dict] = []


def autotune_enabled(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return os.environ.get("TOOLKIT_KERNEL_AUTOTUNE", "0") not in ("", "0")


def pick_config(
    key: str, default: dict, candidates: Sequence[dict], run: Callable[[dict], None], autotune: bool
) -> dict:
    """The cached config for ``key``; else, with ``autotune``, time ``candidates`` (compile excluded) and cache
    the fastest; else ``default``. ``run(config)`` launches the kernel once with that config."""
    if (key, autotune) in _PICKED:  # decided earlier in this process: no disk read, no log entry
        return _PICKED[key, autotune]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    full_key = f"{device}|triton {triton.__version__}|{key}"
    cached = _load_cache().get(full_key)
    if cached is not None and cached != default and cached not in candidates:
        cached = None  # chosen among candidates that no longer exist (an older tuner's): decide afresh
    if cached is not None:
        TUNING_LOG.append({"key": key, "source": "cached", "seconds": 0.0, "config": cached})
        _PICKED[key, autotune] = cached
        return cached
    if not autotune or interpreted() or not torch.cuda.is_available():
        TUNING_LOG.append({"key": key, "source": "default", "seconds": 0.0, "config": default})
        _PICKED[key, autotune] = default  # a later call with autotune=True still tunes
        return default
    t0 = time.perf_counter()
    best, best_ms = default, float("inf")
    timings = []  # (config, median ms or the error): what the benchmark reports as the tuning table
    for cfg in [default, *[c for c in candidates if c != default]]:
        try:
            run(cfg)  # compile + warm
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=20, return_mode="median")
        except Exception as err:  # noqa: BLE001 - a config that does not compile (resources) is just skipped
            timings.append((cfg, f"{type(err).__name__}"))
            continue
        timings.append((cfg, round(ms, 4)))
        if ms < best_ms:
            best, best_ms = cfg, ms
    _store_cache(full_key, best)
    _PICKED[key, autotune] = best
    _PICKED[key, False] = best
    TUNING_LOG.append({"key": key, "source": "tuned", "seconds": time.perf_counter() - t0, "config": best,
                       "timings": timings})
    return best


__all__ = ["tl", "triton"]
