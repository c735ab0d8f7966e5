r"""Reference Monarch attention: variational MonarchAttention (T ≥ 1) and the exact Frobenius projection.

Written to be obviously correct, not fast: every tensor of the paper's algorithm is materialised, computation is in
float64 for float64 inputs (float32 otherwise). The Triton kernels (``toolkit.kernels``) are tested against
:func:`monarch_attention` in float64.

Index conventions (``docs/monarch.md`` "The Monarch matrix"; ``toolkit.grid``). A
:class:`~toolkit.grid.MonarchLayout` maps raster tokens to (tile a, row i, column j); queries and keys use the same
map, keys written (tile f, row k, column l). Per head

    M[(a,i,j), (f,k,l)] = L[a, j, i, f, k] · R[a, f, k, j, l],      Σ_l R = 1,   Σ_(f,k) L = 1

stored as ``L: ... A b2 b1 F b1`` (dims a, j, i, f, k) and ``R: ... A F b1 b2 b2`` (dims a, f, k, j, l), where
A = query tiles and F = key tiles of the given frame ranges. The paper's layout is the ``fh,w`` base with tiling
(f_tied, h_reduce, w_reduce); framewise (1,1,1) has a = query frame, f = key frame, i/k = latent row, j/l = column.

Variational MonarchAttention (``docs/monarch.md`` "MonarchAttention (variational)") maximises
Σ_rows ⟨M_row, S_row⟩ + H(M_row), S = scale · q kᵀ, by alternating closed-form maximisers. With q̃ = √scale·q,
k̃ = √scale·k:

    init    q̄[a,f,k,j] = q̃[a,k,j]                                   (L = identity over (k, i))
    R-step  R[a,f,k,j,·] = softmax_l( q̄[a,f,k,j] · k̃[f,k,l] )
    L-step  α_L[a,f,j,k] = Σ_l R k̃[f,k,l],   c_L[a,f,j,k] = Σ_l R log R
            L[a,j,i,·]   = softmax_(f,k) over allowed key tiles f of ( q̃[a,i,j] · α_L[a,f,j,k] − c_L[a,f,j,k] )
    refine  q̄[a,f,k,j] = Σ_i L[a,j,i,f,k] q̃[a,i,j] / Σ_i L[a,j,i,f,k]            (before each further round)
    output  Y[a,f,j,k] = Σ_l R v[f,k,l],   out[a,i,j] = Σ_(f,k) L[a,j,i,f,k] Y[a,f,j,k]

T iterations = T R-steps and T L-steps (T = 1 is the paper's default and the kernels' only path).

``r_step`` (:data:`R_STEPS`) picks the R-step for T > 1. ``"exact"`` (default): the refine step is the exact
maximiser q̄ = α_R / c_R (α_R = Σ_i L q̃, c_R = Σ_i L), so the objective never decreases. ``"monarchrt"``: the
MonarchRT authors' update for T > 1 (their PyTorch path ``monarch_attn_slow``, the only one they have for T > 1,
used for their T = 8/10/20 runs): R logits (α_R · k̃) · min(1/(c_R + 1e-6), 1e4), with c_R = 1 at the first R-step
(so even that one is scaled by 1/(1 + 1e-6)). At T = 1 their ``monarch_attn`` runs the one-step op instead, which
is the exact update, so ``"monarchrt"`` at T = 1 is identical to ``"exact"``. The two are *not* close in general:
the 1e-6 shifts the temperature by ~1e-6 relative on ordinary inputs, but once the 1e4 clamp is active
(c_R < 1e-4: query rows that put almost no L-mass on a key row, i.e. sharp maps) the R-logits are scaled down by
up to orders of magnitude. Measured in float64 (grid 6×6×10, d = 8, scale d^-1/2, random q, k of std s;
relative L2 of the output per head, worst of 2 heads × 2 seeds, layouts fh,w (1,1,1), (1,2,1) and contiguous
4×15): s = 1–1.5 gives 4e-6–2e-5 at T = 2–3 and up to 5.4e-4 at T = 10; sharp inputs s = 3 give 0.21–0.32 at
T = 2–3 (0.35–0.46 at T = 10) and s = 5 give 0.44–0.61 (``tests/test_monarch_r_step.py``,
``test_monarchrt_r_step_on_sharp_inputs``).
The clamped update is not an exact maximiser, so its objective need not be monotone (``docs/monarch.md``
"MonarchAttention (variational)").

Modes (``query_frames``, ``key_frames``, ``block_causal_frames``):
* bidirectional clip: queries and keys are the whole clip (the defaults);
* block-causal, no cache (training): ``block_causal_frames=3`` — query tile a sees key tiles f whose chunk
  ``frame // 3`` is ≤ its own; tiles must not straddle chunks;
* KV cache: queries = one chunk's frames, keys = the cached frames up to the end of that chunk, no mask.
Softmaxes (L's over (f,k)) run only over allowed key tiles, as in MonarchRT's ``monarch_attn_causal_ref``.

Exact projection (``docs/monarch.md`` "Exact projection"): argmin ‖P − M‖_F over M with every (a,j,f,k) slice of
rank ≤ 1 (rows not re-normalised) is the best rank-1 approximation of each slice; computed query tile by query
tile from q, k and the row LSE, so a 32,760-key head never holds its whole map. Since every variational M lies in
the same set, its map error lower-bounds theirs.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from toolkit.attention import exact
from toolkit.errors import ToolkitError
from toolkit.grid import MonarchLayout, TokenGrid, as_grid

if TYPE_CHECKING:
    from toolkit.models.seam import AttentionContext

# Entries of one exact probability block in the tile loops.
DEFAULT_BLOCK_ENTRIES = exact.DEFAULT_BLOCK_ENTRIES

# R-step variants of the variational iteration (module docstring): the exact maximiser, or the MonarchRT authors'
# clamped update with these two constants (their ``monarch_attn_slow``: (1 / (c_R + eps)).clamp_max(max_inv)).
R_STEPS = ("exact", "monarchrt")
MONARCHRT_EPS = 1e-6
MONARCHRT_MAX_INV = 1e4


def check_r_step(r_step: str) -> str:
    """``r_step`` if it is one of :data:`R_STEPS`, else a `ToolkitError`."""
    if r_step not in R_STEPS:
        raise ToolkitError(f"r_step must be one of {', '.join(R_STEPS)}, not {r_step!r}")
    return r_step


@dataclass
class MonarchFactors:
    """Factors of a Monarch map over the tiles of ``query_frames`` × ``key_frames`` (shapes in module docstring).

    ``allowed[a, f]`` marks key tiles f that query tile a may attend; L is zero elsewhere.
    """

    L: torch.Tensor  # ... a j i f k
    R: torch.Tensor  # ... a f k j l
    layout: MonarchLayout
    query_frames: tuple[int, int]
    key_frames: tuple[int, int]
    allowed: torch.Tensor  # bool a f

    def output(self, v: torch.Tensor) -> torch.Tensor:
        """M v for raster ``v: ... j d`` -> raster ``... i d``."""
        vt = self.layout.permute(v.to(self.R.dtype), dim=-2, frames=self.key_frames)  # ... f k l d
        y = torch.einsum("...afkjl,...fkld->...afjkd", self.R, vt)
        out = torch.einsum("...ajifk,...afjkd->...aijd", self.L, y)
        return self.layout.unpermute(out, dim=-4, frames=self.query_frames)

    def tile_rows(self, tiles: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Map rows of query ``tiles`` in tile order: ``... a i j f k l`` (small inputs / one tile group)."""
        sel = slice(None) if tiles is None else tiles
        return torch.einsum("...ajifk,...afkjl->...aijfkl", self.L[..., sel, :, :, :, :], self.R[..., sel, :, :, :, :])

    def dense(self) -> torch.Tensor:
        """The whole map in raster order ``... i j`` (small inputs only)."""
        m = self.tile_rows().flatten(-3)  # ... a i j (f k l)
        m = self.layout.unpermute(m, dim=-4, frames=self.query_frames)  # ... i (f k l)
        return self.layout.unpermute(m.unflatten(-1, self.R.shape[-4:-3] + self.R.shape[-3:-2] + self.R.shape[-1:]),
                                     dim=-3, frames=self.key_frames)

    def objective(self, q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """Σ over query rows of ⟨M_row, S_row⟩ + H(M_row), S = scale · q kᵀ: ``...``.

        Uses H(M_row) = H(L_row) + Σ_(f,k) L·H(R) (M_row is a joint distribution with marginal L, conditional R),
        so ⟨M_row, S_row⟩ + H(M_row) = Σ L (q̃·α_L − c_L) − Σ L log L. Valid for row-stochastic L and R."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        qt = self.layout.permute(q.to(self.R.dtype), dim=-2, frames=self.query_frames) * math.sqrt(scale)
        kt = self.layout.permute(k.to(self.R.dtype), dim=-2, frames=self.key_frames) * math.sqrt(scale)
        alpha_l = torch.einsum("...afkjl,...fkld->...afjkd", self.R, kt)
        c_l = torch.special.xlogy(self.R, self.R).sum(-1).transpose(-1, -2)  # ... a f j k
        beta_l = torch.einsum("...aijd,...afjkd->...ajifk", qt, alpha_l) - c_l.permute(
            *range(c_l.dim() - 4), -4, -2, -3, -1
        ).unsqueeze(-3)
        value = (self.L * beta_l.masked_fill(self.L == 0, 0)).sum((-1, -2)) - torch.special.xlogy(self.L, self.L).sum(
            (-1, -2)
        )
        return value.sum((-1, -2, -3))


@dataclass
class MonarchErrors:
    """Error sums of an approximation M of the exact map P (per leading index, e.g. per head)."""

    sq_error: torch.Tensor  # Σ (P − M)² over allowed entries
    p_sq: torch.Tensor  # Σ P²
    n_entries: int  # allowed map entries (query rows × attended keys)
    out_sq_error: torch.Tensor | None = None  # Σ ((P − M) v)²
    out_sq: torch.Tensor | None = None  # Σ (P v)²

    @property
    def map_mse(self) -> torch.Tensor:
        return self.sq_error / self.n_entries

    @property
    def rel_frobenius(self) -> torch.Tensor:
        return (self.sq_error / self.p_sq).sqrt()

    @property
    def out_rel_l2(self) -> torch.Tensor | None:
        return None if self.out_sq is None else (self.out_sq_error / self.out_sq).sqrt()


# ---- problem set-up shared by the variational and the projection paths -------------------------------------
def _frames(frames: tuple[int, int] | None, grid: TokenGrid) -> tuple[int, int]:
    return (0, grid.frames) if frames is None else (int(frames[0]), int(frames[1]))


def allowed_tiles(
    layout: MonarchLayout,
    query_frames: tuple[int, int],
    key_frames: tuple[int, int],
    block_causal_frames: int | None = None,
) -> torch.Tensor:
    """``allowed[a, f]`` (bool, A × F): key tile f visible to query tile a (all True without block causality)."""
    q_ids, _ = layout.tiles_of_frames(query_frames)
    k_ids, _ = layout.tiles_of_frames(key_frames)
    if block_causal_frames is None:
        return torch.ones(len(q_ids), len(k_ids), dtype=torch.bool)
    first, last = layout.tile_frames()
    chunk = first // block_causal_frames
    if not torch.equal(chunk, last // block_causal_frames):
        raise ToolkitError(f"{layout.name} tiles straddle {block_causal_frames}-frame chunks")
    allowed = chunk[k_ids][None, :] <= chunk[q_ids][:, None]
    if not allowed.any(1).all():
        raise ToolkitError("some query tiles have no visible key tile (keys must reach the end of each chunk)")
    return allowed


def _resolve_layout(grid, tiling, layout: MonarchLayout | None) -> MonarchLayout:
    if layout is not None:
        if grid is not None and tuple(as_grid(grid)) != tuple(layout.grid):
            raise ToolkitError(f"layout grid {tuple(layout.grid)} differs from grid {tuple(as_grid(grid))}")
        return layout
    return MonarchLayout.aligned(grid, "fh,w", tiling)


# ---- variational MonarchAttention ----------------------------------------------------------------------------
def variational(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: MonarchLayout,
    *,
    query_frames: tuple[int, int] | None = None,
    key_frames: tuple[int, int] | None = None,
    block_causal_frames: int | None = None,
    iters: int = 1,
    scale: float | None = None,
    on_iteration: Callable[[MonarchFactors], None] | None = None,
    r_step: str = "exact",
) -> tuple[torch.Tensor, MonarchFactors]:
    """Variational MonarchAttention on head-leading tensors: q ``... i d``, k/v ``... j d`` -> (out ``... i d``,
    factors). ``on_iteration`` is called with the factors after every L-step (for objective traces).
    ``r_step``: ``"exact"`` or ``"monarchrt"`` (the authors' clamped update for iters > 1; module docstring). With
    ``"monarchrt"`` and iters > 1, the factors after iteration 1 are those of the authors' T > 1 path (first R-step
    scaled by 1/(1 + 1e-6)), not of their T = 1 op."""
    if iters < 1:
        raise ToolkitError("MonarchAttention needs iters >= 1")
    clamped = check_r_step(r_step) == "monarchrt" and iters > 1  # the authors run the exact one-step op at T = 1
    qf, kf = _frames(query_frames, layout.grid), _frames(key_frames, layout.grid)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dt = exact.compute_dtype(q, k, v)
    allowed = allowed_tiles(layout, qf, kf, block_causal_frames).to(q.device)
    qt = layout.permute(q.to(dt), dim=-2, frames=qf) * math.sqrt(scale)  # ... a i j d
    kt = layout.permute(k.to(dt), dim=-2, frames=kf) * math.sqrt(scale)  # ... f k l d
    n_key_tiles = kt.shape[-4]
    # q̄[a,f,k,j]: the query each R row is fitted to; initially the query with the same row index k
    q_bar = qt.unsqueeze(-4).expand(*qt.shape[:-3], n_key_tiles, *qt.shape[-3:])  # ... a f k j d
    hidden = ~allowed[:, None, None, :, None]  # broadcast to ... a j i f k
    # monarchrt: q̄ holds α_R (unnormalised) and the logits are multiplied by min(1/(c_R + eps), max_inv); c_R = 1
    r_scale = torch.tensor(1.0 / (1.0 + MONARCHRT_EPS), dtype=dt, device=q.device) if clamped else None
    for it in range(iters):
        # R-step
        logits = torch.einsum("...afkjd,...fkld->...afkjl", q_bar, kt)
        if r_scale is not None:
            logits = logits * r_scale.unsqueeze(-1) if r_scale.dim() else logits * r_scale
        R = torch.softmax(logits, dim=-1)
        # L-step
        alpha_l = torch.einsum("...afkjl,...fkld->...afjkd", R, kt)
        c_l = torch.special.xlogy(R, R).sum(-1)  # ... a f k j
        beta_l = torch.einsum("...aijd,...afjkd->...ajifk", qt, alpha_l)
        beta_l = beta_l - c_l.permute(*range(c_l.dim() - 4), -4, -1, -3, -2).unsqueeze(-3)  # c_L[a,j,·,f,k]
        beta_l = beta_l.masked_fill(hidden, -math.inf)
        L = torch.softmax(beta_l.flatten(-2), dim=-1).unflatten(-1, beta_l.shape[-2:])
        if on_iteration is not None:
            on_iteration(MonarchFactors(L, R, layout, qf, kf, allowed))
        if it + 1 < iters:
            # refine: q̄ = Σ_i L q̃ / Σ_i L (the closed-form R maximiser given L); zero mass -> q̄ = 0, uniform R
            alpha_r = torch.einsum("...ajifk,...aijd->...afkjd", L, qt)
            c_r = L.sum(-3).permute(*range(L.dim() - 5), -4, -2, -1, -3)  # ... a f k j
            if clamped:  # the authors' update: α_R · k̃ scaled by min(1/(c_R + 1e-6), 1e4)
                q_bar, r_scale = alpha_r, (1.0 / (c_r + MONARCHRT_EPS)).clamp_max(MONARCHRT_MAX_INV)
            else:
                q_bar = alpha_r / c_r.clamp_min(torch.finfo(dt).tiny).unsqueeze(-1)
    factors = MonarchFactors(L, R, layout, qf, kf, allowed)
    return factors.output(v.to(dt)), factors


def monarch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: TokenGrid | Sequence[int] | None,
    tiling: tuple[int, int, int] = (1, 1, 1),
    *,
    query_frames: tuple[int, int] | None = None,
    key_frames: tuple[int, int] | None = None,
    block_causal_frames: int | None = None,
    iters: int = 1,
    scale: float | None = None,
    return_factors: bool = False,
    layout: MonarchLayout | None = None,
    r_step: str = "exact",
) -> torch.Tensor | tuple[torch.Tensor, MonarchFactors]:
    """Seam-shaped MonarchAttention: q ``b i h d`` (tokens of ``query_frames``, raster order), k/v ``b j h d``
    (tokens of ``key_frames``) -> out ``b i h d`` in q's dtype.

    ``grid`` = (frames, height, width) of the whole clip; ``tiling`` = (f_tied, h_reduce, w_reduce) of the paper's
    ``fh,w`` base (or pass any ``layout``, e.g. another aligned base or a contiguous control). Factors are
    head-leading: ``L: b h a j i f k``, ``R: b h a f k j l``. ``r_step``: ``"exact"`` (default) or ``"monarchrt"``,
    the authors' clamped R-step for iters > 1 (module docstring)."""
    lay = _resolve_layout(grid, tiling, layout)
    out, factors = variational(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lay, query_frames=query_frames,
        key_frames=key_frames, block_causal_frames=block_causal_frames, iters=iters, scale=scale, r_step=r_step,
    )
    out = out.transpose(1, 2).to(q.dtype)
    return (out, factors) if return_factors else out


def check_block_causal_mask(
    mask: torch.Tensor, grid: TokenGrid, chunk_frames: int, ctx: AttentionContext
) -> None:
    """Raise unless ``mask`` (``i j`` or ``b h i j``, True = attend) of the no-cache training path is the
    ``chunk_frames`` block-causal mask (checked on each query frame's first row)."""
    tpf = grid.tokens_per_frame
    q0, k0 = ctx.query_offset, ctx.key_offset
    q_frames = torch.arange(*ctx.query_frames, device=mask.device)
    k_frame = torch.arange(mask.shape[-1], device=mask.device) // tpf + ctx.key_frames[0]
    expected = (k_frame[None, :] // chunk_frames) <= (q_frames[:, None] // chunk_frames)
    rows = (q_frames * tpf - q0).long()
    got = mask.reshape(-1, *mask.shape[-2:])[0][rows]
    if not torch.equal(got, expected) or k0 != 0:
        raise ToolkitError(f"Monarch backend supports only {chunk_frames}-frame block-causal masks")


def monarch_backend(
    tiling: tuple[int, int, int] = (1, 1, 1),
    *,
    iters: int = 1,
    base: str = "fh,w",
    block_causal_frames: int = 3,
    r_step: str = "exact",
    contiguous: tuple[int, int] | None = None,
) -> Callable:
    """A seam backend ``fn(q, k, v, ctx)`` running :func:`monarch_attention` with this tiling (``r_step`` as there);
    ``contiguous=(b1, b2)``: the misaligned layout of b1·b2 consecutive raster tokens per tile instead.

    Uses ctx.grid / query_frames / key_frames / scale; a ``ctx.attn_mask`` (no-cache training path) must be the
    ``block_causal_frames`` block-causal mask."""

    def backend(q, k, v, ctx):
        grid = as_grid(ctx.grid)
        layout = (MonarchLayout.contiguous(grid, *contiguous) if contiguous is not None
                  else MonarchLayout.aligned(grid, base, tiling))
        causal = None
        if ctx.attn_mask is not None:
            check_block_causal_mask(ctx.attn_mask, grid, block_causal_frames, ctx)
            causal = block_causal_frames
        return monarch_attention(
            q, k, v, grid, layout=layout, query_frames=ctx.query_frames, key_frames=ctx.key_frames,
            block_causal_frames=causal, iters=iters, scale=ctx.scale, r_step=r_step,
        )

    check_r_step(r_step)
    suffix = "" if r_step == "exact" else f"_{r_step}"
    shape = f"contiguous_{contiguous[0]}_{contiguous[1]}" if contiguous is not None else (
        f"{base.replace(',', '_')}_{'_'.join(map(str, tiling))}")
    backend.__name__ = f"monarch_{shape}_T{iters}{suffix}"
    return backend


# ---- exact projection --------------------------------------------------------------------------------------
# torch loads its CUDA linear-algebra backend on the first linalg call, and two threads making that first call at
# once fail ("lazy wrapper should be called at most once"): `toolkit analyze` runs several files on dask threads.
_EIGH_LOCK = threading.Lock()


def _top_eigenvector(g: torch.Tensor) -> torch.Tensor:
    """Unit eigenvector of the largest eigenvalue of each symmetric matrix in ``g`` [... p p]."""
    with _EIGH_LOCK:
        return torch.linalg.eigh(g)[1][..., -1]


def rank1(
    x: torch.Tensor, method: str = "eigh", tol: float = 1e-9, squarings: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-1 approximation ``a ⊗ b`` of every matrix of ``x: ... m n`` (Eckart–Young).

    Leading eigenvector of the smaller Gram matrix G, in float64. ``method="eigh"``: ``torch.linalg.eigh``.
    ``method="power"`` (fast on GPUs, where batched eigh of many small matrices is slow): ``squarings`` repeated
    squarings of G (normalised; G^(2^s) ≈ its top eigenprojector once (λ2/λ1)^(2^s) is negligible) applied to
    the all-ones vector (it overlaps the Perron vector of a non-negative map), then power iterations until the
    residual ‖G u − λ u‖ ≤ ``tol``·λ; the few matrices still above it (near-degenerate λ1 ≈ λ2) go to ``eigh``.
    For non-negative x the factors come out non-negative (up to rounding)."""
    m, n = x.shape[-2:]
    y = x.transpose(-1, -2) if m > n else x  # ... p r with p ≤ r
    y64 = y.to(torch.float64)
    g = y64 @ y64.transpose(-1, -2)  # ... p p
    if method == "eigh":
        u = _top_eigenvector(g)
    elif method == "power":
        tiny = torch.finfo(g.dtype).tiny
        h = g / g.norm(dim=(-1, -2), keepdim=True).clamp_min(tiny)
        for _ in range(squarings):
            h = h @ h
            h = h / h.norm(dim=(-1, -2), keepdim=True).clamp_min(tiny)
        u = h.sum(-1)  # h · 1
        for _ in range(10):  # ≤ 90 more iterations, convergence checked every 10 (one host sync each)
            u = u / u.norm(dim=-1, keepdim=True).clamp_min(tiny)
            gu = (g @ u.unsqueeze(-1)).squeeze(-1)
            lam = (u * gu).sum(-1, keepdim=True)
            bad = ((gu - lam * u).norm(dim=-1) > tol * lam.squeeze(-1).abs()) & (lam.squeeze(-1) > 0)
            if not bad.any():
                break
            for _ in range(10):
                u = (g @ u.unsqueeze(-1)).squeeze(-1)
                u = u / u.norm(dim=-1, keepdim=True).clamp_min(tiny)
        else:
            u[bad] = _top_eigenvector(g[bad])
    else:
        raise ToolkitError(f"unknown rank-1 method {method!r} (eigh or power)")
    u = u * torch.where(u.sum(-1, keepdim=True) < 0, -1.0, 1.0)
    u = u.to(x.dtype)
    other = (y.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1)  # yᵀu: ... r
    return (u, other) if m <= n else (other, u)


def _tile_groups(allowed: torch.Tensor, tile_tokens: int, block_entries: int) -> Iterator[torch.Tensor]:
    """Runs of consecutive query tiles with the same visible key tiles, each ≤ ``block_entries`` map entries
    (at least one tile): a tile's block is tile_tokens query rows × (visible key tiles · tile_tokens) keys."""
    a = 0
    while a < allowed.shape[0]:
        tile_block = tile_tokens * int(allowed[a].sum()) * tile_tokens
        per_block = max(1, block_entries // max(1, tile_block))
        b = a + 1
        while b < allowed.shape[0] and b - a < per_block and torch.equal(allowed[b], allowed[a]):
            b += 1
        yield torch.arange(a, b)
        a = b


def _exact_tiles(qt, kt, lse_t, tiles, keys, scale):
    """Exact P for query ``tiles`` against key tiles ``keys``: ``... g i j f k l``."""
    q_rows = qt[..., tiles, :, :, :].flatten(-4, -2)
    k_rows = kt[..., keys, :, :, :].flatten(-4, -2)
    p = exact.probs(q_rows, k_rows, lse_t[..., tiles, :, :].flatten(-3), scale)
    return p.unflatten(-1, (len(keys), *kt.shape[-3:-1])).unflatten(-4, (len(tiles), *qt.shape[-3:-1]))


def _setup(q, k, v, lse, layout, query_frames, key_frames, block_causal_frames, scale):
    qf, kf = _frames(query_frames, layout.grid), _frames(key_frames, layout.grid)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    allowed = allowed_tiles(layout, qf, kf, block_causal_frames)
    dt = exact.compute_dtype(q, k, *(() if v is None else (v,)))
    if lse is None:
        if block_causal_frames is not None:
            raise ToolkitError("pass lse (over the allowed keys) for block-causal exact maps")
        lse = exact.logsumexp(q.to(dt), k.to(dt), scale)
    qt = layout.permute(q.to(dt), dim=-2, frames=qf)
    kt = layout.permute(k.to(dt), dim=-2, frames=kf)
    vt = None if v is None else layout.permute(v.to(dt), dim=-2, frames=kf)
    lse_t = layout.permute(lse.to(dt), dim=-1, frames=qf)
    return qf, kf, scale, allowed, qt, kt, vt, lse_t


def exact_projection(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: MonarchLayout,
    *,
    lse: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    query_frames: tuple[int, int] | None = None,
    key_frames: tuple[int, int] | None = None,
    block_causal_frames: int | None = None,
    scale: float | None = None,
    return_factors: bool = False,
    method: str = "eigh",
    block_entries: int = DEFAULT_BLOCK_ENTRIES,
) -> tuple[MonarchErrors, MonarchFactors | None]:
    """Frobenius-optimal Monarch fit of the exact map P = exp(scale q kᵀ − lse) (q ``... i d``, k ``... j d``,
    lse ``... i`` over the attended keys; computed if None), query tile group by group.

    Returns the errors (with output errors if ``v`` is given) and, if asked, factors with the module's L/R
    layout: R[a,f,k,j,·] = r/Σr and L[a,j,i,f,k] = p_i·Σr for the slice's best rank-1 p ⊗ r (R uniform and L zero
    for zero slices); rows of L are *not* normalised."""
    qf, kf, scale, allowed, qt, kt, vt, lse_t = _setup(
        q, k, v, lse, layout, query_frames, key_frames, block_causal_frames, scale
    )
    lead, b1, b2 = qt.shape[:-4], layout.b1, layout.b2
    n_q_tiles, n_k_tiles = qt.shape[-4], kt.shape[-4]
    sq_error = p_sq = torch.zeros(lead, dtype=qt.dtype, device=qt.device)
    out_err = out_sq = torch.zeros(lead, dtype=qt.dtype, device=qt.device) if v is not None else None
    if return_factors:
        L = torch.zeros(*lead, n_q_tiles, b2, b1, n_k_tiles, b1, dtype=qt.dtype, device=qt.device)
        R = torch.full((*lead, n_q_tiles, n_k_tiles, b1, b2, b2), 1.0 / b2, dtype=qt.dtype, device=qt.device)
    for tiles in _tile_groups(allowed, b1 * b2, block_entries):
        keys = torch.nonzero(allowed[tiles[0]]).flatten()
        p = _exact_tiles(qt, kt, lse_t, tiles, keys, scale)  # ... g i j f k l
        slices = p.permute(*range(len(lead)), -6, -4, -3, -2, -5, -1)  # ... g j f k i l
        a, b = rank1(slices, method)  # ... g j f k i ; ... g j f k l
        m = a.unsqueeze(-1) * b.unsqueeze(-2)
        sq_error = sq_error + (slices - m).square().sum((-1, -2, -3, -4, -5, -6))
        p_sq = p_sq + slices.square().sum((-1, -2, -3, -4, -5, -6))
        if v is not None:
            v_sel = vt[..., keys, :, :, :]  # ... f k l d
            out_p = torch.einsum("...gjfkil,...fkld->...gijd", slices, v_sel)
            y = torch.einsum("...gjfkl,...fkld->...gjfkd", b, v_sel)  # Σ_l r v, as the kernels' Y
            out_m = torch.einsum("...gjfki,...gjfkd->...gijd", a, y)
            out_err = out_err + (out_p - out_m).square().sum((-1, -2, -3, -4))
            out_sq = out_sq + out_p.square().sum((-1, -2, -3, -4))
        if return_factors:
            mass = b.sum(-1, keepdim=True)  # ... g j f k 1
            r = torch.where(mass > 0, b / mass.where(mass > 0, 1.0), 1.0 / b2)
            L_g = (a * mass).permute(*range(len(lead)), -5, -4, -1, -3, -2)  # ... g j i f k
            R_g = r.permute(*range(len(lead)), -5, -3, -2, -4, -1)  # ... g f k j l
            L[..., tiles[0] : tiles[-1] + 1, :, :, keys, :] = L_g
            R[..., tiles[0] : tiles[-1] + 1, keys, :, :, :] = R_g
    n_entries = int(allowed.sum()) * (b1 * b2) ** 2
    errors = MonarchErrors(sq_error, p_sq, n_entries, out_err, out_sq)
    factors = MonarchFactors(L, R, layout, qf, kf, allowed.to(qt.device)) if return_factors else None
    return errors, factors


def map_errors(
    q: torch.Tensor,
    k: torch.Tensor,
    factors: MonarchFactors,
    *,
    lse: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    block_causal_frames: int | None = None,
    scale: float | None = None,
    block_entries: int = DEFAULT_BLOCK_ENTRIES,
) -> MonarchErrors:
    """Errors of a Monarch map (e.g. variational factors) against the exact map, query tile group by group."""
    layout = factors.layout
    qf, kf, scale, allowed, qt, kt, vt, lse_t = _setup(
        q, k, v, lse, layout, factors.query_frames, factors.key_frames, block_causal_frames, scale
    )
    if not torch.equal(allowed.to(factors.allowed.device), factors.allowed):
        raise ToolkitError("block_causal_frames differs from the one the factors were computed with")
    lead = qt.shape[:-4]
    sq_error = p_sq = torch.zeros(lead, dtype=qt.dtype, device=qt.device)
    out_err = out_sq = torch.zeros(lead, dtype=qt.dtype, device=qt.device) if v is not None else None
    L, R = factors.L.to(qt.dtype), factors.R.to(qt.dtype)
    for tiles in _tile_groups(allowed, layout.b1 * layout.b2, block_entries):
        keys = torch.nonzero(allowed[tiles[0]]).flatten()
        p = _exact_tiles(qt, kt, lse_t, tiles, keys, scale)  # ... g i j f k l
        sel = slice(int(tiles[0]), int(tiles[-1]) + 1)
        L_g, R_g = L[..., sel, :, :, keys, :], R[..., sel, keys, :, :, :]  # ... a j i f k ; ... a f k j l
        m = torch.einsum("...ajifk,...afkjl->...aijfkl", L_g, R_g)
        sq_error = sq_error + (p - m).square().sum((-1, -2, -3, -4, -5, -6))
        p_sq = p_sq + p.square().sum((-1, -2, -3, -4, -5, -6))
        if v is not None:
            v_sel = vt[..., keys, :, :, :]
            out_p = torch.einsum("...aijfkl,...fkld->...aijd", p, v_sel)
            y = torch.einsum("...afkjl,...fkld->...afjkd", R_g, v_sel)
            out_m = torch.einsum("...ajifk,...afjkd->...aijd", L_g, y)
            out_err = out_err + (out_p - out_m).square().sum((-1, -2, -3, -4))
            out_sq = out_sq + out_p.square().sum((-1, -2, -3, -4))
    n_entries = int(allowed.sum()) * (layout.b1 * layout.b2) ** 2
    return MonarchErrors(sq_error, p_sq, n_entries, out_err, out_sq)
