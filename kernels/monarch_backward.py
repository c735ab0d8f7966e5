r"""Monarch attention backward (T = 1): dq, dk, dv of :mod:`toolkit.kernels.monarch`'s forward.

Math (per batch and head; index names of ``kernels/monarch.py``; s = scale, q and k unscaled). Forward:

    x[a,f,k,j,l] = s · q[a,k,j]·k[f,k,l]        R = softmax_l(x)
    α[a,f,j,k] = Σ_l R k[f,k,l]   Y[a,f,j,k] = Σ_l R v[f,k,l]   c[a,f,j,k] = Σ_l R log R
    z[a,j,i,(f,k)] = s · q[a,i,j]·α[a,f,j,k] − c[a,f,j,k]     L = softmax over allowed (f,k)
    out[a,i,j] = Σ_(f,k) L Y[a,f,j,k]

Backward from dO[a,i,j]. L-step (flash-attention backward with "keys" α, bias −c, "values" Y):

    Δ[a,i,j] = dO·out        dz = L ⊙ (dO·Y − Δ)
    dY[a,f,j,k] = Σ_i L dO    dα[a,f,j,k] = s Σ_i dz q[a,i,j]    dc[a,f,j,k] = −Σ_i dz
    dq₁[a,i,j] = s Σ_(f,k) dz α[a,f,j,k]

R-step (per (a, f, k, j) a softmax over l; the +1 of ∂(R log R)/∂R cancels because Σ_l R = 1):

    dR_l = dα·k_l + dY·v_l + dc · log R_l        dx_l = R_l (dR_l − Σ_l' R_l' dR_l')
    dv[f,k,l] = Σ_(a,j) R_l dY     dk[f,k,l] = Σ_(a,j) (R_l dα + s dx_l q[a,k,j])
    dq₂[a,k,j] = s Σ_(f,l) dx_l k[f,k,l]

dq = dq₁ + dq₂. Only query tiles a that see key tile f contribute (block-causal: allowed[a] > f).

Kernels (one scratch chunk of query tiles × heads at a time, after the forward's own R-step launcher has recomputed
α, Y, c into its scratch; ``kernels/NOTES.md`` "Backward" for the design):

* ``_monarch_cols_bwd`` — one program per (query tile a, column j, batch·head) holding all b1 rows i: pass 1 the
  row log-sum-exp of z over the allowed (f, k) keys, pass 2 per key block dY, dα, dc (written to scratch in α's
  layout) and dq₁ (accumulated in registers, written in fp32).
* ``_monarch_rows_bwd`` — one program per (key row k, key tile f, batch·head): K/V row in registers, loop over the
  query tiles that see f (and their columns j in blocks) recomputing R from q and k; dk, dv accumulated in
  registers (no atomics, added to fp32 buffers once per chunk); s·dx written to scratch ``(b h) a (f k) l j``.
* ``_monarch_dq_rows`` — one program per (query tile a, row k, batch·head): dq₂ = Σ_f (s·dx) k over the allowed
  key tiles, plus dq₁, written in q's dtype.

Precision: fp32 accumulation; the products take operands in the input dtype (p, dz, dx cast to it, as
FlashAttention's backward casts dS), dα, dY and s·dx are stored in the input dtype like α and Y, dc in fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from toolkit.kernels._common import (
    LOG2E,
    TileGeometry,
    autotune_enabled,
    key_tiles_allowed_on,
    mma,
    pick_config,
    pow2,
    scratch,
    tile_token,
    tl,
    token_strides,
    triton,
    upcast_dots,
)

# Scratch budget (bytes) of the backward when the caller gives none: α, Y, c plus dα, dY, dc, s·dx. Larger than the
# forward's default: every scratch chunk re-reads the K/V rows and adds into the fp32 dk, dv (2 × 8 bytes per k
# element), so full-111 (bf16, 12 heads) runs in 3 chunks of 7 query tiles instead of 11 of 2 at 1 GiB.
DEFAULT_BACKWARD_SCRATCH_BYTES = 4 << 30
# Largest tile height b1 the backward kernels take: the L-step backward holds all b1 rows of a column in one block,
# and b1 = 135 (720p, tiling (3,1,1)) as a 256-row block needs 287 KB of shared memory on sm_90 even at one stage
# (limit 227 KB). Taller tiles get the PyTorch reference's gradients (kernels/monarch.py).
MAX_BACKWARD_ROWS = 128
LN2 = tl.constexpr(0.6931471805599453)  # a kernel may read module globals only as constexprs


@triton.jit
def _monarch_cols_bwd(
    Q, OUT, DO, DQ1, ALPHA, Y, C, DALPHA, DY, DC, ALLOWED,
    sq_b, sq_n, sq_h, so_b, so_n, so_h, sd_b, sd_n, sd_h, sg_b, sg_n, sg_h,
    n_heads, a_start, a_chunk, n_key_tiles, b1, b2, scale, scale_log2,
    q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce,
    D: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    col = tl.program_id(0)  # the column j
    a_local = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    a = a_start + a_local

    offs_i = tl.arange(0, BLOCK_I)
    offs_n = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    mask_i = offs_i < b1
    q_tok = tile_token(a, offs_i, col, q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce)
    tok_d = q_tok[:, None] * sq_n + offs_d[None, :]
    q = tl.load(Q + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h + tok_d, mask=mask_i[:, None], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sd_b + h.to(tl.int64) * sd_h + q_tok[:, None] * sd_n + offs_d[None, :],
                 mask=mask_i[:, None], other=0.0)
    o = tl.load(OUT + b.to(tl.int64) * so_b + h.to(tl.int64) * so_h + q_tok[:, None] * so_n + offs_d[None, :],
                mask=mask_i[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # Δ = dO·out = Σ_(f,k) L (dO·Y)

    n_fk = n_key_tiles * b1
    n_keys = tl.load(ALLOWED + a) * b1
    col_base = ((pid_bh.to(tl.int64) * a_chunk + a_local) * b2 + col) * n_fk  # this column's (f k) slab
    blk_offs = offs_n[:, None] * D + offs_d[None, :]

    # pass 1: log-sum-exp (base 2) of z over the allowed keys, per row i
    m_i = tl.full([BLOCK_I], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_I], tl.float32)
    for n0 in range(0, n_keys, BLOCK_K):
        mask_n = (n0 + offs_n) < n_keys
        al = tl.load(ALPHA + (col_base + n0) * D + blk_offs, mask=mask_n[:, None], other=0.0)
        cc = tl.load(C + col_base + n0 + offs_n, mask=mask_n, other=0.0)
        z = mma(q, tl.trans(al), UPCAST) * scale_log2 - cc[None, :]
        z = tl.where(mask_n[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), 1)
        m_i = m_new
    lse = m_i + tl.log2(l_i)

    # pass 2: L recomputed per key block; dY, dα, dc out, dq₁ accumulated
    dq = tl.zeros([BLOCK_I, D], tl.float32)
    for n0 in range(0, n_keys, BLOCK_K):
        mask_n = (n0 + offs_n) < n_keys
        al = tl.load(ALPHA + (col_base + n0) * D + blk_offs, mask=mask_n[:, None], other=0.0)
        yy = tl.load(Y + (col_base + n0) * D + blk_offs, mask=mask_n[:, None], other=0.0)
        cc = tl.load(C + col_base + n0 + offs_n, mask=mask_n, other=0.0)
        z = mma(q, tl.trans(al), UPCAST) * scale_log2 - cc[None, :]
        p = tl.exp2(z - lse[:, None])
        p = tl.where(mask_i[:, None] & mask_n[None, :], p, 0.0)  # [BI, BK] = L
        dz = p * (mma(do, tl.trans(yy), UPCAST) - delta[:, None])
        d_y = mma(tl.trans(p.to(do.dtype)), do, UPCAST)  # [BK, D]
        d_al = mma(tl.trans(dz.to(q.dtype)), q, UPCAST) * scale
        dq += mma(dz.to(al.dtype), al, UPCAST)
        tl.store(DALPHA + (col_base + n0) * D + blk_offs, d_al.to(DALPHA.dtype.element_ty), mask=mask_n[:, None])
        tl.store(DY + (col_base + n0) * D + blk_offs, d_y.to(DY.dtype.element_ty), mask=mask_n[:, None])
        tl.store(DC + col_base + n0 + offs_n, -tl.sum(dz, 0), mask=mask_n)
    g_ptrs = DQ1 + b.to(tl.int64) * sg_b + h.to(tl.int64) * sg_h + q_tok[:, None] * sg_n + offs_d[None, :]
    tl.store(g_ptrs, dq * scale, mask=mask_i[:, None])


@triton.jit
def _monarch_rows_bwd(
    Q, K, V, DALPHA, DY, DC, DX, DK, DV, FIRST_A,
    sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h, sg_b, sg_n, sg_h,
    n_heads, a_start, a_chunk, n_a, n_key_tiles, b1, b2, scale, scale_log2,
    q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce,
    k_height, k_width, k_h_in, k_w_in, k_f_tied, k_h_reduce, k_w_reduce,
    D: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr, UPCAST: tl.constexpr,
):
    row = tl.program_id(0)  # the key row k (= the query row k it is fitted to)
    f = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // n_heads
    h = pid_bh % n_heads

    offs_j = tl.arange(0, BLOCK_J)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, D)
    mask_l = offs_l < b2
    k_row0 = tile_token(f, row, 0, k_height, k_width, k_h_in, k_w_in, k_f_tied, k_h_reduce, k_w_reduce).to(tl.int64)
    kk = tl.load(K + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h + k_row0 * sk_n
                 + offs_l[:, None] * sk_n + offs_d[None, :], mask=mask_l[:, None], other=0.0)  # [BL, D]
    vv = tl.load(V + b.to(tl.int64) * sv_b + h.to(tl.int64) * sv_h + k_row0 * sv_n
                 + offs_l[:, None] * sv_n + offs_d[None, :], mask=mask_l[:, None], other=0.0)
    q_base = Q + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
    n_fk = n_key_tiles * b1
    slot = f * b1 + row
    q_offs = offs_j[:, None] * sq_n + offs_d[None, :]
    jd_offs = offs_j[:, None] * (n_fk * D) + offs_d[None, :]  # rows j of one (a, f, k) in α's layout
    lj_offs = offs_l[:, None] * b2 + offs_j[None, :]  # s·dx stored as (l, j) blocks

    acc_dk = tl.zeros([BLOCK_L, D], tl.float32)
    acc_dv = tl.zeros([BLOCK_L, D], tl.float32)
    # the query tiles that see key tile f are a suffix (allowed[a] is non-decreasing in a)
    a_lo = tl.maximum(tl.load(FIRST_A + f) - a_start, 0)
    for a_local in range(a_lo, n_a):
        q_row0 = tile_token(a_start + a_local, row, 0, q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce,
                            q_w_reduce).to(tl.int64)  # a tile row is b2 consecutive tokens
        slab = (pid_bh.to(tl.int64) * a_chunk + a_local) * b2 * n_fk + slot  # (a, j = 0, f·b1 + k)
        dx_base = ((pid_bh.to(tl.int64) * a_chunk + a_local) * n_fk + slot) * b2 * b2
        # Columns j in blocks (the softmax is over l, per j): smaller (l, j) tiles live per step
        for j0 in range(0, b2, BLOCK_J):
            mask_j = (j0 + offs_j) < b2
            # Everything in (l, j) orientation: Rᵀ and dxᵀ come out of their products as the A operands of the
            # dk, dv products (no register transposes, NOTES.md "Backward")
            qq = tl.load(q_base + (q_row0 + j0) * sq_n + q_offs, mask=mask_j[:, None], other=0.0)  # [BJ, D]
            x = mma(kk, tl.trans(qq), UPCAST) * scale_log2  # xᵀ [BL, BJ], log2 units
            x = tl.where(mask_l[:, None], x, float("-inf"))
            x -= tl.max(x, 0)[None, :]
            x -= tl.log2(tl.sum(tl.exp2(x), 0))[None, :]  # log2 Rᵀ; exp2 again below rather than keep p live
            r = tl.where(mask_j[None, :], tl.exp2(x), 0.0)  # Rᵀ
            log2_r = tl.where(mask_l[:, None], x, 0.0)  # 0 off the row (R = 0 there)
            rc = r.to(kk.dtype)
            # dY's part first, then dα's: one of the two [BJ, D] tiles live at a time
            d_y = tl.load(DY + (slab + j0 * n_fk) * D + jd_offs, mask=mask_j[:, None], other=0.0)  # [BJ, D]
            d_c = tl.load(DC + slab + (j0 + offs_j) * n_fk, mask=mask_j, other=0.0)
            d_r = mma(vv, tl.trans(d_y), UPCAST) + (d_c * LN2)[None, :] * log2_r  # dRᵀ; dc · log R (natural log)
            acc_dv += mma(rc, d_y, UPCAST)
            d_al = tl.load(DALPHA + (slab + j0 * n_fk) * D + jd_offs, mask=mask_j[:, None], other=0.0)
            d_r += mma(kk, tl.trans(d_al), UPCAST)
            acc_dk += mma(rc, d_al, UPCAST)
            dxs = (r * (d_r - tl.sum(r * d_r, 0)[None, :]) * scale).to(qq.dtype)  # s·dxᵀ, [BL, BJ]
            acc_dk += mma(dxs, qq, UPCAST)
            tl.store(DX + dx_base + j0 + lj_offs, dxs.to(DX.dtype.element_ty), mask=mask_l[:, None] & mask_j[None, :])

    # this program owns dk, dv of key row (f, k) within the launch; scratch chunks of query tiles add up
    g_base = b.to(tl.int64) * sg_b + h.to(tl.int64) * sg_h + k_row0 * sg_n  # scalar: 2-D int64 offsets spill
    g_offs = offs_l[:, None] * sg_n + offs_d[None, :]
    tl.store(DK + g_base + g_offs, tl.load(DK + g_base + g_offs, mask=mask_l[:, None]) + acc_dk, mask=mask_l[:, None])
    tl.store(DV + g_base + g_offs, tl.load(DV + g_base + g_offs, mask=mask_l[:, None]) + acc_dv, mask=mask_l[:, None])


@triton.jit
def _monarch_dq_rows(
    K, DX, DQ1, DQ, ALLOWED,
    sk_b, sk_n, sk_h, sg_b, sg_n, sg_h, sq_b, sq_n, sq_h,
    n_heads, a_start, a_chunk, n_key_tiles, b1, b2,
    q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce,
    k_height, k_width, k_h_in, k_w_in, k_f_tied, k_h_reduce, k_w_reduce,
    D: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr, UPCAST: tl.constexpr,
):
    row = tl.program_id(0)  # the query row k
    a_local = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    a = a_start + a_local

    offs_j = tl.arange(0, BLOCK_J)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, D)
    mask_j = offs_j < b2
    mask_l = offs_l < b2
    k_base = K + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
    kl_offs = offs_l[:, None] * sk_n + offs_d[None, :]
    lj_offs = offs_l[:, None] * b2 + offs_j[None, :]
    n_fk = n_key_tiles * b1
    dx_base = ((pid_bh.to(tl.int64) * a_chunk + a_local) * n_fk + row) * b2 * b2
    acc = tl.zeros([BLOCK_J, D], tl.float32)
    for f in range(0, tl.load(ALLOWED + a)):
        k_row0 = tile_token(f, row, 0, k_height, k_width, k_h_in, k_w_in, k_f_tied, k_h_reduce, k_w_reduce)
        kk = tl.load(k_base + k_row0.to(tl.int64) * sk_n + kl_offs, mask=mask_l[:, None], other=0.0)
        dxs = tl.load(DX + dx_base + f * (b1 * b2 * b2) + lj_offs, mask=mask_l[:, None] & mask_j[None, :], other=0.0)
        acc += mma(tl.trans(dxs), kk, UPCAST)

    q_tok = tile_token(a, row, offs_j, q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce)
    dq1 = tl.load(DQ1 + b.to(tl.int64) * sg_b + h.to(tl.int64) * sg_h + q_tok[:, None] * sg_n + offs_d[None, :],
                  mask=mask_j[:, None], other=0.0)
    tl.store(DQ + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h + q_tok[:, None] * sq_n + offs_d[None, :],
             (acc + dq1).to(DQ.dtype.element_ty), mask=mask_j[:, None])


# ---------------------------------------------------------------------------------------------------------
# Launcher


def backward_configs(b1: int, b2: int, d: int) -> tuple[dict, dict, dict]:
    """Heuristic launch keywords (constexpr blocks, warps, stages) of the three kernels: L-step, R-step, dq₂.
    The first candidate of :func:`backward_candidates`, and what runs when nothing is tuned or cached."""
    # All b1 rows of a column in one block (the dα, dY, dc of a key block need every row i); 8 warps once the
    # block holds more than 32 rows of d = 128 (q, dO and the dq accumulator are each BLOCK_I × d).
    bi = pow2(b1, 16)
    cols = {"BLOCK_I": bi, "BLOCK_K": 32, "num_warps": 8 if bi * d > 32 * 128 else 4, "num_stages": 2}
    # One block holds a whole key row (softmax over l); the columns j go in blocks of 16. With the whole row of j
    # in one block (64 × 64 tiles) the kernel spilled at every warp / stage count tried (NOTES.md "Backward").
    blk = pow2(b2, 16)
    rows = {"BLOCK_J": 16, "BLOCK_L": blk, "num_warps": 8 if blk * d >= 64 * 128 else 4, "num_stages": 2}
    dq = {"BLOCK_J": blk, "BLOCK_L": blk, "num_warps": 8 if blk >= 128 else 4, "num_stages": 3}
    return cols, rows, dq


def backward_candidates(b1: int, b2: int, d: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Launch configs the tuner times per kernel (L-step, R-step, dq₂), each list led by
    :func:`backward_configs`' default. Pruned by the sm_90 compile report at d = 128 (kernels/NOTES.md "Backward",
    candidate table): configs that need more shared memory than an SM has are left out; the small spills kept
    are listed there."""
    cols_d, rows_d, dq_d = backward_configs(b1, b2, d)
    bi, blk = cols_d["BLOCK_I"], rows_d["BLOCK_L"]
    # L-step: key blocks of 32 or 64. 4 warps only where the default takes them (BLOCK_I · d ≤ 32 · 128) and only
    # at 32 keys: 64 keys spill about 100 B at b1 = 30, and 64 rows 64 B at b1 = 45. A 128-row block (b1 > 64)
    # at 64 keys fits shared memory at one stage only (98 KB; 32 keys: 172 KB at two).
    stages = (1, 2) if bi > 64 else (2, 3)
    cols = [{"BLOCK_I": bi, "BLOCK_K": 32, "num_warps": w, "num_stages": st}
            for w in ((4, 8) if bi * d <= 32 * 128 else (8,)) for st in stages]
    cols += [{"BLOCK_I": bi, "BLOCK_K": 64, "num_warps": 8, "num_stages": st} for st in stages[:1 if bi > 64 else 2]]
    # R-step: 16 columns per step at 2 or 3 stages (no spills), at 4 warps too while a key row fits 64 (a row
    # of 128 spills 1.4 KB at 4 warps); 32 columns (half the products, each twice as wide) spill 150–220 B at
    # 8 warps and 250–380 B at 4, so 8 warps only; one stage spills at every block.
    rows = [{"BLOCK_J": bj, "BLOCK_L": blk, "num_warps": w, "num_stages": st}
            for bj in sorted({16, pow2(b2, 16, 32)}) for w in ((4, 8) if bj == 16 and blk <= 64 else (8,))
            for st in (2, 3)]
    # dq₂: whole rows; 4 warps spill at 128-wide rows (300–530 B)
    dq = [{"BLOCK_J": blk, "BLOCK_L": blk, "num_warps": w, "num_stages": st}
          for w in ((4, 8) if blk <= 64 else (8,)) for st in (2, 3)]
    return tuple([default, *[c for c in lst if c != default]]  # type: ignore[return-value]
                 for default, lst in ((cols_d, cols), (rows_d, rows), (dq_d, dq)))


def scratch_share(queries: TileGeometry, keys: TileGeometry, d: int, element_size: int) -> float:
    """Fraction of a scratch budget that the forward's recomputed α, Y, c may take, so that they plus the
    backward's dα, dY, dc and s·dx (same dtypes; s·dx is b2 × b2 per (a, f, k)) stay within it."""
    b1, b2 = queries.b1, queries.b2
    fwd = b2 * b1 * (2 * d * element_size + 4)
    return fwd / (2 * fwd + b1 * b2 * b2 * element_size)


def first_query_tile(allowed: torch.Tensor, n_key_tiles: int) -> torch.Tensor:
    """First query tile that sees each key tile (``allowed`` is non-decreasing in the query tile): int32 F."""
    f = torch.arange(n_key_tiles, device=allowed.device, dtype=allowed.dtype)
    return (allowed[None, :] <= f[:, None]).sum(1).to(torch.int32)


RecomputeRows = Callable[[Callable[[tuple[int, int, int, int], tuple[torch.Tensor, ...]], None]], None]


def monarch_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    grad_out: torch.Tensor,
    queries: TileGeometry,
    keys: TileGeometry,
    block_causal_frames: int | None,
    scale: float,
    recompute_rows: RecomputeRows,
    *,
    autotune: bool | None = None,
    configs: tuple[dict, dict, dict] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (dtypes of q, k, v) of the forward that gave ``out`` (``b i h d``, all contiguous in d).

    ``recompute_rows(step)`` must run the forward's R-step scratch chunk by chunk and call
    ``step((h0, h1, a0, a1), (alpha, y, c))`` after each (``kernels/monarch.py::_forward(after_rows=...)``): the
    three kernels run per chunk while its α, Y, c are in scratch. Launch configs: ``configs`` (L-step, R-step,
    dq₂; tests), else per kernel the cached one, else with ``autotune`` (default: env
    ``TOOLKIT_KERNEL_AUTOTUNE=1``) :func:`backward_candidates` timed once on the first chunk and the winner cached
    (``_common.pick_config``, keyed like the forward: shape and scratch chunk), else :func:`backward_configs`.
    """
    q, k, v, out, grad_out = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, out, grad_out.to(q.dtype)))
    B, _, H, D = q.shape
    b1, b2, F = queries.b1, queries.b2, keys.num_tiles
    upcast = upcast_dots(q.dtype)
    tune = autotune_enabled(autotune)
    allowed = key_tiles_allowed_on(q.device, queries, keys, block_causal_frames)
    dq = scratch(tuple(q.shape), q.dtype, q.device)
    dq1 = scratch(tuple(q.shape), torch.float32, q.device)  # L-step part, completed by _monarch_dq_rows
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    first_a = first_query_tile(allowed, F)
    s_q, s_k, s_v, s_o, s_d, s_dq1, s_dq, s_dk = (token_strides(x) for x in (q, k, v, out, grad_out, dq1, dq, dk))
    scale_log2 = scale * LOG2E
    grads: list[torch.Tensor] = []  # dα, dY, dc, s·dx scratch, sized like the forward's α for its largest chunk
    picked: list[dict] = list(configs) if configs is not None else []  # L-step, R-step, dq₂ configs once chosen
    spare: list[torch.Tensor] = []  # dk, dv stand-ins for timing the R-step kernel, which adds into its outputs
    key = (f"B{B} H{H} D{D} {q.dtype} grid{queries.grid} tiling{queries.tiling} q{queries.frames} "
           f"k{keys.frames} bc{block_causal_frames}")

    def heads(x: torch.Tensor, h0: int, h1: int) -> torch.Tensor:
        return x if (h0, h1) == (0, H) else x[:, :, h0:h1]

    def cols(cfg: dict, chunk: tuple[int, int, int, int], buf: tuple[torch.Tensor, ...]) -> None:
        (h0, h1, a0, a1), (alpha, y, c), (d_alpha, d_y, d_c, _) = chunk, buf, grads
        _monarch_cols_bwd[(b2, a1 - a0, B * (h1 - h0))](
            heads(q, h0, h1), heads(out, h0, h1), heads(grad_out, h0, h1), heads(dq1, h0, h1), alpha, y, c,
            d_alpha, d_y, d_c, allowed, *s_q, *s_o, *s_d, *s_dq1, h1 - h0, a0, alpha.shape[1], F, b1, b2, scale,
            scale_log2, *queries.args(), D=D, UPCAST=upcast, **cfg,
        )

    def rows(cfg: dict, chunk: tuple[int, int, int, int], dk_: torch.Tensor, dv_: torch.Tensor) -> None:
        (h0, h1, a0, a1), (d_alpha, d_y, d_c, dxs) = chunk, grads
        _monarch_rows_bwd[(b1, F, B * (h1 - h0))](
            *(heads(x, h0, h1) for x in (q, k, v)), d_alpha, d_y, d_c, dxs, heads(dk_, h0, h1), heads(dv_, h0, h1),
            first_a, *s_q, *s_k, *s_v, *s_dk, h1 - h0, a0, dxs.shape[1], a1 - a0, F, b1, b2, scale, scale_log2,
            *queries.args(), *keys.args(), D=D, UPCAST=upcast, **cfg,
        )

    def rows_timed(cfg: dict, chunk: tuple[int, int, int, int]) -> None:
        if not spare:  # its dk, dv additions land in throwaway buffers, so tuning leaves dk, dv untouched
            spare.extend([torch.zeros_like(dk), torch.zeros_like(dv)])
        rows(cfg, chunk, *spare)

    def dq_rows(cfg: dict, chunk: tuple[int, int, int, int]) -> None:
        (h0, h1, a0, a1), dxs = chunk, grads[3]
        _monarch_dq_rows[(b1, a1 - a0, B * (h1 - h0))](
            heads(k, h0, h1), dxs, heads(dq1, h0, h1), heads(dq, h0, h1), allowed, *s_k, *s_dq1, *s_dq, h1 - h0, a0,
            dxs.shape[1], F, b1, b2, *queries.args(), *keys.args(), D=D, UPCAST=upcast, **cfg,
        )

    def choose(i: int, name: str, chunk: tuple[int, int, int, int], run: Callable[[dict], None],
               buf_shape: torch.Size) -> dict:
        """Config ``i`` (L-step, R-step, dq₂), chosen on the first chunk: the launch grid depends on the chunk."""
        if len(picked) <= i:
            chunk_key = f"achunk{buf_shape[1]}" + (f" hchunk{buf_shape[0] // B}" if buf_shape[0] // B < H else "")
            default, candidates = backward_configs(b1, b2, D)[i], backward_candidates(b1, b2, D)[i]
            picked.append(pick_config(f"monarch bwd {name} {key} {chunk_key}", default, candidates, run, tune))
        return picked[i]

    def step(chunk: tuple[int, int, int, int], buf: tuple[torch.Tensor, ...]) -> None:
        alpha, c = buf[0], buf[2]
        if not grads:
            grads.extend([scratch(alpha.shape, alpha.dtype, q.device), scratch(alpha.shape, alpha.dtype, q.device),
                          scratch(c.shape, torch.float32, q.device),
                          scratch((alpha.shape[0], alpha.shape[1], F * b1, b2, b2), alpha.dtype, q.device)])
        # each kernel is tuned after the previous one has run: its inputs are then in scratch
        cols(choose(0, "cols", chunk, lambda cfg: cols(cfg, chunk, buf), alpha.shape), chunk, buf)
        rows(choose(1, "rows", chunk, lambda cfg: rows_timed(cfg, chunk), alpha.shape), chunk, dk, dv)
        spare.clear()
        dq_rows(choose(2, "dq", chunk, lambda cfg: dq_rows(cfg, chunk), alpha.shape), chunk)

    recompute_rows(step)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
