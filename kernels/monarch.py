r"""Monarch attention forward (MonarchRT, T = 1 variational step), tiled, on raster-order q/k/v.

Math (per batch and head; ``docs/monarch.md`` "The Monarch matrix" and "MonarchAttention (variational)"). Query tile a,
row i, column j; key tile f, row k, column l; s = scale. With the identity initialisation of L, one iteration is

    R-step   R[a,f,k,j,l] = softmax_l( s · q[a,k,j]·k[f,k,l] )                  (query row k sees key row k)
             α[a,f,j,k]   = Σ_l R · k[f,k,l]        c[a,f,j,k] = Σ_l R log R        Y[a,f,j,k] = Σ_l R · v[f,k,l]
    L-step   L[a,j,i,(f,k)] = softmax_(f,k)( s · q[a,i,j]·α[a,f,j,k] − c[a,f,j,k] )
    output   out[a,i,j]   = Σ_(f,k) L · Y[a,f,j,k]

Block-causal: query tile a sees only the key tiles f < allowed[a] (a prefix; keys are frame-major); both
softmaxes run over allowed tiles only. KV cache: queries of one chunk, keys of the whole window, no mask.

Decomposition (two kernels, intermediates in HBM; ``kernels/NOTES.md`` explains why the fused one does not fit
Triton's register model):

* ``_monarch_rows_fwd`` — one program per (query tile a, key row k, block of columns j); loops over key tiles f
  with q[a,k,·] held in registers. Per f it is a (b2 × b2) attention between query row k of tile a and key row
  k of tile f, online softmax over l in blocks; writes α and Y in the input dtype and c (log2 units) in fp32,
  laid out ``(b h) a j (f k) d`` so that the second kernel reads each column's keys as one contiguous block.
* ``_monarch_cols_fwd`` — one program per (query tile a, column j, block of rows i): flash attention of the
  b1 queries q[a,·,j] against the F·b1 "keys" α[a,·,j,·] with bias −c and "values" Y, online softmax in
  base 2, fp32 accumulation; writes out in raster order.

Query tiles are processed in chunks so that the intermediates stay under a memory budget.

* ``_monarch_streamed_fwd`` (forced by ``_forward(version="streamed")``) — the same two steps in one launch, the
  intermediates in a ring of group slots: jobs start in the order of tickets taken from an atomic counter and
  wait (acquire/release counters) only on jobs with smaller tickets, so a group's L-step runs while later
  groups' R-steps fill the other slots (extra memory within size(q) at the full clip; ``kernels/NOTES.md``).
  The launcher uses it when the scratch budget cannot hold one query tile of all heads.

Layout of this module (the shape of Triton's fused-attention tutorial): the math above, the kernels, then a
short launcher, :func:`monarch_attention_triton`, that checks its constraints and calls the custom op
``toolkit::monarch_attention`` (``torch.library``, with a fake implementation for shapes and dtypes), so a model
whose seam uses this kernel traces under ``torch.compile``. Its autograd formula is a second op,
``toolkit::monarch_attention_backward``: this module's R-step recomputes α, Y, c chunk by chunk and the backward
kernels of :mod:`toolkit.kernels.monarch_backward` turn them into dq, dk, dv.
Benchmark switches (R-step version, launch configs, one stage alone, an output buffer) exist only on the private
:func:`_forward`, which ``kernels/bench.py`` calls; FLOP and byte accounting lives in the benchmark too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from toolkit.kernels._common import (
    LOG2E,
    TileGeometry,
    autotune_enabled,
    check_head_dim,
    key_tiles_allowed_on,
    mma,
    output_buffer,
    pick_config,
    pow2,
    scratch,
    tile_token,
    tl,
    token_strides,
    triton,
    upcast_dots,
)
from toolkit.kernels.monarch_backward import (
    DEFAULT_BACKWARD_SCRATCH_BYTES,
    MAX_BACKWARD_ROWS,
    monarch_attention_backward,
    scratch_share,
)
from toolkit.kernels.monarch_fused import monarch_fused_forward

from toolkit.errors import ToolkitError

if TYPE_CHECKING:
    from toolkit.models.seam import Backend

# Intermediates budget (bytes) when the caller gives none: α + Y + c for this many bytes per query-tile chunk.
DEFAULT_SCRATCH_BYTES = 1 << 30
# R-step kernel versions (kernels/NOTES.md): v1 = _monarch_rows_fwd (any b2), v2 = _monarch_rows_fwd_v2
# (b2 ≤ 64, faster at every measured shape: used wherever it applies). Only the benchmark picks one explicitly.
_VERSIONS = ("v1", "v2")
FUSED = "fused"  # `_forward(version=FUSED)`: the one-kernel CUDA forward of monarch_fused.py
STREAMED = "streamed"  # `_forward(version=STREAMED)`: both steps in one launch, intermediates in a ring of slots


@triton.jit
def _row_block(q, kk, vv, mask_l, m_i, l_i, t_i, acc_k, acc_v, scale_log2, UPCAST: tl.constexpr):
    """One block of key columns l of the R-step: online softmax of s·q·k over l, accumulating R·k and R·v."""
    x = mma(q, tl.trans(kk), UPCAST) * scale_log2  # [BLOCK_J, BLOCK_L], log2 units
    x = tl.where(mask_l[None, :], x, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(x, 1))
    corr = tl.exp2(m_i - m_new)
    p = tl.exp2(x - m_new[:, None])
    l_i = l_i * corr + tl.sum(p, 1)
    t_i = t_i * corr + tl.sum(tl.where(mask_l[None, :], p * x, 0.0), 1)
    pc = p.to(kk.dtype)
    acc_k = acc_k * corr[:, None] + mma(pc, kk, UPCAST)
    acc_v = acc_v * corr[:, None] + mma(pc, vv, UPCAST)
    return m_new, l_i, t_i, acc_k, acc_v


@triton.jit
def _monarch_rows_fwd(
    Q, K, V, ALPHA, Y, C, ALLOWED,
    sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h,
    n_heads, a_start, a_chunk, n_key_tiles, b1, b2, scale_log2,
    q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce,
    k_height, k_width, k_h_in, k_w_in, k_f_tied, k_h_reduce, k_w_reduce,
    D: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr, UPCAST: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
):
    pid_kj = tl.program_id(0)
    a_local = tl.program_id(1)
    pid_bh = tl.program_id(2)
    n_jb = tl.cdiv(b2, BLOCK_J)
    row = pid_kj // n_jb  # the key row k (= query row k under the identity initialisation)
    jb = pid_kj % n_jb
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    a = a_start + a_local

    offs_j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, D)
    mask_j = offs_j < b2
    # 64-bit scalar bases, 32-bit vector offsets: 2-D int64 offset tensors cost registers (spills)
    q_row0 = tile_token(a, row, 0, q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce)
    q_base = Q + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h + q_row0.to(tl.int64) * sq_n
    q = tl.load(q_base + offs_j[:, None] * sq_n + offs_d[None, :], mask=mask_j[:, None], other=0.0)  # [BJ, D]
    k_base = K + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
    v_base = V + b.to(tl.int64) * sv_b + h.to(tl.int64) * sv_h
    kv_offs = offs_l[:, None] * sk_n + offs_d[None, :]
    vv_offs = offs_l[:, None] * sv_n + offs_d[None, :]

    n_allowed = tl.load(ALLOWED + a)
    n_fk = n_key_tiles * b1
    # intermediates: (bh, a_local, j, f*b1 + k, d) and c: (bh, a_local, j, f*b1 + k)
    slab = (pid_bh.to(tl.int64) * a_chunk + a_local) * b2 * n_fk
    out_rows = offs_j * n_fk + row  # [BJ], + f*b1 per key tile
    for f in range(0, n_allowed):
        k_row0 = tile_token(f, row, 0, k_height, k_width, k_h_in, k_w_in, k_f_tied, k_h_reduce, k_w_reduce)
        k_row0 = k_row0.to(tl.int64)
        m_i = tl.full([BLOCK_J], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_J], tl.float32)
        t_i = tl.zeros([BLOCK_J], tl.float32)  # Σ p · x (x = logit in log2 units) for the entropy term
        acc_k = tl.zeros([BLOCK_J, D], tl.float32)
        acc_v = tl.zeros([BLOCK_J, D], tl.float32)
        if SINGLE_BLOCK:  # b2 <= BLOCK_L: no inner loop, so Triton pipelines the K/V loads across key tiles f
            mask_l = offs_l < b2
            kk = tl.load(k_base + k_row0 * sk_n + kv_offs, mask=mask_l[:, None], other=0.0)
            vv = tl.load(v_base + k_row0 * sv_n + vv_offs, mask=mask_l[:, None], other=0.0)
            m_i, l_i, t_i, acc_k, acc_v = _row_block(q, kk, vv, mask_l, m_i, l_i, t_i, acc_k, acc_v, scale_log2,
                                                     UPCAST)
        else:
            for l0 in range(0, b2, BLOCK_L):
                mask_l = (l0 + offs_l) < b2
                kk = tl.load(k_base + (k_row0 + l0) * sk_n + kv_offs, mask=mask_l[:, None], other=0.0)
                vv = tl.load(v_base + (k_row0 + l0) * sv_n + vv_offs, mask=mask_l[:, None], other=0.0)
                m_i, l_i, t_i, acc_k, acc_v = _row_block(q, kk, vv, mask_l, m_i, l_i, t_i, acc_k, acc_v,
                                                         scale_log2, UPCAST)
        inv = 1.0 / l_i
        # Σ R log2 R = Σ p x / l − m − log2 l
        c = t_i * inv - m_i - tl.log2(l_i)
        rows = out_rows + f * b1
        tile_offs = rows[:, None] * D + offs_d[None, :]
        tl.store(ALPHA + slab * D + tile_offs, (acc_k * inv[:, None]).to(ALPHA.dtype.element_ty),
                 mask=mask_j[:, None])
        tl.store(Y + slab * D + tile_offs, (acc_v * inv[:, None]).to(Y.dtype.element_ty), mask=mask_j[:, None])
        tl.store(C + slab + rows, c, mask=mask_j)


@triton.jit
def _rows_v2_job(
    Q, K, V, ALPHA, Y, C, ALLOWED,
    sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h,
    b, h, row, a_first, n_tiles, f_lo, f_cap, slab, n_key_tiles, b1, b2, scale_log2,
    q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce,
    k_height, k_width, k_h_in, k_w_in, k_f_tied, k_h_reduce, k_w_reduce,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, UPCAST: tl.constexpr,
):
    """One v2 R-step job: key row ``row`` for the (query tile, column) pairs of the ``n_tiles`` query tiles
    a_first, a_first + 1, … (program row m = t·b2 + j), key tiles f_lo ≤ f < f_cap that the tiles see.
    α, Y, c of row m and key tile f go to slot ``slab + m·F·b1 + f·b1 + row``."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, D)
    t_m = offs_m // b2  # tile of each program row, relative to a_first
    j_m = offs_m % b2  # column of each program row
    mask_m = t_m < n_tiles
    mask_l = offs_l < b2
    a_m = a_first + t_m
    allowed_m = tl.load(ALLOWED + a_m, mask=mask_m, other=0)  # key tiles each row's query tile sees
    q_tok = tile_token(a_m, row, j_m, q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce)
    q_base = Q + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
    k_base = K + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
    v_base = V + b.to(tl.int64) * sv_b + h.to(tl.int64) * sv_h
    q = tl.load(q_base + q_tok[:, None] * sq_n + offs_d[None, :], mask=mask_m[:, None], other=0.0)  # [BM, D]
    kv_offs = offs_l[:, None] * sk_n + offs_d[None, :]
    vv_offs = offs_l[:, None] * sv_n + offs_d[None, :]

    n_fk = n_key_tiles * b1
    out_rows = offs_m * n_fk + row
    f_hi = tl.minimum(f_cap, tl.max(allowed_m, 0))  # allowed is non-decreasing in a
    for f in range(f_lo, f_hi):
        k_row0 = tile_token(f, row, 0, k_height, k_width, k_h_in, k_w_in, k_f_tied, k_h_reduce, k_w_reduce)
        k_row0 = k_row0.to(tl.int64)
        kk = tl.load(k_base + k_row0 * sk_n + kv_offs, mask=mask_l[:, None], other=0.0)
        vv = tl.load(v_base + k_row0 * sv_n + vv_offs, mask=mask_l[:, None], other=0.0)
        x = mma(q, tl.trans(kk), UPCAST) * scale_log2  # [BM, BL], log2 units
        x = tl.where(mask_l[None, :], x, float("-inf"))
        xs = x - tl.max(x, 1)[:, None]
        p = tl.exp2(xs)
        l_i = tl.sum(p, 1)
        inv = 1.0 / l_i
        # Σ R log2 R = Σ p (x − m) / l − log2 l: one log per row, the logits are already in registers
        c = tl.sum(tl.where(mask_l[None, :], p * xs, 0.0), 1) * inv - tl.log2(l_i)
        r = (p * inv[:, None]).to(kk.dtype)
        # Rows of tiles that do not see key tile f (block-causal, f >= allowed) are stored too: those slots exist
        # and the L-step never reads them; a per-f mask would cost ~50 registers (sm_90 report, NOTES.md).
        rows = out_rows + f * b1
        tile_offs = rows[:, None] * D + offs_d[None, :]
        tl.store(ALPHA + slab * D + tile_offs, mma(r, kk, UPCAST).to(ALPHA.dtype.element_ty), mask=mask_m[:, None])
        tl.store(Y + slab * D + tile_offs, mma(r, vv, UPCAST).to(Y.dtype.element_ty), mask=mask_m[:, None])
        tl.store(C + slab + rows, c, mask=mask_m)


@triton.jit
def _monarch_rows_fwd_v2(
    Q, K, V, ALPHA, Y, C, ALLOWED,
    sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h,
    n_heads, a_start, a_chunk, n_a, tiles_per_prog, n_key_tiles, f_per_prog, n_f_split, b1, b2, scale_log2,
    q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce,
    k_height, k_width, k_h_in, k_w_in, k_f_tied, k_h_reduce, k_w_reduce,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, UPCAST: tl.constexpr,
):
    """v2 of the R-step (b2 ≤ BLOCK_L): the BLOCK_M rows of a program are (query tile, column j) pairs of
    ``tiles_per_prog`` consecutive query tiles at the same row k, so each K/V row block loaded serves all of
    them (one M = BLOCK_M product instead of one per tile); the key tiles are split over ``n_f_split``
    programs (parallelism at the AR chunk). R is normalised before the products (no rescaling of the
    accumulators) and α, Y are formed and stored one after the other (one accumulator live)."""
    row = tl.program_id(0)  # the key row k (= query row k under the identity initialisation)
    pid_af = tl.program_id(1)
    pid_bh = tl.program_id(2)
    ag = pid_af // n_f_split
    fs = pid_af % n_f_split
    a_first = ag * tiles_per_prog  # first query tile of this program, relative to a_start
    # intermediates (bh, a_local, j, f*b1 + k, d)
    slab = (pid_bh.to(tl.int64) * a_chunk + a_first) * b2 * n_key_tiles * b1
    f_lo = fs * f_per_prog
    _rows_v2_job(
        Q, K, V, ALPHA, Y, C, ALLOWED, sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h,
        pid_bh // n_heads, pid_bh % n_heads, row, a_start + a_first, tl.minimum(tiles_per_prog, n_a - a_first),
        f_lo, f_lo + f_per_prog, slab, n_key_tiles, b1, b2, scale_log2,
        q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce,
        k_height, k_width, k_h_in, k_w_in, k_f_tied, k_h_reduce, k_w_reduce, D, BLOCK_M, BLOCK_L, UPCAST,
    )


@triton.jit
def _cols_job(
    Q, ALPHA, Y, C, ALLOWED, OUT,
    sq_b, sq_n, sq_h, so_b, so_n, so_h,
    b, h, a, col, ib, col_base, n_key_tiles, b1, scale_log2,
    q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce,
    D: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, CACHE: tl.constexpr,
    L_STAGES: tl.constexpr,
):
    """One L-step job: rows ib·BLOCK_I … of column ``col`` of query tile ``a``, whose (f k) keys α, Y, c sit at
    slots ``col_base …``. ``CACHE``: load modifier for α, Y, c (".cg" where another program wrote them during
    this launch: the L1 cache is not coherent). ``L_STAGES``: software-pipelining depth of the key loop (None:
    the launch's ``num_stages``), so a kernel whose other loop needs fewer stages can still run this one deeper."""
    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_n = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    mask_i = offs_i < b1
    q_tok = tile_token(a, offs_i, col, q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce)
    q_base = Q + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
    q = tl.load(q_base + q_tok[:, None] * sq_n + offs_d[None, :], mask=mask_i[:, None], other=0.0)  # [BI, D]

    n_keys = tl.load(ALLOWED + a) * b1
    al_ptrs = ALPHA + col_base * D + offs_n[:, None] * D + offs_d[None, :]
    y_ptrs = Y + col_base * D + offs_n[:, None] * D + offs_d[None, :]
    c_ptrs = C + col_base + offs_n
    m_i = tl.full([BLOCK_I], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_I], tl.float32)
    acc = tl.zeros([BLOCK_I, D], tl.float32)
    for n0 in tl.range(0, n_keys, BLOCK_K, num_stages=L_STAGES):
        mask_n = (n0 + offs_n) < n_keys
        al = tl.load(al_ptrs, mask=mask_n[:, None], other=0.0, cache_modifier=CACHE)
        yy = tl.load(y_ptrs, mask=mask_n[:, None], other=0.0, cache_modifier=CACHE)
        cc = tl.load(c_ptrs, mask=mask_n, other=0.0, cache_modifier=CACHE)
        z = mma(q, tl.trans(al), UPCAST) * scale_log2 - cc[None, :]
        z = tl.where(mask_n[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        corr = tl.exp2(m_i - m_new)
        p = tl.exp2(z - m_new[:, None])
        l_i = l_i * corr + tl.sum(p, 1)
        acc = acc * corr[:, None] + mma(p.to(yy.dtype), yy, UPCAST)
        m_i = m_new
        al_ptrs += BLOCK_K * D
        y_ptrs += BLOCK_K * D
        c_ptrs += BLOCK_K
    out = acc / l_i[:, None]
    o_base = OUT + b.to(tl.int64) * so_b + h.to(tl.int64) * so_h
    tl.store(o_base + q_tok[:, None] * so_n + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=mask_i[:, None])


@triton.jit
def _monarch_cols_fwd(
    Q, ALPHA, Y, C, ALLOWED, OUT,
    sq_b, sq_n, sq_h, so_b, so_n, so_h,
    n_heads, a_start, a_chunk, n_key_tiles, b1, b2, scale_log2,
    q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce,
    D: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_ij = tl.program_id(0)
    a_local = tl.program_id(1)
    pid_bh = tl.program_id(2)
    n_ib = tl.cdiv(b1, BLOCK_I)
    col = pid_ij // n_ib  # the column j
    col_base = ((pid_bh.to(tl.int64) * a_chunk + a_local) * b2 + col) * n_key_tiles * b1  # its (f k) slab
    _cols_job(
        Q, ALPHA, Y, C, ALLOWED, OUT, sq_b, sq_n, sq_h, so_b, so_n, so_h,
        pid_bh // n_heads, pid_bh % n_heads, a_start + a_local, col, pid_ij % n_ib, col_base, n_key_tiles, b1,
        scale_log2, q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce,
        D, BLOCK_I, BLOCK_K, UPCAST, "", None,
    )


@triton.jit
def _wait_at_least(COUNTER, target):
    """Spin until ``*COUNTER >= target`` (acquire; the scalar atomic's result reaches every thread through a CTA
    barrier): the loads after it see what the counted programs wrote before their release."""
    n = tl.atomic_add(COUNTER, 0, sem="acquire")
    while n < target:
        n = tl.atomic_add(COUNTER, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _monarch_streamed_fwd(
    Q, K, V, ALPHA, Y, C, ALLOWED, OUT, SYNC,
    sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h, so_b, so_n, so_h,
    n_heads, n_a, n_groups, n_slots, lag, n_key_tiles, f_per_prog, n_f_split, b1, b2, scale_log2,
    q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce,
    k_height, k_width, k_h_in, k_w_in, k_f_tied, k_h_reduce, k_w_reduce,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, L_STAGES: tl.constexpr,
):
    """Both steps in one launch, the intermediates in a ring of ``n_slots`` group slots.

    A group g is (batch·head, ``BLOCK_M // b2`` consecutive query tiles), in slot g mod n_slots. Its R-step
    jobs (key row × key-tile split, :func:`_rows_v2_job`) fill the slot, its L-step jobs (tile × column × row
    block, :func:`_cols_job`) read it. Each program takes a ticket (``SYNC[0]``) when it starts, so jobs start
    in ticket order: R(0) … R(lag − 1), then per group g the R-step jobs of g + lag followed by the L-step jobs
    of g. An L-step job waits for its group's R-step count (``SYNC[1 + g]``), an R-step job for the L-step
    count (``SYNC[1 + n_groups + g]``) of the group that used its slot before (g − n_slots); both wait only on
    smaller tickets, held by programs already running, so the launch cannot deadlock (needs n_slots > lag).
    The lag sets how long before its L-step jobs a group's R-step jobs start; the ring must cover it."""
    tiles = BLOCK_M // b2
    n_fk = n_key_tiles * b1
    n_r = b1 * n_f_split  # R-step jobs per group
    n_ib = tl.cdiv(b1, BLOCK_I)
    n_l = tiles * b2 * n_ib  # L-step jobs per group
    per = n_r + n_l
    t = tl.atomic_add(SYNC, 1)  # this program's ticket
    # ticket -> (R-step job?, group, job index): lead-in R(0 … lag-1), steady blocks [R(g + lag), L(g)], tail L
    head = lag * n_r
    u = t - head
    blk = u // per
    r = u - blk * per
    lead = t < head
    steady = (t >= head) & (blk + lag < n_groups)
    u_tail = u - (n_groups - lag) * per
    is_r = lead | (steady & (r < n_r))
    g = tl.where(lead, t // n_r, tl.where(steady, tl.where(r < n_r, blk + lag, blk), n_groups - lag + u_tail // n_l))
    job = tl.where(lead, t % n_r, tl.where(steady, tl.where(r < n_r, r, r - n_r), u_tail % n_l))

    n_ag = tl.cdiv(n_a, tiles)
    bh = g // n_ag
    a_first = (g % n_ag) * tiles
    n_tiles = tl.minimum(tiles, n_a - a_first)
    slab = (g % n_slots).to(tl.int64) * tiles * b2 * n_fk  # slot layout (tile, j, f*b1 + k, d), as the chunks
    if is_r:
        if g >= n_slots:
            _wait_at_least(SYNC + 1 + n_groups + g - n_slots, n_l)
        fs = job // b1
        _rows_v2_job(
            Q, K, V, ALPHA, Y, C, ALLOWED, sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h,
            bh // n_heads, bh % n_heads, job % b1, a_first, n_tiles, fs * f_per_prog, (fs + 1) * f_per_prog, slab,
            n_key_tiles, b1, b2, scale_log2,
            q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce,
            k_height, k_width, k_h_in, k_w_in, k_f_tied, k_h_reduce, k_w_reduce, D, BLOCK_M, BLOCK_L, UPCAST,
        )
        tl.debug_barrier()  # every thread's stores before the release
        tl.atomic_add(SYNC + 1 + g, 1, sem="release")
    else:
        _wait_at_least(SYNC + 1 + g, n_r)
        t_local = job // (b2 * n_ib)
        col = (job // n_ib) % b2
        if t_local < n_tiles:  # the last group of a head may have fewer tiles
            _cols_job(
                Q, ALPHA, Y, C, ALLOWED, OUT, sq_b, sq_n, sq_h, so_b, so_n, so_h,
                bh // n_heads, bh % n_heads, a_first + t_local, col, job % n_ib,
                slab + (t_local * b2 + col).to(tl.int64) * n_fk, n_key_tiles, b1, scale_log2,
                q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce,
                D, BLOCK_I, BLOCK_K, UPCAST, ".cg", L_STAGES,
            )
        tl.debug_barrier()  # every thread's loads of the slot before the release
        tl.atomic_add(SYNC + 1 + n_groups + g, 1, sem="release")


# ---------------------------------------------------------------------------------------------------------
# Launcher


def _rows_default(b2: int, d: int) -> dict:
    # Two fp32 accumulators (α, Y) of BLOCK_J × d: 8 warps keep them at ≤ 64 registers per thread for d = 128.
    # BLOCK_L ≤ 64: (64, 128) blocks spill at d = 128 (sm_90 resource report, kernels/NOTES.md)
    return {"BLOCK_J": pow2(b2, 16, 64), "BLOCK_L": pow2(b2, 16, 64), "num_warps": 8 if d >= 128 else 4,
            "num_stages": 2}


def _rows_candidates(b2: int, d: int) -> list[dict]:
    blocks_j, blocks_l = sorted({pow2(b2, 16, 32), pow2(b2, 16, 64)}), sorted({pow2(b2, 16, 64), pow2(b2, 16, 128)})
    return [
        {"BLOCK_J": bj, "BLOCK_L": bl, "num_warps": 8, "num_stages": st}
        for bj in blocks_j for bl in blocks_l for st in ((2, 3) if bl >= b2 else (2,))
    ]


def _default_version(b2: int) -> str:
    """The R-step version for tile width ``b2``: v2 holds a whole key row in one block, so b2 ≤ BLOCK_L = 64
    (128 spills at d = 128); v1 otherwise (720p's b2 = 80)."""
    return "v2" if b2 <= 64 else "v1"


def _rows_v2_default(b2: int, d: int, n_query_tiles: int) -> dict:
    """``n_query_tiles``: query tiles per launch (the scratch chunk)."""
    # Full clip: two query tiles per program (M = 128, 8 warps, 179 registers): each K/V row block serves both.
    # AR chunk (3 query tiles) or low-memory chunks: one tile per program at 4 warps (255 registers, no spills:
    # 2 CTAs per SM) and the key tiles split over 3 programs, for enough independent programs.
    if n_query_tiles >= 4:
        return {"BLOCK_M": 128, "F_SPLIT": 1, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 64, "F_SPLIT": 3, "num_warps": 4, "num_stages": 2}


def _rows_v2_candidates(b2: int, d: int, n_query_tiles: int) -> list[dict]:
    # F_SPLIT is a launch-grid choice only (no recompile): 4 compiles per shape. M = 64 at 8 warps (1 CTA per
    # SM, one tile per program) is v1's arrangement and left out; low-register configs (head dim in halves,
    # ≤ 128 registers) measured slower at every shape (kernels/NOTES.md) and are not candidates.
    splits = (1, 3) if n_query_tiles < 4 else (1, 2)
    configs = [{"BLOCK_M": bm, "num_warps": w, "num_stages": st} for bm, w in ((64, 4), (128, 8)) for st in (2, 3)]
    return [{**cfg, "F_SPLIT": sp} for cfg in configs for sp in splits]


def _cols_default(b1: int, d: int) -> dict:
    return {"BLOCK_I": pow2(b1, 16, 64), "BLOCK_K": 64, "num_warps": 4, "num_stages": 3 if d <= 128 else 2}


def _cols_candidates(b1: int, d: int) -> list[dict]:
    # about 8–10 compiles per shape in all (rows + cols): tuning stays well under 30 s. For b1 > 64 one
    # 128-row block reads each column's α/Y once instead of twice (no spills at 8 warps, sm_90 report).
    bi = pow2(b1, 16, 64)
    out = [{"BLOCK_I": bi, "BLOCK_K": bk, "num_warps": w, "num_stages": 3} for bk in (32, 64) for w in (4, 8)]
    if b1 > 64:
        out += [{"BLOCK_I": 128, "BLOCK_K": bk, "num_warps": 8, "num_stages": 3} for bk in (32, 64)]
    return out


# Keyword arguments of each kernel launch (constexprs + num_warps / num_stages) from a launch config: shared by
# the launcher and kernels/resources.py, so the resource report compiles exactly what the launcher runs.


def rows_meta(cfg: dict, b2: int, d: int, upcast: bool) -> dict:
    """``_monarch_rows_fwd`` keywords for a v1 rows config."""
    return {"D": d, "UPCAST": upcast, "SINGLE_BLOCK": b2 <= cfg["BLOCK_L"], **cfg}


def rows_v2_meta(cfg: dict, b2: int, n_key_tiles: int, d: int, upcast: bool) -> tuple[dict, int, int, int]:
    """``_monarch_rows_fwd_v2`` keywords for a v2 rows config, and the launch-grid integers it implies: (keywords,
    query tiles per program, key tiles per program, key-tile splits). ``F_SPLIT`` is a grid choice, not a
    kernel argument."""
    cfg = dict(cfg)
    tiles = cfg["BLOCK_M"] // b2
    if tiles < 1:
        raise ToolkitError(f"v2 rows config BLOCK_M={cfg['BLOCK_M']} is smaller than the tile width {b2}")
    f_per = triton.cdiv(n_key_tiles, cfg.pop("F_SPLIT", 1))
    return {"D": d, "BLOCK_L": pow2(b2, 16), "UPCAST": upcast, **cfg}, tiles, f_per, triton.cdiv(n_key_tiles, f_per)


def cols_meta(cfg: dict, d: int, upcast: bool) -> dict:
    """``_monarch_cols_fwd`` keywords for a cols config."""
    return {"D": d, "UPCAST": upcast, **cfg}


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gq: TileGeometry, gk: TileGeometry) -> None:
    """The launcher's constraints (also checked on fake tensors while ``torch.compile`` traces)."""
    B, n_q, H, D = q.shape
    if n_q != gq.n_tokens or k.shape[1] != gk.n_tokens or v.shape[:3] != k.shape[:3] or k.shape[0] != B:
        raise ToolkitError(
            f"q {tuple(q.shape)} / k {tuple(k.shape)} / v {tuple(v.shape)} do not match frames "
            f"{gq.frames} / {gk.frames} of grid {gq.grid}"
        )
    check_head_dim(D)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or {k.dtype, v.dtype} != {q.dtype}:
        raise ToolkitError(f"unsupported dtypes q {q.dtype}, k {k.dtype}, v {v.dtype} (one of bf16, fp16, fp32)")
    if q.is_cuda and q.dtype == torch.float64:
        raise ToolkitError("float64 runs only under the Triton interpreter (CPU tests); use fp32/bf16 on the GPU")
    if not (q.device == k.device == v.device):
        raise ToolkitError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")


def monarch_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    tiling: tuple[int, int, int] = (1, 1, 1),
    *,
    query_frames: tuple[int, int] | None = None,
    key_frames: tuple[int, int] | None = None,
    block_causal_frames: int | None = None,
    scale: float | None = None,
    scratch_bytes: int | None = None,
) -> torch.Tensor:
    """Monarch attention (T = 1) of raster-order ``q`` (``b i h d``, frames ``query_frames``, default the whole
    grid) against ``k, v`` (``b j h d``, frames ``key_frames``, default ``query_frames``) on the token ``grid``
    (frames, height, width) with tiling (f_tied, h_reduce, w_reduce). Same contract as
    ``toolkit.attention.monarch.monarch_attention`` (iters=1).

    ``block_causal_frames``: queries in chunk c see key tiles up to the end of chunk c (training path).
    ``scale``: logit scale, default d**-0.5. A head dim that is not a power of two ≥ 16 is zero-padded to one (a
    copy of q, k, v). ``scratch_bytes``: budget for the α/Y/c intermediates (default
    ``DEFAULT_SCRATCH_BYTES``); work runs in chunks that fit: several query tiles of all heads; when one query
    tile of all heads is over budget, both steps in one launch with the intermediates in a ring of (head, query
    tile) slots cut to the budget (the streamed kernel, faster there than chunks of a head group), or, for tiles
    wider than 64 columns, one query tile of a group of heads. At least one (head, query tile) slot is used.
    Launch configs: cached on disk or heuristic; env ``TOOLKIT_KERNEL_AUTOTUNE=1`` tunes them once per shape.
    Returns ``b i h d`` in q's dtype; accumulation is fp32, α and Y are kept in q's dtype. Runs as the custom op
    ``torch.ops.toolkit.monarch_attention`` (usable under ``torch.compile``).
    """
    grid = tuple(int(x) for x in grid)
    tiling = tuple(int(x) for x in tiling)
    query_frames = tuple(int(x) for x in query_frames) if query_frames is not None else (0, grid[0])
    key_frames = tuple(int(x) for x in key_frames) if key_frames is not None else query_frames
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else float(scale)
    pad = pow2(d, 16) - d
    if pad:  # e.g. the bundled model's d = 40: zero columns add nothing to q·k, and v's give output columns dropped
        q, k, v = (torch.nn.functional.pad(x, (0, pad)) for x in (q, k, v))
    _check_inputs(q, k, v, TileGeometry(grid, tiling, query_frames), TileGeometry(grid, tiling, key_frames))
    out = _monarch_attention_op(
        q, k, v, list(grid), list(tiling), list(query_frames), list(key_frames),
        None if block_causal_frames is None else int(block_causal_frames), scale,
        None if scratch_bytes is None else int(scratch_bytes),
    )
    return out[..., :d] if pad else out


@torch.library.custom_op("toolkit::monarch_attention", mutates_args=())
def _monarch_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: list[int], tiling: list[int],
    query_frames: list[int], key_frames: list[int], block_causal_frames: int | None, scale: float,
    scratch_bytes: int | None,
) -> torch.Tensor:
    """The forward as a ``torch.library`` op (arguments resolved by :func:`monarch_attention_triton`)."""
    return _forward(q, k, v, grid, tiling, query_frames=query_frames, key_frames=key_frames,
                    block_causal_frames=block_causal_frames, scale=scale, scratch_bytes=scratch_bytes)


@_monarch_attention_op.register_fake
def _(q, k, v, grid, tiling, query_frames, key_frames, block_causal_frames, scale, scratch_bytes):
    return q.new_empty(q.shape)  # out: b i h d, q's dtype and device, contiguous (as _forward allocates it)


def _setup_backward(ctx, inputs, output) -> None:
    q, k, v, grid, tiling, query_frames, key_frames, block_causal_frames, scale, scratch_bytes = inputs
    ctx.save_for_backward(q, k, v, output)
    ctx.call = (grid, tiling, query_frames, key_frames, block_causal_frames, scale, scratch_bytes)


def _backward(ctx, grad_out: torch.Tensor):
    """dq, dk, dv from the backward kernels, through their own op (opaque to tracing, like the forward)."""
    q, k, v, out = ctx.saved_tensors
    grid, tiling, query_frames, key_frames, block_causal_frames, scale, _ = ctx.call
    if TileGeometry(tuple(grid), tuple(tiling), tuple(query_frames)).b1 > MAX_BACKWARD_ROWS:
        # the only fallback: the L-step backward kernel holds a column's b1 rows in one block
        grads = _reference_backward(q, k, v, grad_out, grid, tiling, query_frames, key_frames, block_causal_frames,
                                    scale)
    else:
        grads = _monarch_attention_backward_op(q, k, v, out, grad_out.contiguous(), *ctx.call)
    return (*grads, None, None, None, None, None, None, None)


@torch.library.custom_op("toolkit::monarch_attention_backward", mutates_args=())
def _monarch_attention_backward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor, grid: list[int],
    tiling: list[int], query_frames: list[int], key_frames: list[int], block_causal_frames: int | None,
    scale: float, scratch_bytes: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`_monarch_attention_op` (``kernels/monarch_backward.py``): the forward's R-step
    recomputes α, Y, c chunk by chunk, the backward kernels run on each chunk; scratch within ``scratch_bytes``."""
    gq, gk = TileGeometry(tuple(grid), tuple(tiling), tuple(query_frames)), TileGeometry(
        tuple(grid), tuple(tiling), tuple(key_frames))
    budget = DEFAULT_BACKWARD_SCRATCH_BYTES if scratch_bytes is None else scratch_bytes
    share = scratch_share(gq, gk, q.shape[-1], q.element_size())

    def recompute_rows(step) -> None:
        _forward(q, k, v, grid, tiling, query_frames=query_frames, key_frames=key_frames,
                 block_causal_frames=block_causal_frames, scale=scale, scratch_bytes=max(1, int(budget * share)),
                 after_rows=step)

    return monarch_attention_backward(q, k, v, out, grad_out, gq, gk, block_causal_frames, scale, recompute_rows)


def _reference_backward(q, k, v, grad_out, grid, tiling, query_frames, key_frames, block_causal_frames, scale):
    """dq, dk, dv by autograd of the PyTorch reference in float32 (every α, Y, L, R materialised)."""
    from toolkit.attention.monarch import monarch_attention
    from toolkit.grid import MonarchLayout

    with torch.enable_grad():
        leaves = [x.detach().float().requires_grad_(True) for x in (q, k, v)]
        out = monarch_attention(*leaves, grid, layout=MonarchLayout.aligned(grid, "fh,w", tiling),
                                query_frames=query_frames, key_frames=key_frames,
                                block_causal_frames=block_causal_frames, scale=scale)
        grads = torch.autograd.grad(out, leaves, grad_out.float())
    return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v)))


@_monarch_attention_backward_op.register_fake
def _(q, k, v, out, grad_out, grid, tiling, query_frames, key_frames, block_causal_frames, scale, scratch_bytes):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the kernels write them


_monarch_attention_op.register_autograd(_backward, setup_context=_setup_backward)


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid,
    tiling,
    *,
    query_frames=None,
    key_frames=None,
    block_causal_frames: int | None = None,
    scale: float | None = None,
    scratch_bytes: int | None = None,
    autotune: bool | None = None,
    configs: tuple[dict, dict] | None = None,
    out: torch.Tensor | None = None,
    stages: str = "both",
    version: str | None = None,
    after_rows: Callable[[tuple[int, int, int, int], tuple[torch.Tensor, ...]], None] | None = None,
) -> torch.Tensor | None:
    """The launcher behind the op, with the benchmark's and the tests' switches (not part of the public API).

    ``autotune``: tune launch configs once per shape and cache them on disk (default: env
    ``TOOLKIT_KERNEL_AUTOTUNE=1``; otherwise cached or heuristic configs). ``configs``: explicit launch configs
    (rows kernel, cols kernel), e.g. small blocks in tests (a rows config with BLOCK_M is v2's, one with
    BLOCK_J v1's). ``out``: buffer to write (``b i h d``, e.g. NaN-filled in tests). ``stages``: "both"; "rows"
    or "cols" launch only that kernel (per-stage timing; the result is then not the attention output).
    ``version``: R-step kernel ``v1`` or ``v2`` (default :func:`_default_version`; v2 falls back to v1 where b2
    > 64). Both give the same result (tested). ``fused``: the one-kernel CUDA forward of ``monarch_fused.py``
    (CUDA only, b1 ≤ 32, b2 ≤ 64; the same function, tested against this launcher on the GPU). ``after_rows``:
    called as ``after_rows((h0, h1, a0, a1), (alpha, y, c))`` after each scratch chunk's R-step instead of the
    L-step (the backward's recomputation; no output, None).
    """
    grid = tuple(int(x) for x in grid)
    tiling = tuple(int(x) for x in tiling)
    query_frames = tuple(int(x) for x in query_frames) if query_frames is not None else (0, grid[0])
    key_frames = tuple(int(x) for x in key_frames) if key_frames is not None else query_frames
    gq = TileGeometry(grid, tiling, query_frames)
    gk = TileGeometry(grid, tiling, key_frames)
    _check_inputs(q, k, v, gq, gk)
    B, n_q, H, D = q.shape
    if stages not in ("both", "rows", "cols"):
        raise ToolkitError(f"stages must be both, rows or cols, not {stages!r}")
    b1, b2, A, F = gq.b1, gq.b2, gq.num_tiles, gk.num_tiles
    chosen = version is not None
    version = version or _default_version(b2)
    if version == FUSED:
        if stages != "both" or after_rows is not None:
            raise ToolkitError("the fused forward has no separate stages and keeps no intermediates")
        return monarch_fused_forward(q, k, v, grid, tiling, query_frames=query_frames, key_frames=key_frames,
                                     block_causal_frames=block_causal_frames,
                                     scale=D**-0.5 if scale is None else float(scale), out=out)
    if version not in (*_VERSIONS, STREAMED):
        raise ToolkitError(f"version must be one of {', '.join((*_VERSIONS, STREAMED, FUSED))}, not {version!r}")
    if version == STREAMED and (stages != "both" or after_rows is not None):
        raise ToolkitError("the streamed forward has no separate stages and keeps no intermediates")
    if version in ("v2", STREAMED) and _default_version(b2) != "v2":
        version = "v1"
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    scale = D**-0.5 if scale is None else float(scale)
    allowed = key_tiles_allowed_on(q.device, gq, gk, block_causal_frames)

    strides_q, strides_k, strides_v = (token_strides(x) for x in (q, k, v))
    # vector offsets in the kernels are 32-bit (per batch-head tensor / per column slab); bases are 64-bit
    # (v2 programs address up to 128 rows (query tile, column) of F·b1 slots each from one base)
    if max(n_q * strides_q[1], k.shape[1] * max(strides_k[1], strides_v[1]), max(b2, 128) * F * b1 * D) >= 2**31:
        raise ToolkitError("a single batch/head tensor exceeds 2**31 elements; split the call")
    scale_log2 = scale * LOG2E
    tune = autotune_enabled(autotune)
    upcast = upcast_dots(q.dtype)
    key = f"B{B} H{H} D{D} {q.dtype} grid{grid} tiling{tiling} q{query_frames} k{key_frames} bc{block_causal_frames}"

    per_unit = intermediate_bytes_per_tile(b1, b2, F, D, q.element_size())
    budget = DEFAULT_SCRATCH_BYTES if scratch_bytes is None else int(scratch_bytes)
    if streamed_fits_better(chosen, version, B * H * per_unit, budget, stages, after_rows is None and configs is None):
        version = STREAMED
    if version == STREAMED:
        out = output_buffer(out, tuple(q.shape), q.dtype, q.device)
        launch = _streamed_launch(q, k, v, out, gq, gk, allowed, scale_log2, per_unit, budget, upcast)
        # the budget caps the ring, so it is part of the tuning key: a config tuned with more slots is not the
        # best one within fewer (counted in slots of the default group size)
        default = _streamed_default(b1, b2)
        candidates = streamed_groups_within(_streamed_candidates(b1, b2), b2, per_unit, budget)
        ring_cap = min(max(c["SLOTS"] for c in candidates), budget // (per_unit * (default["BLOCK_M"] // b2)))
        cfg = configs[0] if configs is not None else pick_config(
            f"monarch streamed {key} ring<={ring_cap}", default, candidates, launch, tune)
        launch(cfg)
        return out
    h_chunk, a_chunk = scratch_chunk(B, H, A, per_unit, budget)
    # Scratch chunks (h0, h1, a0, a1), head groups outermost so K/V of the group stay in L2 across its tiles;
    # balanced groups (no small last one), the buffers sized for the largest. The kernels see a head group
    # through views of q, k, v, out (same strides, shifted base) and H = h1 − h0.
    n_hg, n_ag = -(-H // h_chunk), -(-A // a_chunk)
    h_chunk, a_chunk = -(-H // n_hg), -(-A // n_ag)
    h_bounds = [H * g // n_hg for g in range(n_hg + 1)]
    a_bounds = [A * g // n_ag for g in range(n_ag + 1)]
    chunks = [(h0, h1, a0, a1) for h0, h1 in zip(h_bounds[:-1], h_bounds[1:])
              for a0, a1 in zip(a_bounds[:-1], a_bounds[1:])]
    buf = tuple(scratch(shape, dt, q.device) for shape, dt in (
        ((B * h_chunk, a_chunk, b2, F * b1, D), q.dtype), ((B * h_chunk, a_chunk, b2, F * b1, D), q.dtype),
        ((B * h_chunk, a_chunk, b2, F * b1), torch.float32)))
    out = None if after_rows is not None else output_buffer(out, tuple(q.shape), q.dtype, q.device)


    def heads_of(x: torch.Tensor, h0: int, h1: int) -> torch.Tensor:
        return x if (h0, h1) == (0, H) else x[:, :, h0:h1]

    def rows(cfg: dict, chunk: tuple) -> None:
        (h0, h1, a0, a1), (alpha, y, c) = chunk, buf
        grid_r = (b1 * triton.cdiv(b2, cfg["BLOCK_J"]), a1 - a0, B * (h1 - h0))
        _monarch_rows_fwd[grid_r](
            *(heads_of(x, h0, h1) for x in (q, k, v)), alpha, y, c, allowed, *strides_q, *strides_k, *strides_v,
            h1 - h0, a0, a_chunk, F, b1, b2, scale_log2, *gq.args(), *gk.args(), **rows_meta(cfg, b2, D, upcast),
        )

    def rows_v2(cfg: dict, chunk: tuple) -> None:
        (h0, h1, a0, a1), (alpha, y, c) = chunk, buf
        meta, tiles, f_per, n_split = rows_v2_meta(cfg, b2, F, D, upcast)
        grid_r = (b1, triton.cdiv(a1 - a0, tiles) * n_split, B * (h1 - h0))
        _monarch_rows_fwd_v2[grid_r](
            *(heads_of(x, h0, h1) for x in (q, k, v)), alpha, y, c, allowed, *strides_q, *strides_k, *strides_v,
            h1 - h0, a0, a_chunk, a1 - a0, tiles, F, f_per, n_split, b1, b2, scale_log2, *gq.args(), *gk.args(),
            **meta,
        )

    def cols(cfg: dict, chunk: tuple) -> None:
        (h0, h1, a0, a1), (alpha, y, c) = chunk, buf
        grid_c = (b2 * triton.cdiv(b1, cfg["BLOCK_I"]), a1 - a0, B * (h1 - h0))
        _monarch_cols_fwd[grid_c](
            heads_of(q, h0, h1), alpha, y, c, allowed, heads_of(out, h0, h1), *strides_q, *token_strides(out),
            h1 - h0, a0, a_chunk, F, b1, b2, scale_log2, *gq.args(), **cols_meta(cfg, D, upcast),
        )

    first = chunks[0]
    if configs is not None:
        cfg_r, cfg_c = configs
        version = "v2" if "BLOCK_M" in cfg_r else "v1"  # the rows config names its kernel's blocks
    elif version == "v2":
        # the grid depends on the work per launch, so the scratch chunk is part of the key
        chunk_key = f"achunk{a_chunk}" + (f" hchunk{h_chunk}" if h_chunk < H else "")
        cfg_r = pick_config(f"monarch rows v2 {key} {chunk_key}", _rows_v2_default(b2, D, first[3] - first[2]),
                            _rows_v2_candidates(b2, D, first[3] - first[2]), lambda cfg: rows_v2(cfg, first), tune)
        cfg_c = None
    else:
        cfg_r = pick_config(f"monarch rows {key}", _rows_default(b2, D), _rows_candidates(b2, D),
                            lambda cfg: rows(cfg, first), tune)
        cfg_c = None
    rows_fn = rows_v2 if version == "v2" else rows

    for chunk in chunks:
        if stages != "cols":
            rows_fn(cfg_r, chunk)
        if after_rows is not None:
            after_rows(chunk, buf)
            continue
        if stages != "rows":
            if cfg_c is None:  # tuned (if at all) after the first R-step launch: its intermediates are in place
                cfg_c = pick_config(f"monarch cols {key}", _cols_default(b1, D), _cols_candidates(b1, D),
                                    lambda cfg: cols(cfg, first), tune)
            cols(cfg_c, chunk)
    return out


def intermediate_bytes_per_tile(b1: int, b2: int, n_key_tiles: int, head_dim: int, element_size: int) -> int:
    """Bytes of the α, Y (``element_size`` each) and c (fp32) intermediates of one (batch·head, query tile) over
    all key tiles: the unit of the two-stage kernels' scratch chunks and of the streamed kernel's ring slots."""
    return b2 * n_key_tiles * b1 * (2 * head_dim * element_size + 4)


def streamed_fits_better(chosen: bool, version: str, tile_bytes: int, budget: int, stages: str, plain: bool) -> bool:
    """Whether a call runs the streamed kernel instead of the two-stage kernels: when the caller chose no version,
    the two-stage kernel would be v2, and the budget cannot hold one query tile of all heads (``tile_bytes``), so
    the two-stage kernels would run chunks of one tile of a head group. The streamed kernel within the same
    budget was faster at all five 480p shapes in every run (one H100, each in one process with the chunks:
    1.2–1.8× at the full clip, 1.2–3× at the last AR chunk, where the host sets the chunks' pace; kernels/NOTES.md
    "Both steps in one launch"). ``plain``: no benchmark or backward switches (explicit configs, per-step
    callbacks), whose chunks the two-stage kernels define."""
    return not chosen and version == "v2" and budget < tile_bytes and stages == "both" and plain


def streamed_groups_within(candidates: list[dict], b2: int, per_unit: int, budget: int) -> list[dict]:
    """The streamed ``candidates`` whose group's slot (``BLOCK_M // b2`` query tiles of ``per_unit`` bytes) fits
    ``budget``; if none does, those of the smallest group, the minimum the algorithm needs (a cached pick outside
    them is tuned afresh by ``pick_config``)."""
    tiles = [c["BLOCK_M"] // b2 for c in candidates]
    cap = max(budget // per_unit, min(tiles))
    return [c for c, n in zip(candidates, tiles) if n <= cap]


def _streamed_default(b1: int, b2: int) -> dict:
    """One query tile per group at 4 warps (the v2 R-step's M = 64 config: two programs per SM), key tiles over
    2 R-step jobs, a ring of 8 slots with lag 6: the fastest measured at all four paper shapes on an H100
    (kernels/NOTES.md "Both steps in one launch"); a smaller budget cuts the ring and the lag. The L-step's key
    loop runs 3 stages deep (the kernel's other loop 2): 1–6 % faster than 2 at all five 480p shapes with and
    without a budget (one H100, one process); 4 stages tie at b1 ≤ 32 and are 47 % slower at (3,1,1)."""
    return {"BLOCK_M": pow2(b2, 16, 64), "F_SPLIT": 2, "BLOCK_I": pow2(b1, 16, 64), "BLOCK_K": 64, "SLOTS": 8,
            "LAG": 6, "num_warps": 4, "num_stages": 2, "L_STAGES": 3}


def _streamed_candidates(b1: int, b2: int) -> list[dict]:
    # four compiles: one or two query tiles per group, and one tile with the L-step's key loop 2 or 4 stages deep
    # instead of 3 (sm_90 report at d = 128, 32-row columns: 88 KB of shared memory for 2–3 stages, 109 KB for 4,
    # two programs per SM either way). The ring, the lag and the key-tile split are launch arguments only; rings
    # the scratch budget cannot hold are cut to it by the launcher.
    base = _streamed_default(b1, b2)
    out = []
    for bm, warps in ((64, 4), (128, 8)):
        if bm // b2 < 1:
            continue
        for split in (1, 2, 3):
            for slots, lag in ((4, 2), (5, 3), (6, 4), (8, 6)):
                out.append({**base, "BLOCK_M": bm, "num_warps": warps, "F_SPLIT": split, "SLOTS": slots, "LAG": lag})
    if base["BLOCK_M"] // b2 >= 1:
        out += [{**base, "F_SPLIT": split, "SLOTS": slots, "LAG": lag, "L_STAGES": stages}
                for stages in (None, 4) for split in (1, 2, 3) for slots, lag in ((5, 3), (8, 6))]
    return out


def streamed_meta(cfg: dict, b2: int, d: int, upcast: bool) -> dict:
    """``_monarch_streamed_fwd`` keywords for a streamed config (the ring, lag and split are launch arguments)."""
    skip = ("F_SPLIT", "SLOTS", "LAG")
    return {"D": d, "BLOCK_L": pow2(b2, 16), "UPCAST": upcast, **{k: v for k, v in cfg.items() if k not in skip}}


def streamed_ring(slots: int, lag: int, n_groups: int, slots_fit: int) -> tuple[int, int]:
    """(slots, lag) of the streamed kernel's ring for a config's ``slots`` and ``lag``: the slots cut to the
    groups and to the ``slots_fit`` the budget holds (at least one); the lag at most slots − 1 (the ticket order
    needs a slot for each group between a group's first R-step job and its L-step jobs) and, from three slots
    up, at most slots − 2, so that the group that used a slot before has had a group's time to finish reading it
    (one H100, one process, full clip (1,1,1): 5 slots took 4.78 ms with lag 3, 5.41 with lag 4; NOTES.md)."""
    slots = max(1, min(n_groups, slots, slots_fit))
    return slots, min(lag, slots - 1 if slots < 3 else slots - 2)


def _streamed_launch(q, k, v, out, gq: TileGeometry, gk: TileGeometry, allowed: torch.Tensor, scale_log2: float,
                     per_unit: int, budget: int, upcast: bool) -> Callable[[dict], None]:
    """The launch of :func:`_monarch_streamed_fwd` for a config, its ring cut to ``budget`` by
    :func:`streamed_ring`."""
    B, _, H, D = q.shape
    b1, b2, A, F = gq.b1, gq.b2, gq.num_tiles, gk.num_tiles

    def launch(cfg: dict) -> None:
        tiles = cfg["BLOCK_M"] // b2
        if tiles < 1:
            raise ToolkitError(f"streamed config BLOCK_M={cfg['BLOCK_M']} is smaller than the tile width {b2}")
        n_groups = B * H * triton.cdiv(A, tiles)
        slots, lag = streamed_ring(cfg["SLOTS"], cfg["LAG"], n_groups, budget // (tiles * per_unit))
        f_per = triton.cdiv(F, cfg["F_SPLIT"])
        n_split = triton.cdiv(F, f_per)
        n_jobs = n_groups * (b1 * n_split + tiles * b2 * triton.cdiv(b1, cfg["BLOCK_I"]))
        alpha, y = (scratch((slots, tiles, b2, F * b1, D), q.dtype, q.device) for _ in range(2))
        c = scratch((slots, tiles, b2, F * b1), torch.float32, q.device)
        sync = torch.zeros(1 + 2 * n_groups, dtype=torch.int32, device=q.device)
        _monarch_streamed_fwd[(n_jobs,)](
            q, k, v, alpha, y, c, allowed, out, sync,
            *token_strides(q), *token_strides(k), *token_strides(v), *token_strides(out),
            H, A, n_groups, slots, lag, F, f_per, n_split, b1, b2, scale_log2, *gq.args(), *gk.args(),
            **streamed_meta(cfg, b2, D, upcast),
        )

    return launch


def scratch_chunk(B: int, H: int, A: int, per_unit: int, budget: int) -> tuple[int, int]:
    """(heads, query tiles) per scratch chunk: as many query tiles of all heads as fit ``budget``; if not even
    one fits, one query tile of as many heads as fit (at least one: the minimum the algorithm needs)."""
    per_tile = B * H * per_unit
    if budget >= per_tile:
        return H, max(1, min(A, budget // per_tile))
    return max(1, min(H, budget // (B * per_unit))), 1


def monarch_backend_triton(
    tiling: tuple[int, int, int] = (1, 1, 1), *, block_causal_frames: int = 3, cpu_fallback: bool = True
) -> Backend:
    """Seam backend ``fn(q, k, v, ctx) -> out`` running :func:`monarch_attention_triton` with ``tiling``.

    Bidirectional calls and KV-cache calls (queries of one chunk, keys = the cache up to its end) need no mask;
    a call with ``ctx.attn_mask`` (the no-cache training path) must carry the ``block_causal_frames``
    block-causal mask (checked as in ``toolkit.attention.monarch.monarch_backend``) and runs block-causal.
    With ``cpu_fallback`` CPU tensors go to that PyTorch reference backend instead (same function, tested
    equal; the Triton interpreter is far too slow for a model).
    """
    from toolkit.attention.monarch import check_block_causal_mask, monarch_backend
    from toolkit.grid import as_grid

    tiling = tuple(int(x) for x in tiling)
    reference = monarch_backend(tiling, block_causal_frames=block_causal_frames)

    def monarch_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx) -> torch.Tensor:
        if cpu_fallback and not q.is_cuda:
            return reference(q, k, v, ctx)
        causal = None
        if ctx.attn_mask is not None:
            check_block_causal_mask(ctx.attn_mask, as_grid(ctx.grid), block_causal_frames, ctx)
            causal = block_causal_frames
        return monarch_attention_triton(
            q, k, v, ctx.grid, tiling, query_frames=ctx.query_frames, key_frames=ctx.key_frames,
            block_causal_frames=causal, scale=ctx.scale,
        )

    monarch_triton.__name__ = f"monarch_triton_{'_'.join(map(str, tiling))}"
    return monarch_triton
