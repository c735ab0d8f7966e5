"""Sparse-attention approximation families: oracle / predicted block top-k, sliding tile attention, radial
attention, Sparse VideoGen, and a researcher's own callable (``docs/approximation-families.md``).

Every family is one frozen dataclass that answers, for one attention call given by an `AttentionContext`:

* ``mask(q, k, v, ctx)``: the boolean ``... i j`` of query–key pairs it computes (True = computed), never a pair
  the exact attention does not compute (``ctx.attn_mask``), and at least one key per query row;
* ``output(q, k, v, ctx)``: softmax restricted to the mask (renormalised over the kept keys) times v, ``... i e``;
* ``evaluate(q, k, v, ctx)``: both, with the *density* (:func:`density`): computed pairs / pairs the exact
  attention computes, per leading index (head).

Shapes (einops style, as ``toolkit.attention.exact``): q ``... i d``, k ``... j d``, v ``... j e`` with leading dims
``h`` (a captured record's heads) or ``b h`` (the seam's, transposed); masks ``... i j`` (static families return
``i j``, which broadcasts). float64 inputs are computed in float64, so each family is testable against a plain
brute-force definition (``tests/test_families.py``).

Coordinates: query i is the raster token ``query_offset + i`` and key j the token ``key_offset + j`` of the clip's
(frames, height, width) ``ctx.grid`` (``token = (frame * height + row) * width + col``), so in a KV-cache call
(queries = the last chunk, keys = every frame up to its end) a mask is built in the frames the keys really have.
Tiles are anchored at frame 0 of the clip, row 0 and column 0, and the last tile of an axis may be partial (axes
need not divide by the tile). Calls whose tokens are not whole frames in raster order (the teacher-forcing
training path, whose sequence holds the clip twice) are refused in one line.

``parse_family(spec)`` reads a backend spec (``blocktopk:0.1:1,4,4``, ``sta:3,3,3:1,4,4``, ``radial:1,4``,
``svg:16:1,0``, ``py:module:function``; :data:`FAMILY_FORMS`); ``family_backend(family)`` is the seam backend that
``toolkit.attention.backends`` gives ``--attention`` rules.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from toolkit.attention import exact
from toolkit.errors import ToolkitError
from toolkit.grid import TokenGrid, as_grid
from toolkit.models.seam import AttentionContext, Backend

Tile = tuple[int, int, int]  # (frames, rows, columns) of one tile of the token grid

# The backend specs of this module, as the one-line errors list them.
FAMILY_FORMS = ("blocktopk:KEEP:TF,TH,TW", "blocktopk-pred:KEEP:TF,TH,TW", "sta:WF,WH,WW:TF,TH,TW",
                "radial:DENSE_FRAMES,RADIUS", "svg:ROWS:FRAME_BAND,SPATIAL_BAND", "py:MODULE:FUNCTION")


# ---- the geometry of one call ---------------------------------------------------------------------------------
class Coords(NamedTuple):
    """Clip coordinates of a run of raster tokens, each ``n`` (long)."""

    frame: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor


def call_context(grid: TokenGrid | Sequence[int], scale: float, query_frames: tuple[int, int] | None = None,
                 key_frames: tuple[int, int] | None = None, attn_mask: torch.Tensor | None = None,
                 **where: int | bool | float) -> AttentionContext:
    """An `AttentionContext` for analysing captured q, k, v outside the model (whole clip by default);
    ``where`` may set ``layer``, ``step``, ``chunk``, ``is_clean``, ``timestep`` (labels only)."""
    grid = as_grid(grid)
    frames = (0, grid.frames)
    labels = dict(layer=-1, step=0, chunk=0, is_clean=False, timestep=0.0) | where
    return AttentionContext(**labels, scale=scale, grid=tuple(grid), query_frames=query_frames or frames,
                            key_frames=key_frames or frames, attn_mask=attn_mask)


def tokens_context(
    grid: TokenGrid | Sequence[int], scale: float, query_tokens: torch.Tensor, key_tokens: torch.Tensor
) -> AttentionContext:
    """The context of a captured record from its clip raster indices (``RecordTensors.query_tokens`` /
    ``key_tokens``), which must be runs of whole frames (a strided capture is refused in one line)."""
    grid = as_grid(grid)
    return call_context(grid, scale, grid.frame_range(query_tokens), grid.frame_range(key_tokens))


def token_coords(
    ctx: AttentionContext, frames: tuple[int, int], n: int, device: torch.device | str | None = None
) -> Coords:
    """Coordinates of the ``n`` raster tokens of ``frames``; a `ToolkitError` unless they are exactly those frames."""
    grid = as_grid(ctx.grid)
    expected = (frames[1] - frames[0]) * grid.tokens_per_frame
    if n != expected:
        raise ToolkitError(f"approximation families need raster tokens of whole frames: frames {frames[0]}-"
                           f"{frames[1] - 1} of grid {tuple(grid)} are {expected} tokens, the call has {n}")
    token = torch.arange(n, device=device) + frames[0] * grid.tokens_per_frame
    return Coords(token // grid.tokens_per_frame, (token // grid.width) % grid.height, token % grid.width)


def call_coords(
    ctx: AttentionContext, n_queries: int, n_keys: int, device: torch.device | str | None = None
) -> tuple[Coords, Coords]:
    """(query, key) coordinates of a call."""
    return (token_coords(ctx, ctx.query_frames, n_queries, device),
            token_coords(ctx, ctx.key_frames, n_keys, device))


def exact_pairs(ctx: AttentionContext, device: torch.device | str | None = None) -> torch.Tensor | None:
    """The pairs the exact attention computes: ``ctx.attn_mask`` (bool ``i j`` or ``b h i j``), None for all."""
    mask = ctx.attn_mask
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise ToolkitError(f"approximation families take a boolean attn_mask (True = attend), not {mask.dtype}")
    return mask.to(device) if device is not None else mask


def restrict(mask: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """``mask`` without the pairs the exact attention leaves out (``ctx.attn_mask``)."""
    allowed = exact_pairs(ctx, mask.device)
    return mask if allowed is None else mask & allowed


def check_rows(mask: torch.Tensor, what: str) -> torch.Tensor:
    """``mask`` unless a query row keeps no key (its softmax would be undefined)."""
    empty = ~mask.any(dim=-1)
    if bool(empty.any()):
        row = int(empty.nonzero()[0, -1])
        raise ToolkitError(f"{what}: query row {row} keeps no key (every row must keep at least one)")
    return mask


def tile_index(
    coords: Coords, tile: Tile, grid: TokenGrid | Sequence[int]
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[int, ...]]:
    """Tile of each token over the clip: (flat tile index ``n``, per-axis tile index, tiles per axis)."""
    grid = as_grid(grid)
    axes = tuple(c // t for c, t in zip(coords, tile))
    counts = tuple(math.ceil(size / t) for size, t in zip(grid, tile))  # the last tile of an axis may be partial
    flat = (axes[0] * counts[1] + axes[1]) * counts[2] + axes[2]
    return flat, axes, counts


def density(mask: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """Computed pairs / pairs the exact attention computes, per leading index of ``mask`` (float64 ``...``)."""
    allowed = exact_pairs(ctx, mask.device)
    if allowed is None:
        allowed = torch.ones(mask.shape[-2:], dtype=torch.bool, device=mask.device)
    kept = mask & allowed
    return (kept.sum(dim=(-2, -1), dtype=torch.float64)
            / torch.broadcast_to(allowed, kept.shape).sum(dim=(-2, -1), dtype=torch.float64))


def _row_blocks(n_queries: int, n_keys: int, leading: int) -> list[slice]:
    """Query-row blocks of about `exact.DEFAULT_BLOCK_ENTRIES` logits each."""
    size = exact.default_query_chunk(n_keys, leading)
    return [slice(s, min(s + size, n_queries)) for s in range(0, n_queries, size)]


def _rows(mask: torch.Tensor, rows: slice) -> torch.Tensor:
    return mask[..., rows, :]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """softmax over the kept keys of ``scale · q kᵀ``, times v: ``... i d, ... j d, ... j e, ... i j -> ... i e``,
    in the compute dtype (float64 for float64 inputs), a block of query rows at a time."""
    dt = exact.compute_dtype(q, k, v)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    leading = math.prod(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]))
    out = []
    for rows in _row_blocks(q.shape[-2], k.shape[-2], leading):
        # SDPA with a boolean mask is exactly this softmax (3-4x faster than masked_fill + softmax on the CPU)
        keep = None if mask is None else _rows(mask, rows)
        out.append(F.scaled_dot_product_attention(q[..., rows, :], k, v, attn_mask=keep, scale=scale))
    return torch.cat(out, dim=-2)


def exact_probabilities(q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext, rows: slice) -> torch.Tensor:
    """Exact attention probabilities of query ``rows`` over the keys of the call: ``... r j``."""
    logits = exact.scores(q[..., rows, :], k, ctx.scale)
    allowed = exact_pairs(ctx, q.device)
    if allowed is not None:
        logits = logits.masked_fill(~_rows(allowed, rows), -math.inf)
    return torch.softmax(logits, dim=-1)


# ---- the families ---------------------------------------------------------------------------------------------
class Approximation(NamedTuple):
    """One family on one call: output ``... i e``, mask ``... i j`` (None for a callable returning an output) and
    density ``...`` (NaN where the mask is unknown)."""

    out: torch.Tensor
    mask: torch.Tensor | None
    density: torch.Tensor


class Family:
    """Common behaviour: ``output`` and ``evaluate`` from ``mask`` (subclasses define ``mask`` and ``__str__``)."""

    def mask(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        raise NotImplementedError

    def output(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return masked_attention(q, k, v, self.mask(q, k, v, ctx), ctx.scale)

    def evaluate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> Approximation:
        mask = self.mask(q, k, v, ctx)
        return Approximation(masked_attention(q, k, v, mask, ctx.scale), mask, density(mask, ctx))

    def clip_density(self, grid: TokenGrid | Sequence[int]) -> float | None:
        """Density on a bidirectional call over the whole clip ``grid``, without data; None where it depends on
        q and k (or on more than the grid)."""
        return None


def keep_count(keep: float, available: torch.Tensor) -> torch.Tensor:
    """Key tiles a query tile keeps: ⌈keep · available⌉, at least 1 (the 1e-9 absorbs 0.14 · 50 = 7.000000000000001)."""
    return torch.ceil(keep * available.double() - 1e-9).long().clamp(min=1)


def _tile_pairs(ctx: AttentionContext, tile: Tile, n_queries: int, n_keys: int, device):
    """Flat tiles of queries and keys, whether each (query tile, key tile) has a pair the exact attention computes
    (``T T`` or ``... T T``), and the own-tile diagonal ``T T``."""
    qc, kc = call_coords(ctx, n_queries, n_keys, device)
    q_tile, _, counts = tile_index(qc, tile, ctx.grid)
    k_tile, _, _ = tile_index(kc, tile, ctx.grid)
    n_tiles = math.prod(counts)
    allowed = exact_pairs(ctx, device)
    if allowed is None:
        present = torch.zeros(n_tiles, n_tiles, dtype=torch.bool, device=device)
        present[q_tile.unique()[:, None], k_tile.unique()[None, :]] = True
    else:  # a pair per (query tile, key tile) block: pairs summed into blocks
        pairs = allowed.to(torch.float64)
        by_key = pairs.new_zeros(*pairs.shape[:-1], n_tiles).index_add_(-1, k_tile, pairs)
        present = by_key.new_zeros(*by_key.shape[:-2], n_tiles, n_tiles).index_add_(-2, q_tile, by_key) > 0
    own = torch.eye(n_tiles, dtype=torch.bool, device=device)
    return q_tile, k_tile, present, own


def top_tiles(score: torch.Tensor, present: torch.Tensor, own: torch.Tensor, keep: float) -> torch.Tensor:
    """Per query tile, the own tile and the highest-scoring others among the present key tiles, ⌈keep · present⌉
    in all: bool ``... T T``. Among equal scores the choice is torch.topk's (exact ties have measure zero in real
    attention; a stable full sort took 6x as long as topk on one per-token KV-cache call of the bundled model,
    5 x 1,920 x 7,680 scores, 2 CPU cores)."""
    ranked = score.masked_fill(~present, -math.inf).masked_fill(own & present, math.inf)
    count = keep_count(keep, present.sum(-1))  # ... T
    top = ranked.topk(int(count.max()), dim=-1).indices  # ... T K, best first
    wanted = torch.arange(top.shape[-1], device=top.device) < count.unsqueeze(-1)
    kept = torch.zeros(ranked.shape, dtype=torch.bool, device=ranked.device)
    return kept.scatter_(-1, top, wanted.expand_as(top)) & present


def _expand_tiles(kept: torch.Tensor, q_tile: torch.Tensor, k_tile: torch.Tensor) -> torch.Tensor:
    """Tile mask ``... T T`` -> token mask ``... i j``."""
    return kept[..., q_tile[:, None], k_tile[None, :]]


def _check_tile(tile: Tile) -> Tile:
    tile = tuple(int(t) for t in tile)
    if len(tile) != 3 or min(tile) < 1:
        raise ToolkitError(f"a tile is (frames, rows, columns), each at least 1, not {tile}")
    return tile  # type: ignore[return-value]


@dataclass(frozen=True)
class OracleBlockTopK(Family):
    """Oracle block top-k: per query tile keep the ⌈keep · n⌉ of its n key tiles with the most *exact* attention
    mass Σ_(i∈query tile, j∈key tile) P_ij (its own tile always among them), softmax over the kept keys."""

    keep: float
    tile: Tile

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise ToolkitError(f"block top-k keeps a fraction in (0, 1] of the key tiles, not {self.keep}")
        object.__setattr__(self, "tile", _check_tile(self.tile))

    def __str__(self) -> str:
        return f"blocktopk:{self.keep:g}:{','.join(map(str, self.tile))}"

    def clip_density(self, grid: TokenGrid | Sequence[int]) -> float | None:
        """⌈keep · n⌉ / n over n equal tiles when the tiles divide the grid (else tiles differ in size: None)."""
        grid = as_grid(grid)
        if any(size % t for size, t in zip(grid, self.tile)):
            return None
        n = math.prod(size // t for size, t in zip(grid, self.tile))
        return int(keep_count(self.keep, torch.tensor(n))) / n

    def block_mass(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext, q_tile: torch.Tensor,
                   k_tile: torch.Tensor, n_tiles: int) -> torch.Tensor:
        """Exact attention mass of every (query tile, key tile) block: ``... T T`` (compute dtype)."""
        leading = math.prod(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]))
        mass = None
        for rows in _row_blocks(q.shape[-2], k.shape[-2], leading):
            p = exact_probabilities(q, k, ctx, rows)  # ... r j
            by_key = p.new_zeros(*p.shape[:-1], n_tiles).index_add_(-1, k_tile, p)  # ... r T
            part = by_key.new_zeros(*p.shape[:-2], n_tiles, n_tiles).index_add_(-2, q_tile[rows], by_key)
            mass = part if mass is None else mass + part
        return mass

    def mask(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.tile == (1, 1, 1):
            return check_rows(restrict(self.token_mask(q, k, ctx), ctx), str(self))
        q_tile, k_tile, present, own = _tile_pairs(ctx, self.tile, q.shape[-2], k.shape[-2], q.device)
        mass = self.block_mass(q, k, ctx, q_tile, k_tile, own.shape[0])
        kept = top_tiles(mass, present, own, self.keep)
        return check_rows(restrict(_expand_tiles(kept, q_tile, k_tile), ctx), str(self))


    @torch.no_grad()
    def token_mask(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """One-token tiles (per-row oracle top-k): the same selection by :func:`top_tiles`, on the ``... i j``
        pairs of the call instead of the ``T T`` tiles of the whole clip (a block's mass is then its probability,
        which ranks within a row as the logit does), so a training step holds no clip-sized tile matrix."""
        qc, kc = call_coords(ctx, q.shape[-2], k.shape[-2], q.device)
        grid = as_grid(ctx.grid)
        token = lambda c: (c.frame * grid.height + c.row) * grid.width + c.col  # noqa: E731
        own = token(qc)[:, None] == token(kc)[None, :]
        allowed = exact_pairs(ctx, q.device)
        present = own.new_ones(own.shape) if allowed is None else allowed
        return top_tiles(exact.scores(q, k, ctx.scale), present, own, self.keep)


@dataclass(frozen=True)
class PredictedBlockTopK(OracleBlockTopK):
    """Predicted block top-k (VSA / SpargeAttn / XAttention style): the same selection, ranked by the pooled
    score softmax_(key tiles)(scale · q̄_query_tile · k̄_key_tile) with q̄, k̄ the mean q and k of a tile's tokens in
    the call (the softmax is monotone, so ranking the pooled logits is the same)."""

    def __str__(self) -> str:
        return f"blocktopk-pred:{self.keep:g}:{','.join(map(str, self.tile))}"

    def pooled_scores(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext, q_tile: torch.Tensor,
                      k_tile: torch.Tensor, n_tiles: int) -> torch.Tensor:
        """scale · q̄ k̄ᵀ over tiles: ``... T T`` (tiles without tokens pool to zero; they are never present)."""
        dt = exact.compute_dtype(q, k)

        def pooled(x: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:  # ... n d -> ... T d
            total = x.new_zeros(*x.shape[:-2], n_tiles, x.shape[-1], dtype=dt).index_add_(-2, tiles, x.to(dt))
            ones = torch.ones_like(tiles, dtype=dt)
            count = torch.zeros(n_tiles, dtype=dt, device=x.device).index_add_(0, tiles, ones)
            return total / count.clamp(min=1).unsqueeze(-1)

        return torch.matmul(pooled(q, q_tile), pooled(k, k_tile).transpose(-1, -2)) * ctx.scale

    def mask(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        q_tile, k_tile, present, own = _tile_pairs(ctx, self.tile, q.shape[-2], k.shape[-2], q.device)
        score = self.pooled_scores(q, k, ctx, q_tile, k_tile, own.shape[0])
        kept = top_tiles(score, present, own, self.keep)
        return check_rows(restrict(_expand_tiles(kept, q_tile, k_tile), ctx), str(self))


def window_start(centre: torch.Tensor, size: int, low: int, high: int) -> torch.Tensor:
    """First tile of a window of ``size`` tiles around ``centre`` shifted to lie inside tiles ``low..high``."""
    size = min(size, high - low + 1)
    return (centre - size // 2).clamp(min=low, max=high - size + 1)


@dataclass(frozen=True)
class SlidingTileAttention(Family):
    """STA: every query tile attends the key tiles of a ``window`` (tiles per axis) around it, the window shifted
    (not cropped) to stay inside the key tiles of the call, so every query tile sees the same number of tiles."""

    window: Tile
    tile: Tile

    def __post_init__(self) -> None:
        object.__setattr__(self, "tile", _check_tile(self.tile))
        object.__setattr__(self, "window", _check_tile(self.window))

    def __str__(self) -> str:
        return f"sta:{','.join(map(str, self.window))}:{','.join(map(str, self.tile))}"

    def clip_density(self, grid: TokenGrid | Sequence[int]) -> float:
        """The window is a product over axes, so its pairs are the product of each axis's kept coordinate pairs."""
        kept = 1.0
        for n, size, t in zip(as_grid(grid), self.window, self.tile):
            tiles = torch.arange(n) // t
            count = math.ceil(n / t)
            start = window_start(tiles, size, 0, count - 1)[:, None]
            kept *= float(((tiles[None, :] >= start) & (tiles[None, :] < start + min(size, count))).sum()) / n**2
        return kept

    def mask(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        qc, kc = call_coords(ctx, q.shape[-2], k.shape[-2], q.device)
        _, q_axes, counts = tile_index(qc, self.tile, ctx.grid)
        _, k_axes, _ = tile_index(kc, self.tile, ctx.grid)
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
        for qa, ka, size, n in zip(q_axes, k_axes, self.window, counts):
            low, high = (int(ka.min()), int(ka.max())) if ka.numel() else (0, n - 1)  # frames: the keys' own
            start = window_start(qa, size, low, high)[:, None]
            mask &= (ka[None, :] >= start) & (ka[None, :] < start + min(size, high - low + 1))
        return check_rows(restrict(mask, ctx), str(self))


def decay_band(distance: torch.Tensor, dense_frames: int) -> torch.Tensor:
    """⌊log2(d / max(dense_frames, 1))⌋ for frame distances d > dense_frames, in integers (no float log)."""
    ratio = distance // max(dense_frames, 1)
    band = torch.zeros_like(distance)
    for power in range(1, max(int(ratio.max()), 1).bit_length()):
        band += (ratio >= 2**power).long()
    return band


@dataclass(frozen=True)
class RadialAttention(Family):
    """Radial attention (static): pairs at frame distance d ≤ ``dense_frames`` are all kept; farther pairs keep the
    spatial window max(|Δrow|, |Δcol|) ≤ ⌊radius / 2^b⌋ with b = ⌊log2(d / max(dense_frames, 1))⌋, so the window
    halves each time the frame distance doubles, down to the key at the same position."""

    dense_frames: int
    radius: int

    def __post_init__(self) -> None:
        if self.dense_frames < 0 or self.radius < 0:
            raise ToolkitError(f"radial attention needs DENSE_FRAMES >= 0 and RADIUS >= 0, not {self}")

    def __str__(self) -> str:
        return f"radial:{self.dense_frames},{self.radius}"

    def clip_density(self, grid: TokenGrid | Sequence[int]) -> float:
        """Σ over frame pairs of the spatial pairs within that pair's radius; a Chebyshev square is a product of a
        row band and a column band."""
        grid = as_grid(grid)
        frames = torch.arange(grid.frames)
        radius = self.window((frames[None, :] - frames[:, None]).abs())  # f f
        row_gap = (torch.arange(grid.height)[None, :] - torch.arange(grid.height)[:, None]).abs().flatten()
        col_gap = (torch.arange(grid.width)[None, :] - torch.arange(grid.width)[:, None]).abs().flatten()
        rows = (row_gap[None, :] <= radius.flatten()[:, None]).sum(-1)  # per frame pair
        cols = (col_gap[None, :] <= radius.flatten()[:, None]).sum(-1)
        return float((rows * cols).sum()) / grid.n_tokens**2

    def window(self, distance: torch.Tensor) -> torch.Tensor:
        """Spatial radius kept at each frame distance (beyond any offset of the grid where dense)."""
        decayed = torch.full_like(distance, self.radius) // 2 ** decay_band(distance, self.dense_frames)
        return torch.where(distance <= self.dense_frames, torch.iinfo(torch.long).max, decayed)

    def mask(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        call_coords(ctx, q.shape[-2], k.shape[-2])  # refuses calls that are not whole frames
        grid = as_grid(ctx.grid)
        q_frames = torch.arange(*ctx.query_frames, device=q.device)
        k_frames = torch.arange(*ctx.key_frames, device=q.device)
        radius = self.window((k_frames[None, :] - q_frames[:, None]).abs())  # fq fk
        position = token_coords(ctx, (0, 1), grid.tokens_per_frame, q.device)  # the p positions of one frame
        offset = torch.maximum((position.row[None, :] - position.row[:, None]).abs(),
                               (position.col[None, :] - position.col[:, None]).abs())  # p p
        # raster order is frame-major: (fq p) (fk p') = offset[p, p'] <= radius[fq, fk]
        mask = (offset[None, :, None, :] <= radius[:, None, :, None]).reshape(q.shape[-2], k.shape[-2])
        return check_rows(restrict(mask, ctx), str(self))


def sampled_rows(n_queries: int, rows: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``rows`` query rows spread evenly over ``n_queries`` (all when rows ≥ n_queries), sorted, distinct."""
    if rows >= n_queries:
        return torch.arange(n_queries, device=device)
    return torch.linspace(0, n_queries - 1, rows, dtype=torch.float64, device=device).round().long().unique()


@dataclass(frozen=True)
class SparseVideoGen(Family):
    """Sparse VideoGen: per head, the exact output of ``rows`` sampled query rows is compared with the outputs of
    the spatial mask (|Δframe| ≤ ``frame_band``) and the temporal mask (max(|Δrow|, |Δcol|) ≤ ``spatial_band``, any
    frame); the mask with the lower mean squared error on those rows (spatial on a tie) is applied to all rows."""

    rows: int
    frame_band: int
    spatial_band: int

    def __post_init__(self) -> None:
        if self.rows < 1 or self.frame_band < 0 or self.spatial_band < 0:
            raise ToolkitError(f"Sparse VideoGen needs ROWS >= 1 and bands >= 0, not {self}")

    def __str__(self) -> str:
        return f"svg:{self.rows}:{self.frame_band},{self.spatial_band}"

    def candidate_masks(
        self, ctx: AttentionContext, n_queries: int, n_keys: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(spatial, temporal) masks ``i j`` (or ``... i j`` with an attn_mask)."""
        qc, kc = call_coords(ctx, n_queries, n_keys, device)
        spatial = (kc.frame[None, :] - qc.frame[:, None]).abs() <= self.frame_band
        temporal = ((kc.row[None, :] - qc.row[:, None]).abs() <= self.spatial_band) & (
            (kc.col[None, :] - qc.col[:, None]).abs() <= self.spatial_band)
        return restrict(spatial, ctx), restrict(temporal, ctx)

    def is_spatial(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
        candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Which heads (leading indices) take the spatial mask: bool ``...``."""
        spatial, temporal = candidates or self.candidate_masks(ctx, q.shape[-2], k.shape[-2], q.device)
        rows = sampled_rows(q.shape[-2], self.rows, q.device)
        allowed = exact_pairs(ctx, q.device)
        pick = (lambda m: None if m is None else m[..., rows, :])  # noqa: E731
        qs = q[..., rows, :]
        reference = masked_attention(qs, k, v, pick(allowed), ctx.scale)
        error = [(masked_attention(qs, k, v, pick(m), ctx.scale) - reference).square().mean(dim=(-2, -1))
                 for m in (spatial, temporal)]
        return error[0] <= error[1]

    def mask(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        spatial, temporal = self.candidate_masks(ctx, q.shape[-2], k.shape[-2], q.device)
        choice = self.is_spatial(q, k, v, ctx, (spatial, temporal))[..., None, None]
        return check_rows(torch.where(choice, spatial, temporal), str(self))


@dataclass(frozen=True)
class UserFamily(Family):
    """A researcher's own approximation: ``module:function`` names ``f(q, k, v, ctx)`` taking seam-shaped tensors
    (q ``b i h d``, k and v ``b j h d``) and returning either the approximate output ``b i h e`` or a boolean mask
    (``i j``, ``h i j`` or ``b h i j``, True = computed; softmax restricted to it, and to the exact attention's
    pairs). A callable returning an output has no density (NaN)."""

    module: str
    function: str
    fn: Callable = field(compare=False, repr=False)

    def __str__(self) -> str:
        return f"py:{self.module}:{self.function}"

    def call(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Run the callable on heads-first ``... i d`` inputs; its answer in the seam's layout."""
        seam = [(x if x.dim() == 4 else x.unsqueeze(0)).transpose(1, 2) for x in (q, k, v)]
        return self.fn(*seam, ctx)

    def _as_mask(self, answer: torch.Tensor, q, k, ctx) -> torch.Tensor:
        shape = (*q.shape[:-2], q.shape[-2], k.shape[-2])
        while answer.dim() > len(shape):  # b h i j for heads-first ``h i d`` inputs: the single batch
            answer = answer.squeeze(0)
        try:
            answer = torch.broadcast_to(answer, shape)
        except RuntimeError:
            raise ToolkitError(f"{self}: the mask has shape {tuple(answer.shape)}, the call needs {shape}") from None
        return check_rows(restrict(answer.to(q.device), ctx), str(self))

    def mask(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        answer = self.call(q, k, v, ctx)
        if answer.dtype != torch.bool:
            raise ToolkitError(f"{self} returns an output, not a mask")
        return self._as_mask(answer, q, k, ctx)

    def output(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return self.evaluate(q, k, v, ctx).out

    def evaluate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> Approximation:
        answer = self.call(q, k, v, ctx)
        if answer.dtype == torch.bool:
            mask = self._as_mask(answer, q, k, ctx)
            return Approximation(masked_attention(q, k, v, mask, ctx.scale), mask, density(mask, ctx))
        out = answer.transpose(1, 2)  # b i h e -> b h i e
        out = out if q.dim() == 4 else out.squeeze(0)
        if out.shape != (*q.shape[:-1], v.shape[-1]):
            raise ToolkitError(f"{self}: the output has shape {tuple(answer.shape)} in the seam layout b i h e, "
                               f"expected {(1, q.shape[-2], *q.shape[-3:-2], v.shape[-1])}")
        return Approximation(out, None, torch.full(q.shape[:-2], math.nan, dtype=torch.float64))


# ---- specs ----------------------------------------------------------------------------------------------------
def _numbers(text: str, kind: type, count: int) -> tuple | None:
    try:
        values = tuple(kind(x) for x in text.split(","))
    except ValueError:
        return None
    return values if len(values) == count else None


def _user_family(spec: str, rest: str) -> UserFamily:
    module, _, function = rest.rpartition(":")
    if not module or not function:
        raise ToolkitError(f"--attention {spec!r}: expected py:MODULE:FUNCTION (e.g. py:my_ideas:sparse_mask)")
    try:
        fn = getattr(importlib.import_module(module), function)
    except ImportError as err:
        raise ToolkitError(f"--attention {spec!r}: cannot import module {module!r} ({err})") from None
    except AttributeError:
        raise ToolkitError(f"--attention {spec!r}: module {module!r} has no {function!r}") from None
    except Exception as err:  # a user module that fails while importing: one line, not its traceback
        raise ToolkitError(f"--attention {spec!r}: importing {module!r} failed: {type(err).__name__}: {err}") from None
    if not callable(fn):
        raise ToolkitError(f"--attention {spec!r}: {module}.{function} is not callable")
    return UserFamily(module, function, fn)


FAMILY_NAMES = ("blocktopk", "blocktopk-pred", "sta", "radial", "svg", "py")
_FORM_HELP = {
    "blocktopk": "KEEP in (0, 1] of the key tiles, tiles of TF x TH x TW tokens >= 1; e.g. blocktopk:0.1:1,4,4",
    "blocktopk-pred": "KEEP in (0, 1] of the key tiles, tiles of TF x TH x TW tokens >= 1; e.g. "
                      "blocktopk-pred:0.1:1,4,4",
    "sta": "window WF x WH x WW in tiles >= 1, tiles of TF x TH x TW tokens >= 1; e.g. sta:3,3,3:1,4,4",
    "radial": "frame distance kept dense >= 0, spatial radius beyond it >= 0; e.g. radial:1,4",
    "svg": "ROWS sampled per head >= 1, frame band and spatial band >= 0; e.g. svg:16:1,0",
}


def parse_family(spec: str) -> Family | None:
    """A backend spec -> its family; None when the name is not a family's (one-line errors for bad parameters)."""
    spec = spec.strip()
    name, _, rest = spec.partition(":")
    if name not in FAMILY_NAMES:
        return None
    if name == "py":
        return _user_family(spec, rest)
    form = FAMILY_FORMS[FAMILY_NAMES.index(name)]
    parts = rest.split(":") if rest else []
    family = None
    if name in ("blocktopk", "blocktopk-pred") and len(parts) == 2:
        keep, tile = _numbers(parts[0], float, 1), _numbers(parts[1], int, 3)
        if keep and tile and 0 < keep[0] <= 1 and min(tile) >= 1:
            family = (OracleBlockTopK if name == "blocktopk" else PredictedBlockTopK)(keep[0], tile)
    elif name == "sta" and len(parts) == 2:
        window, tile = _numbers(parts[0], int, 3), _numbers(parts[1], int, 3)
        if window and tile and min(window + tile) >= 1:
            family = SlidingTileAttention(window, tile)
    elif name == "radial" and len(parts) == 1:
        values = _numbers(parts[0], int, 2)
        if values and min(values) >= 0:
            family = RadialAttention(*values)
    elif name == "svg" and len(parts) == 2:
        rows, bands = _numbers(parts[0], int, 1), _numbers(parts[1], int, 2)
        if rows and bands and rows[0] >= 1 and min(bands) >= 0:
            family = SparseVideoGen(rows[0], *bands)
    if family is None:
        raise ToolkitError(f"--attention {spec!r}: expected {form} ({_FORM_HELP[name]})")
    return family


def family_backend(family: Family) -> Backend:
    """The seam backend computing ``family``: q ``b i h d``, k/v ``b j h d`` -> ``b i h d`` in q's dtype."""

    def backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        heads_first = [x.transpose(1, 2) for x in (q, k, v)]  # b h n d
        return family.output(*heads_first, ctx).transpose(1, 2).to(q.dtype)

    backend.__name__ = "family_" + "".join(c if c.isalnum() else "_" for c in str(family))
    return backend
