r"""Streaming comparison of dense softmax attention A with a Monarch map M, per query row, nothing N×N stored.

Math (per batch, head and query row r = (a, i, j); keys (f, k, l) over the allowed key tiles; s = scale):

    A[r, (f,k,l)] = exp(s · q_r·k[f,k,l] − lse_r)                                   dense softmax
    M[r, (f,k,l)] = L[a,j,i,(f,k)] · R[a,f,k,j,l]                                    Monarch
    map_sq_err  = Σ (A − M)²        map_sq_norm = Σ A²        m_row_sum = Σ M
    out_err     = ‖(A − M) V‖ = ‖A V − M V‖₂ over d             out_norm = ‖A V‖₂

M is either *implicit* — the T = 1 variational map of ``kernels.monarch`` (R = softmax_l(s·q[a,k,j]·k[f,k,l]),
α = Σ_l R k, c = Σ_l R log R, L = softmax_(f,k)(s·q[a,i,j]·α − c)) recomputed from q and k in fp32 — or
*explicit*: factors L ``b h a j i f k`` and R ``b h a f k j l`` (layouts of ``kernels.explicit``).

Kernel ``_monarch_compare_fwd``: one program per (query tile a, column j, block of rows i), i.e. the query rows
that share R[a,·,·,j,·]. It walks the key rows (f, k) twice: pass 1 builds the dense log-sum-exp (and, implicit,
the log-sum-exp of L's logits) with online maxima; pass 2 forms A and M for the b2 keys of the row exactly and
accumulates Σ(A − M)² directly (no cancellation-prone expansion), A V on the tensor cores and M V from
Y = Σ_l R v. Costs about three dense attention matmuls; memory is O(rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from toolkit.kernels._common import (
    LOG2E,
    TileGeometry,
    check_head_dim,
    key_tiles_allowed_on,
    pow2,
    run_with_precision,
    tile_token,
    tl,
    token_strides,
    triton,
)
from toolkit.kernels.explicit import factor_shapes

from toolkit.errors import ToolkitError

if TYPE_CHECKING:
    from toolkit.attention.monarch import MonarchErrors


@triton.jit
def _row_softmax_stats(q_row, kk, mask_l, scale_log2):
    """R = softmax over the key row of s·q_row·k (log2 units) and Σ R log2 R, for one (a, f, k, j)."""
    rl = tl.sum(q_row[None, :] * kk, 1) * scale_log2
    rl = tl.where(mask_l, rl, float("-inf"))
    mr = tl.max(rl, 0)
    pr = tl.exp2(rl - mr)
    lr = tl.sum(pr, 0)
    r = pr / lr
    c2 = tl.sum(tl.where(mask_l, r * rl, 0.0), 0) - mr - tl.log2(lr)
    return r, c2


@triton.jit
def _monarch_compare_fwd(
    Q, K, V, LF, RF, ALLOWED, ERR,
    sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h,
    n_heads, n_query_tiles, n_key_tiles, b1, b2, scale_log2,
    q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce,
    k_height, k_width, k_h_in, k_w_in, k_f_tied, k_h_reduce, k_w_reduce,
    D: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_L: tl.constexpr, EXPLICIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_ij = tl.program_id(0)
    a = tl.program_id(1)
    pid_bh = tl.program_id(2)
    n_ib = tl.cdiv(b1, BLOCK_I)
    col = pid_ij // n_ib
    ib = pid_ij % n_ib
    b = pid_bh // n_heads
    h = pid_bh % n_heads

    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, D)
    mask_i = offs_i < b1
    mask_l = offs_l < b2
    q_base = Q + b.to(tl.int64) * sq_b + h * sq_h
    k_base = K + b.to(tl.int64) * sk_b + h * sk_h
    v_base = V + b.to(tl.int64) * sv_b + h * sv_h
    q_tok = tile_token(a, offs_i, col, q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce, q_w_reduce)
    q_tok = q_tok.to(tl.int64)
    qc = tl.load(q_base + q_tok[:, None] * sq_n + offs_d[None, :], mask=mask_i[:, None], other=0.0)
    qc32 = qc.to(tl.float32)
    n_allowed = tl.load(ALLOWED + a)
    n_fk = n_key_tiles * b1
    # explicit factors: L[b, h, a, j, i, (f k)], R[b, h, a, f, k, j, l]
    l_rows = ((pid_bh.to(tl.int64) * n_query_tiles + a) * b2 + col) * b1 + offs_i
    r_base = (pid_bh.to(tl.int64) * n_query_tiles + a) * n_fk

    # Pass 1: log-sum-exp (log2 units) of the dense logits and, implicit, of L's logits.
    m_a = tl.full([BLOCK_I], float("-inf"), tl.float32)
    l_a = tl.zeros([BLOCK_I], tl.float32)
    m_l = tl.full([BLOCK_I], float("-inf"), tl.float32)
    l_l = tl.zeros([BLOCK_I], tl.float32)
    for f in range(0, n_allowed):
        for row in range(0, b1):
            k_tok = tile_token(f, row, offs_l, k_height, k_width, k_h_in, k_w_in, k_f_tied, k_h_reduce, k_w_reduce)
            kk = tl.load(k_base + k_tok.to(tl.int64)[:, None] * sk_n + offs_d[None, :], mask=mask_l[:, None],
                         other=0.0)
            x = tl.dot(qc32, tl.trans(kk.to(tl.float32)), input_precision=PRECISION) * scale_log2
            x = tl.where(mask_l[None, :], x, float("-inf"))
            m_new = tl.maximum(m_a, tl.max(x, 1))
            l_a = l_a * tl.exp2(m_a - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), 1)
            m_a = m_new
            if not EXPLICIT:
                qr_tok = tile_token(a, row, col, q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce,
                                    q_w_reduce)
                q_row = tl.load(q_base + qr_tok.to(tl.int64) * sq_n + offs_d).to(tl.float32)
                kk32 = kk.to(tl.float32)
                r, c2 = _row_softmax_stats(q_row, kk32, mask_l, scale_log2)
                alpha = tl.sum(r[:, None] * kk32, 0)
                z = tl.sum(qc32 * alpha[None, :], 1) * scale_log2 - c2
                m_new = tl.maximum(m_l, z)
                l_l = l_l * tl.exp2(m_l - m_new) + tl.exp2(z - m_new)
                m_l = m_new
    lse_a = m_a + tl.log2(l_a)
    lse_l = m_l + tl.log2(l_l)

    # Pass 2: A and M over each key row exactly.
    sq_err = tl.zeros([BLOCK_I], tl.float32)
    sq_a = tl.zeros([BLOCK_I], tl.float32)
    m_sum = tl.zeros([BLOCK_I], tl.float32)
    out_a = tl.zeros([BLOCK_I, D], tl.float32)
    out_m = tl.zeros([BLOCK_I, D], tl.float32)
    for f in range(0, n_allowed):
        for row in range(0, b1):
            k_tok = tile_token(f, row, offs_l, k_height, k_width, k_h_in, k_w_in, k_f_tied, k_h_reduce, k_w_reduce)
            k_tok = k_tok.to(tl.int64)
            kk32 = tl.load(k_base + k_tok[:, None] * sk_n + offs_d[None, :], mask=mask_l[:, None],
                           other=0.0).to(tl.float32)
            vv32 = tl.load(v_base + k_tok[:, None] * sv_n + offs_d[None, :], mask=mask_l[:, None],
                           other=0.0).to(tl.float32)
            x = tl.dot(qc32, tl.trans(kk32), input_precision=PRECISION) * scale_log2
            p_a = tl.where(mask_l[None, :], tl.exp2(x - lse_a[:, None]), 0.0)
            if EXPLICIT:
                r = tl.load(RF + ((r_base + f * b1 + row) * b2 + col) * b2 + offs_l, mask=mask_l,
                            other=0.0).to(tl.float32)
                l_col = tl.load(LF + l_rows * n_fk + f * b1 + row, mask=mask_i, other=0.0).to(tl.float32)
            else:
                qr_tok = tile_token(a, row, col, q_height, q_width, q_h_in, q_w_in, q_f_tied, q_h_reduce,
                                    q_w_reduce)
                q_row = tl.load(q_base + qr_tok.to(tl.int64) * sq_n + offs_d).to(tl.float32)
                r, c2 = _row_softmax_stats(q_row, kk32, mask_l, scale_log2)
                r = tl.where(mask_l, r, 0.0)
                alpha = tl.sum(r[:, None] * kk32, 0)
                z = tl.sum(qc32 * alpha[None, :], 1) * scale_log2 - c2
                l_col = tl.exp2(z - lse_l)
            diff = p_a - l_col[:, None] * r[None, :]
            sq_err += tl.sum(diff * diff, 1)
            sq_a += tl.sum(p_a * p_a, 1)
            m_sum += l_col * tl.sum(r, 0)
            out_a += tl.dot(p_a, vv32, input_precision=PRECISION)
            y = tl.sum(r[:, None] * vv32, 0)
            out_m += l_col[:, None] * y[None, :]
    d_out = out_a - out_m
    out_err = tl.sqrt(tl.sum(d_out * d_out, 1))
    out_norm = tl.sqrt(tl.sum(out_a * out_a, 1))
    # ERR: (5, b, h, i) rows of the result; the token index is raster within the query frames.
    n_rows = tl.num_programs(1) * b1 * b2
    err_base = ERR + pid_bh.to(tl.int64) * n_rows + q_tok
    plane = tl.num_programs(2).to(tl.int64) * n_rows
    tl.store(err_base, sq_err, mask=mask_i)
    tl.store(err_base + plane, sq_a, mask=mask_i)
    tl.store(err_base + 2 * plane, out_err, mask=mask_i)
    tl.store(err_base + 3 * plane, out_norm, mask=mask_i)
    tl.store(err_base + 4 * plane, m_sum, mask=mask_i)


@dataclass
class RowErrors:
    """Per query row (each ``b i h``, float32): Σ(A − M)², ΣA², ‖(A − M)V‖, ‖AV‖, ΣM; ``n_entries`` = attended
    map entries (query rows × allowed keys)."""

    map_sq_err: torch.Tensor
    map_sq_norm: torch.Tensor
    out_err: torch.Tensor
    out_norm: torch.Tensor
    monarch_row_sum: torch.Tensor
    n_entries: int = 0

    def per_head(self) -> MonarchErrors:
        """Sums over query rows as ``toolkit.attention.monarch.MonarchErrors`` with ``b h`` leading dims (the
        same numbers as its ``map_errors`` / ``exact_projection``, float64)."""
        from toolkit.attention.monarch import MonarchErrors

        def total(x: torch.Tensor) -> torch.Tensor:
            return x.double().sum(1)  # b i h -> b h

        return MonarchErrors(total(self.map_sq_err), total(self.map_sq_norm), self.n_entries,
                             total(self.out_err.double().square()), total(self.out_norm.double().square()))


def monarch_compare(
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
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RowErrors:
    """Per-row errors of a Monarch map against dense softmax attention, streaming (see the module docstring).

    q ``b i h d`` (frames ``query_frames``), k, v ``b j h d`` (frames ``key_frames``), raster order, as at the
    seam. ``factors=None``: M is the T = 1 variational map from q, k; ``factors=(L, R)``: explicit factors in the
    ``kernels.explicit`` layouts (a ``MonarchFactors`` is accepted too). With ``block_causal_frames`` both A
    and M range over the allowed key tiles.
    The key-tile width b2 must be ≤ 128 (true for every aligned (fh, w) tiling of the Wan grids).
    """
    grid = tuple(int(x) for x in grid)
    tiling = tuple(int(x) for x in tiling)
    query_frames = tuple(query_frames) if query_frames is not None else (0, grid[0])
    key_frames = tuple(key_frames) if key_frames is not None else query_frames
    gq, gk = TileGeometry(grid, tiling, query_frames), TileGeometry(grid, tiling, key_frames)
    B, n_q, H, D = q.shape
    if n_q != gq.n_tokens or k.shape[1] != gk.n_tokens or v.shape[:3] != k.shape[:3]:
        raise ToolkitError(f"q {tuple(q.shape)} / k {tuple(k.shape)} / v {tuple(v.shape)} do not match the frames")
    check_head_dim(D)
    if gq.b2 > 128:
        raise ToolkitError(f"monarch_compare needs tile width b2 <= 128, got {gq.b2}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    scale = D**-0.5 if scale is None else float(scale)
    allowed = key_tiles_allowed_on(q.device, gq, gk, block_causal_frames)
    explicit = factors is not None
    if explicit:
        lf, rf = (factors.L, factors.R) if hasattr(factors, "L") else factors
        lf, rf = lf.contiguous(), rf.contiguous()
        l_shape, r_shape = factor_shapes(B, H, gq, gk)
        if tuple(lf.shape) != l_shape or tuple(rf.shape) != r_shape:
            raise ToolkitError(f"factors L {tuple(lf.shape)} / R {tuple(rf.shape)}, expected {l_shape} / {r_shape}")
    else:
        lf = rf = q  # unused
    err = torch.full((5, B, H, n_q), float("nan"), dtype=torch.float32, device=q.device)  # unwritten rows stay NaN
    block_i = 16
    grid_c = (gq.b2 * triton.cdiv(gq.b1, block_i), gq.num_tiles, B * H)

    def launch(precision: str) -> None:
        _monarch_compare_fwd[grid_c](
            q, k, v, lf, rf, allowed, err, *token_strides(q), *token_strides(k), *token_strides(v),
            H, gq.num_tiles, gk.num_tiles, gq.b1, gq.b2, scale * LOG2E, *gq.args(), *gk.args(),
            D=D, BLOCK_I=block_i, BLOCK_L=pow2(gq.b2, 16, 128), EXPLICIT=explicit, PRECISION=precision,
            num_warps=8,  # with BLOCK_I = 16: no register spills at d = 128 (sm_90 resource report)
        )

    run_with_precision(launch)
    err = err.permute(0, 1, 3, 2)  # (5, b, i, h)
    n_entries = int(allowed.sum()) * (gq.b1 * gq.b2) ** 2
    return RowErrors(*(err[n] for n in range(5)), n_entries=n_entries)
