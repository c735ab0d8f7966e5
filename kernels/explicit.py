r"""Explicit-factor Monarch evaluation: M·V and the row sums of M from given factors (L, R), at full scale.

Math (per batch and head; tiled (fh, w) layout of ``kernels._common``; ``docs/monarch.md`` "The Monarch matrix"):

    M[(a,i,j), (f,k,l)] = L[a,j,i,f,k] · R[a,f,k,j,l]
    Y[a,f,j,k]   = Σ_l R[a,f,k,j,l] · v[f,k,l]          s[a,f,j,k] = Σ_l R[a,f,k,j,l]
    out[a,i,j]   = Σ_(f,k) L[a,j,i,f,k] · Y[a,f,j,k]      rows[a,i,j] = Σ_(f,k) L[a,j,i,f,k] · s[a,f,j,k]

The factors are what an exact Frobenius projection returns (rank-1 slices, rows not re-normalised), so the row
sums are reported, not assumed to be 1. Factor layouts (contiguous, any float dtype):

    L  ``b h a j i f k``  = (B, H, A, b2, b1, F, b1)
    R  ``b h a f k j l``  = (B, H, A, F, b1, b2, b2)

Two kernels, as in ``kernels.monarch``: ``_factor_rows_fwd`` (per (a, f, k): the b2 × b2 block of R times the key
row's values) writes Y and s as ``(b h) a j (f k)``; ``_factor_cols_fwd`` (per (a, j, block of i)) contracts
L's row block with them. Products at fp32 accuracy (3×tf32 on the tensor cores; IEEE fp32 under the interpreter or
where a Triton lacks tf32x3): this is an analysis path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from toolkit.kernels._common import (
    TileGeometry,
    check_head_dim,
    output_buffer,
    pow2,
    run_with_precision,
    scratch,
    tile_token,
    tl,
    token_strides,
    triton,
)

from toolkit.errors import ToolkitError

if TYPE_CHECKING:
    from toolkit.attention.monarch import MonarchFactors

DEFAULT_SCRATCH_BYTES = 1 << 30


@triton.jit
def _factor_rows_fwd(
    R, V, Y, S,
    sv_b, sv_n, sv_h,
    n_heads, n_query_tiles, a_start, a_chunk, n_key_tiles, b1, b2,
    k_height, k_width, k_h_in, k_w_in, k_f_tied, k_h_reduce, k_w_reduce,
    D: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_fkj = tl.program_id(0)
    a_local = tl.program_id(1)
    pid_bh = tl.program_id(2)
    n_jb = tl.cdiv(b2, BLOCK_J)
    jb = pid_fkj % n_jb
    fk = pid_fkj // n_jb  # f * b1 + k
    f = fk // b1
    row = fk % b1
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    a = a_start + a_local

    offs_j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, D)
    mask_j = offs_j < b2
    r_block = R + (((pid_bh.to(tl.int64) * n_query_tiles + a) * n_key_tiles + f) * b1 + row) * b2 * b2
    acc = tl.zeros([BLOCK_J, D], tl.float32)
    s = tl.zeros([BLOCK_J], tl.float32)
    for l0 in range(0, b2, BLOCK_L):
        cols = l0 + offs_l
        mask_l = cols < b2
        tok = tile_token(f, row, cols, k_height, k_width, k_h_in, k_w_in, k_f_tied, k_h_reduce, k_w_reduce)
        vv = tl.load(V + b.to(tl.int64) * sv_b + h * sv_h + tok.to(tl.int64)[:, None] * sv_n + offs_d[None, :],
                     mask=mask_l[:, None], other=0.0).to(tl.float32)
        rr = tl.load(r_block + offs_j[:, None] * b2 + cols[None, :], mask=mask_j[:, None] & mask_l[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.dot(rr, vv, input_precision=PRECISION)
        s += tl.sum(rr, 1)
    rows = ((pid_bh.to(tl.int64) * a_chunk + a_local) * b2 + offs_j) * (n_key_tiles * b1) + fk
    tl.store(Y + rows[:, None] * D + offs_d[None, :], acc, mask=mask_j[:, None])
    tl.store(S + rows, s, mask=mask_j)


@triton.jit
def _factor_cols_fwd(
    L, Y, S, OUT, ROWS,
    so_b, so_n, so_h, sr_b, sr_n, sr_h,
    n_heads, n_query_tiles, a_start, a_chunk, n_key_tiles, b1, b2,
    q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce,
    D: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_ij = tl.program_id(0)
    a_local = tl.program_id(1)
    pid_bh = tl.program_id(2)
    n_ib = tl.cdiv(b1, BLOCK_I)
    col = pid_ij // n_ib
    ib = pid_ij % n_ib
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    a = a_start + a_local

    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_n = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    mask_i = offs_i < b1
    n_fk = n_key_tiles * b1
    # L[b, h, a, j, i, (f k)]
    l_rows = ((pid_bh.to(tl.int64) * n_query_tiles + a) * b2 + col) * b1 + offs_i
    y_base = ((pid_bh.to(tl.int64) * a_chunk + a_local) * b2 + col) * n_fk
    acc = tl.zeros([BLOCK_I, D], tl.float32)
    rsum = tl.zeros([BLOCK_I], tl.float32)
    for n0 in range(0, n_fk, BLOCK_K):
        keys = n0 + offs_n
        mask_n = keys < n_fk
        ll = tl.load(L + l_rows[:, None] * n_fk + keys[None, :], mask=mask_i[:, None] & mask_n[None, :],
                     other=0.0).to(tl.float32)
        yy = tl.load(Y + (y_base + keys)[:, None] * D + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        ss = tl.load(S + y_base + keys, mask=mask_n, other=0.0)
        acc += tl.dot(ll, yy, input_precision=PRECISION)
        rsum += tl.sum(ll * ss[None, :], 1)
    tok = tile_token(a, offs_i, col, q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce)
    tok = tok.to(tl.int64)
    tl.store(OUT + b.to(tl.int64) * so_b + h * so_h + tok[:, None] * so_n + offs_d[None, :], acc,
             mask=mask_i[:, None])
    tl.store(ROWS + b.to(tl.int64) * sr_b + h * sr_h + tok * sr_n, rsum, mask=mask_i)


def factor_shapes(B: int, H: int, queries: TileGeometry, keys: TileGeometry) -> tuple[tuple, tuple]:
    """Shapes of L (``b h a j i f k``) and R (``b h a f k j l``) for these query and key tiles."""
    A, F, b1, b2 = queries.num_tiles, keys.num_tiles, queries.b1, queries.b2
    return (B, H, A, b2, b1, F, b1), (B, H, A, F, b1, b2, b2)


def monarch_factors_apply(
    L: torch.Tensor,
    R: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    tiling: tuple[int, int, int] = (1, 1, 1),
    *,
    query_frames: tuple[int, int] | None = None,
    key_frames: tuple[int, int] | None = None,
    scratch_bytes: int | None = None,
    out: torch.Tensor | None = None,
    row_sums: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M·V and the row sums of M for explicit factors (layouts in the module docstring).

    ``v``: ``b j h d`` raster order over ``key_frames``. Returns ``out`` (``b i h d``, float32, raster order over
    ``query_frames``) and ``row_sums`` (``b i h``, float32), written into ``out`` / ``row_sums`` if given.
    For a ``toolkit.attention.monarch.MonarchFactors`` use :func:`apply_factors`.
    """
    grid = tuple(int(x) for x in grid)
    tiling = tuple(int(x) for x in tiling)
    query_frames = tuple(query_frames) if query_frames is not None else (0, grid[0])
    key_frames = tuple(key_frames) if key_frames is not None else query_frames
    gq, gk = TileGeometry(grid, tiling, query_frames), TileGeometry(grid, tiling, key_frames)
    B, n_k, H, D = v.shape
    check_head_dim(D)
    l_shape, r_shape = factor_shapes(B, H, gq, gk)
    if tuple(L.shape) != l_shape or tuple(R.shape) != r_shape or n_k != gk.n_tokens:
        raise ToolkitError(
            f"factors L {tuple(L.shape)} / R {tuple(R.shape)} / v {tuple(v.shape)} do not match the expected "
            f"L {l_shape}, R {r_shape}, v (B, {gk.n_tokens}, H, d) for grid {grid}, tiling {tiling}"
        )
    L, R = L.contiguous(), R.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    b1, b2, A, F = gq.b1, gq.b2, gq.num_tiles, gk.num_tiles
    per_tile = B * H * b2 * F * b1 * (D + 1) * 4
    budget = DEFAULT_SCRATCH_BYTES if scratch_bytes is None else int(scratch_bytes)
    a_chunk = max(1, min(A, budget // per_tile))
    y = scratch((B * H, a_chunk, b2, F * b1, D), torch.float32, v.device)
    s = scratch((B * H, a_chunk, b2, F * b1), torch.float32, v.device)
    out = output_buffer(out, (B, gq.n_tokens, H, D), torch.float32, v.device)
    row_sums = output_buffer(row_sums, (B, gq.n_tokens, H), torch.float32, v.device)
    block_j, block_l = pow2(b2, 16, 64), pow2(b2, 16, 64)
    block_i = pow2(b1, 16, 32)

    def launch(precision: str, a0: int, n_a: int) -> None:
        _factor_rows_fwd[(F * b1 * triton.cdiv(b2, block_j), n_a, B * H)](
            R, v, y, s, *token_strides(v), H, A, a0, a_chunk, F, b1, b2, *gk.args(),
            D=D, BLOCK_J=block_j, BLOCK_L=block_l, PRECISION=precision, num_warps=8,
        )
        _factor_cols_fwd[(b2 * triton.cdiv(b1, block_i), n_a, B * H)](
            L, y, s, out, row_sums, *token_strides(out), row_sums.stride(0), row_sums.stride(1),
            row_sums.stride(2), H, A, a0, a_chunk, F, b1, b2, *gq.args(),
            D=D, BLOCK_I=block_i, BLOCK_K=32, PRECISION=precision, num_warps=4,
        )

    for a0 in range(0, A, a_chunk):
        run_with_precision(lambda precision, a0=a0: launch(precision, a0, min(a_chunk, A - a0)))
    return out, row_sums


def apply_factors(
    factors: MonarchFactors, v: torch.Tensor, **kwargs: int | torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`monarch_factors_apply` for a ``toolkit.attention.monarch.MonarchFactors`` (``fh,w`` aligned layout;
    head-leading factors ``b h ...`` as ``monarch_attention`` / ``exact_projection`` on ``b h`` inputs return)."""
    layout = factors.layout
    if layout.base != "fh,w" or layout.tiling is None:
        raise ToolkitError(f"the kernels implement the fh,w base with a tiling, not {layout.name}")
    return monarch_factors_apply(
        factors.L, factors.R, v, tuple(layout.grid), layout.tiling, query_frames=factors.query_frames,
        key_frames=factors.key_frames, **kwargs,
    )
