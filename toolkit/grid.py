"""The latent token grid (frames, height, width) and Monarch block layouts on it.

Token order is raster order: ``token = (frame * height + row) * width + col`` (width fastest).

A **Monarch layout** assigns every token of the clip a position ``(tile a, row i, column j)`` with
``a < num_tiles``, ``i < b1``, ``j < b2`` (``docs/monarch.md`` "Layouts"). Queries and keys use the
same map; a Monarch attention matrix is then, per head,

    M[(a,i,j), (f,k,l)] = L[a, j, i, (f,k)] · R[a, f, k, j, l]

so for fixed (a, j, f, k) the ``b1 × b2`` slice over (i, l) has rank 1.

**Aligned layouts** (the paper's): a *base* names which grid axes form the rows (b1) and the columns (b2) of a
tile — one of ``fh,w`` (the paper's default), ``w,fh``, ``f,hw``, ``hw,f``, ``fw,h``, ``h,fw`` — and a *tiling*
``(f_tied, h_reduce, w_reduce)`` cuts the grid into tiles of ``f_tied`` frames × ``height / h_reduce`` rows ×
``width / w_reduce`` columns. With frame φ = α·f_tied + φ', row y = γ·H' + y', column x = ε·W' + x'
(H' = height / h_reduce, W' = width / w_reduce):

* tile ``a = (α · h_reduce + γ) · w_reduce + ε``;
* within the tile, the inner coordinates (φ', y', x') are split between i and j by the base, each side in
  (f, h, w) order as written in the base name, earlier axes slower. For ``fh,w``: ``i = φ'·H' + y'``, ``j = x'``
  (as MonarchRT's ``wan/modules/monarch_attn.py``); for ``hw,f``: ``i = y'·W' + x'``, ``j = φ'``.

Tiling ``(frames, 1, 1)`` is the untiled (one tile) layout.

**Contiguous layouts** (the original MonarchAttention, the misaligned control): consecutive raster tokens in
tiles of ``b1·b2`` tokens, ``a = n // (b1·b2)``, ``i = (n // b2) % b1``, ``j = n % b2``. Contiguous ``(b1, b2) =
(height, width)`` tiles coincide with the aligned ``fh,w`` framewise layout.

Accounting (``docs/monarch.md`` "Accounting"): effective sparsity ``1 − (b1+b2)/(b1·b2)`` (= 1 − parameter
density |L|+|R| over dense), attention FLOP ratio vs dense ``(3·b2 + 2·b1)/(2·b1·b2)`` for T = 1 plus
``(b1+b2)/(b1·b2)`` per extra iteration, and the α_L + Y intermediates of the two-stage kernel,
``2 · N_q · F · d`` elements per head (F = number of key tiles).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from toolkit.errors import ToolkitError

GRID_480P = (21, 30, 52)
GRID_720P = (21, 45, 80)

ALIGNED_BASES = ("fh,w", "w,fh", "f,hw", "hw,f", "fw,h", "h,fw")


# Why tokens may not be one run of whole frames: sampled queries, or the keys of a rolling KV cache with a sink.
NOT_WHOLE_FRAMES = ("tokens are not one run of whole frames in raster order (queries sampled by stride or at "
                    "random, or keys of a rolling KV cache with an attention sink); this analysis needs one run")


@dataclass(frozen=True)
class TokenGrid:
    """The (frames, height, width) latent token grid of a clip, raster order."""

    frames: int
    height: int
    width: int

    def __post_init__(self) -> None:
        if min(self.frames, self.height, self.width) < 1:
            raise ToolkitError(f"token grid sizes must be positive, got {tuple(self)}")

    def __iter__(self):
        return iter((self.frames, self.height, self.width))

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def n_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    def coords(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raster token indices -> (frame, row, col), each shaped like ``tokens``."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        return tokens // self.tokens_per_frame, (tokens // self.width) % self.height, tokens % self.width

    def index(self, frame: torch.Tensor | int, row: torch.Tensor | int, col: torch.Tensor | int) -> torch.Tensor:
        """(frame, row, col) -> raster token index (broadcasting)."""
        frame, row, col = (torch.as_tensor(x, dtype=torch.long) for x in (frame, row, col))
        return (frame * self.height + row) * self.width + col

    def offsets(
        self, query_tokens: torch.Tensor, key_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Key minus query coordinates ``(dt, dh, dw)``, each ``i j`` for query tokens i and key tokens j."""
        qf, qh, qw = self.coords(query_tokens)
        kf, kh, kw = self.coords(key_tokens)
        return kf[None, :] - qf[:, None], kh[None, :] - qh[:, None], kw[None, :] - qw[:, None]

    def frame_range(self, tokens: torch.Tensor) -> tuple[int, int]:
        """``(start, end)`` frames if ``tokens`` are exactly the whole frames start..end-1 in raster order."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        n = tokens.numel()
        if n == 0 or n % self.tokens_per_frame or int(tokens[0]) % self.tokens_per_frame:
            raise ToolkitError(NOT_WHOLE_FRAMES)
        start = int(tokens[0]) // self.tokens_per_frame
        expected = torch.arange(int(tokens[0]), int(tokens[0]) + n, device=tokens.device)
        if not torch.equal(tokens, expected):
            raise ToolkitError(NOT_WHOLE_FRAMES)
        return start, start + n // self.tokens_per_frame


def as_grid(grid: TokenGrid | Sequence[int]) -> TokenGrid:
    return grid if isinstance(grid, TokenGrid) else TokenGrid(*(int(x) for x in grid))


def _divides(size: int, parts: int, what: str) -> int:
    if parts < 1 or size % parts:
        raise ToolkitError(f"{what}: {parts} does not divide {size}")
    return size // parts


@dataclass(frozen=True)
class MonarchLayout:
    """Token -> (tile, b1, b2) map over a whole clip grid. Build with :meth:`aligned` or :meth:`contiguous`."""

    grid: TokenGrid
    name: str  # "fh,w (1,1,1)" or "contiguous (18,20)"
    b1: int
    b2: int
    # tokens[a, i, j] = raster index of the token at tile a, row i, column j (long, CPU).
    tokens: torch.Tensor = field(repr=False, compare=False)
    base: str | None = None
    tiling: tuple[int, int, int] | None = None

    @classmethod
    def aligned(
        cls, grid: TokenGrid | Sequence[int], base: str = "fh,w", tiling: tuple[int, int, int] = (1, 1, 1)
    ) -> MonarchLayout:
        grid = as_grid(grid)
        if base not in ALIGNED_BASES:
            raise ToolkitError(f"unknown Monarch base {base!r}; choose one of {', '.join(ALIGNED_BASES)}")
        f_t, c_h, c_w = (int(x) for x in tiling)
        _divides(grid.frames, f_t, "f_tied must divide the number of frames")
        h_in = _divides(grid.height, c_h, "h_reduce must divide the height")
        w_in = _divides(grid.width, c_w, "w_reduce must divide the width")
        inner = {"f": f_t, "h": h_in, "w": w_in}
        # raster grid as (α, φ', γ, y', ε, x'): outer (tile) and inner coordinates of each axis
        t = torch.arange(grid.n_tokens).reshape(grid.frames // f_t, f_t, c_h, h_in, c_w, w_in)
        dim_of = {"f": 1, "h": 3, "w": 5}
        rows, cols = base.split(",")
        t = t.permute(0, 2, 4, *(dim_of[a] for a in rows), *(dim_of[a] for a in cols))
        b1, b2 = math.prod(inner[a] for a in rows), math.prod(inner[a] for a in cols)
        tokens = t.reshape(-1, b1, b2).contiguous()
        return cls(grid, f"{base} ({f_t},{c_h},{c_w})", b1, b2, tokens, base, (f_t, c_h, c_w))

    @classmethod
    def contiguous(cls, grid: TokenGrid | Sequence[int], b1: int, b2: int) -> MonarchLayout:
        """Tiles of ``b1·b2`` consecutive raster tokens (MonarchAttention's layout, untiled if b1·b2 = N)."""
        grid = as_grid(grid)
        _divides(grid.n_tokens, b1 * b2, f"contiguous tile size {b1}x{b2}")
        tokens = torch.arange(grid.n_tokens).reshape(-1, b1, b2)
        return cls(grid, f"contiguous ({b1},{b2})", b1, b2, tokens)

    # ---- shape / accounting -------------------------------------------------------------------------
    @property
    def num_tiles(self) -> int:
        return self.tokens.shape[0]

    @property
    def tile_size(self) -> int:
        return self.b1 * self.b2

    @property
    def density(self) -> float:
        """Monarch parameters (|L| + |R|) per dense map entry: (b1 + b2) / (b1·b2)."""
        return param_density(self.b1, self.b2)

    @property
    def effective_sparsity(self) -> float:
        return effective_sparsity(self.b1, self.b2)

    def flop_ratio(self, iters: int = 1) -> float:
        return flop_ratio(self.b1, self.b2, iters)

    def intermediate_bytes(
        self, n_queries: int, n_key_tiles: int | None = None, head_dim: int = 128, heads: int = 12, dtype_bytes: int = 2
    ) -> int:
        """Bytes of the kernel's α_L and Y intermediates (each ``N_q · F · d`` per head, F = key tiles)."""
        f = self.num_tiles if n_key_tiles is None else n_key_tiles
        return 2 * n_queries * f * head_dim * heads * dtype_bytes

    # ---- token ranges ------------------------------------------------------------------------------
    def tiles_of_frames(self, frames: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tiles covering frames ``[start, end)``: ``(tile_ids [A'], local_tokens [A', b1, b2])``.

        ``local_tokens`` index into the tokens of that frame range (0 = first token of frame ``start``). Raises
        if tiles straddle the range boundary (e.g. a 3-frame tile and a range starting at frame 1)."""
        start, end = (0, self.grid.frames) if frames is None else (int(frames[0]), int(frames[1]))
        if not 0 <= start < end <= self.grid.frames:
            raise ToolkitError(f"frame range {start}..{end} outside a clip of {self.grid.frames} frames")
        lo, hi = start * self.grid.tokens_per_frame, end * self.grid.tokens_per_frame
        inside = (self.tokens >= lo) & (self.tokens < hi)
        full, some = inside.flatten(1).all(1), inside.flatten(1).any(1)
        if not torch.equal(full, some):
            raise ToolkitError(f"{self.name} tiles straddle the frame range {start}..{end}")
        ids = torch.nonzero(full).flatten()
        return ids, self.tokens[ids] - lo

    def tile_frames(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last frame touched by each tile, ``([A], [A])``."""
        f = self.tokens.flatten(1) // self.grid.tokens_per_frame
        return f.min(1).values, f.max(1).values

    def permute(self, x: torch.Tensor, dim: int = 1, frames: tuple[int, int] | None = None) -> torch.Tensor:
        """Raster tokens along ``dim`` (the tokens of ``frames``) -> three dims ``(A', b1, b2)``."""
        _, local = self.tiles_of_frames(frames)
        dim = dim % x.dim()
        if x.shape[dim] != local.numel():
            raise ToolkitError(f"expected {local.numel()} tokens along dim {dim}, got {x.shape[dim]}")
        return x.index_select(dim, local.flatten().to(x.device)).unflatten(dim, local.shape)

    def unpermute(self, y: torch.Tensor, dim: int = 1, frames: tuple[int, int] | None = None) -> torch.Tensor:
        """Inverse of :meth:`permute`: dims ``dim, dim+1, dim+2`` = (A', b1, b2) -> raster tokens."""
        _, local = self.tiles_of_frames(frames)
        dim = dim % y.dim()
        inverse = torch.argsort(local.flatten()).to(y.device)
        return y.flatten(dim, dim + 2).index_select(dim, inverse)


# ---- accounting (depends only on the tile shape) ---------------------------------------------------------
def param_density(b1: int, b2: int) -> float:
    return (b1 + b2) / (b1 * b2)


def effective_sparsity(b1: int, b2: int) -> float:
    """1 − (b1 + b2)/(b1·b2): the fraction of dense map entries *not* stored as Monarch parameters."""
    return 1.0 - param_density(b1, b2)


def flop_ratio(b1: int, b2: int, iters: int = 1) -> float:
    """Monarch attention FLOPs / dense attention FLOPs for ``iters`` refinement iterations
    (``docs/monarch.md`` "Accounting")."""
    if iters < 1:
        raise ToolkitError("MonarchAttention needs at least one iteration")
    return (3 * b2 + 2 * b1) / (2 * b1 * b2) + (iters - 1) * (b1 + b2) / (b1 * b2)


PAPER_CONFIGS = (  # (label, grid, base, tiling, where used) — docs/monarch.md "Configurations"
    ("480p", GRID_480P, "fh,w", (1, 1, 1), "framewise: main Self-Forcing result"),
    ("480p", GRID_480P, "fh,w", (1, 2, 1), "training-free 90 %?"),
    ("480p", GRID_480P, "fh,w", (1, 2, 4), "Self-Forcing DMD run"),
    ("480p", GRID_480P, "fh,w", (3, 1, 1), "tied3frame: bidirectional"),
    ("480p", GRID_480P, "fh,w", (3, 2, 1), "bidirectional"),
    ("480p", GRID_480P, "fh,w", (3, 6, 2), "bidirectional run"),
    ("480p", GRID_480P, "fh,w", (21, 1, 1), "untiled, reference only"),
    ("720p", GRID_720P, "fh,w", (3, 1, 1), "'11.8x at 98 %'"),
    ("720p", GRID_720P, "fh,w", (1, 1, 1), "framewise"),
    *(("480p", GRID_480P, b, (21, 1, 1), "untiled aligned base") for b in ALIGNED_BASES[1:]),
)


def config_table(
    configs: Sequence[tuple[str, tuple[int, int, int], str, tuple[int, int, int], str]] = PAPER_CONFIGS,
    head_dim: int = 128,
    heads: int = 12,
) -> list[dict]:
    """Rows of the paper's configuration table (effective sparsity, FLOP ratio, bf16 intermediates)."""
    rows = []
    for label, grid, base, tiling, note in configs:
        lay = MonarchLayout.aligned(grid, base, tiling)
        n = lay.grid.n_tokens
        rows.append(
            dict(
                resolution=label, grid=tuple(grid), base=base, tiling=tuple(tiling), b1=lay.b1, b2=lay.b2,
                tiles=lay.num_tiles, effective_sparsity=lay.effective_sparsity, flop_ratio=lay.flop_ratio(1),
                intermediate_gb=lay.intermediate_bytes(n, head_dim=head_dim, heads=heads) / 1e9, note=note,
            )
        )
    return rows


def format_config_table(rows: list[dict] | None = None) -> str:
    rows = config_table() if rows is None else rows
    head = (
        f"{'res':5} {'base':5} {'tiling':>10} {'(b1, b2)':>11} {'tiles':>5} {'eff.sparsity':>12} "
        f"{'FLOP ratio':>10} {'speedup':>7} {'aL+Y GB':>8}  note"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['resolution']:5} {r['base']:5} {str(r['tiling']):>10} {str((r['b1'], r['b2'])):>11} "
            f"{r['tiles']:5d} {100 * r['effective_sparsity']:11.1f}% {r['flop_ratio']:10.4f} "
            f"{1 / r['flop_ratio']:6.1f}x {r['intermediate_gb']:8.2f}  {r['note']}"
        )
    lines.append("aL+Y: bf16 stage-1 intermediates of the two-stage kernel, full clip, 12 heads, d=128.")
    return "\n".join(lines)


def print_config_table() -> None:
    """Print the MonarchRT configuration table for 480p (21×30×52) and 720p (21×45×80)."""
    print(format_config_table())


if __name__ == "__main__":
    print_config_table()
