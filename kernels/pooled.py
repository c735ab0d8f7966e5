r"""Pooled attention views of a set of query rows, fused: the row LSE and the pooled sums in two launches.

Math (per head h; stored query rows i with clip tokens (f_i, y_i, x_i); keys j = whole frames ``key_frames``
of the (F, H, W) grid in raster order, key j at (g_j, r_j, c_j); s = scale, logits in log2 units):

    z_ij        = s · log2(e) · q_i·k_j
    lse2_i      = log2 Σ_j 2^z_ij                       pass 1: online max/sum per (query block, key split),
                                                        combined at the start of pass 2; lse_i = ln 2 · lse2_i
    P_ij        = 2^(z_ij − lse2_i)                     pass 2, exact, never stored
    frame_mass[h, f, g] += Σ_{i: f_i = f} Σ_{j: g_j = g} P_ij
    offset_t[h, Δ + F − 1] += Σ_i Σ_{j: g_j − f_i = Δ} P_ij         (likewise offset_h with rows, offset_w
                                                                       with columns)

i.e. exactly ``toolkit.capture.pooled.PooledSums`` (sums over queries; the torch reference), in the packed
per-head layout of ``toolkit.attention.pooled.packed_bins``: ``[frame_mass (F·F) | offset_t | offset_h |
offset_w]``.

Blocking: a program owns BLOCK_M query rows and a split of the key frames. Key blocks are single latent rows
(W keys, padded to BLOCK_W), so a block's frame g and row r are constants and its columns are c = 0..W−1:

* Σ_rows P[i, c]   accumulates elementwise into ``acc_w[i, c]``   (the per-query column marginal);
* Σ_c P[i, c]      goes to ``acc_h[i, r]`` and the frame total ``tot[i]`` (row and frame marginals).

At the end of each frame the frame totals go to frame_mass and offset_t, at the end of the program acc_h and
acc_w go to offset_h / offset_w at bin (key − query + size − 1): 2·BLOCK_M atomic adds per frame and
BLOCK_M·(H + W) per program, none per key. Per record this costs two reads of K (pass 1, pass 2) and
2 · 2·i·j·d FLOPs on the tensor cores; 48 queries × 32,760 keys × 12 heads is ≈ 0.2 GB of K traffic at the
full cache. The host cost is two launches and no synchronisation (the point: a composition of torch ops would launch
dozens of small ops per record).
"""

from __future__ import annotations

import torch
from toolkit.kernels._common import LOG2E, interpreted, output_buffer, pow2, run_with_precision, scratch, tl, triton

from toolkit.attention.pooled import packed_bins
from toolkit.errors import ToolkitError

# Programs aimed for per launch (≈ 2 per SM on an H100): key frames are split until heads × query blocks ×
# splits reaches this, so a record of 48 queries still spreads over the GPU.
TARGET_PROGRAMS = 256


@triton.jit
def _scores(q, K, k_row, offs_c, mask_c, offs_d, d, sk_j, scale_log2,
            EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """z = s·log2(e)·q kᵀ for the keys k_row + c of one latent row (masked columns −inf): BLOCK_M × BLOCK_W."""
    ptr = K + (k_row + offs_c).to(tl.int64)[:, None] * sk_j + offs_d[None, :]
    if EVEN_D:  # a head-dim mask keeps Triton from pipelining this load (cp.async): only when d is padded
        kk = tl.load(ptr, mask=mask_c[:, None], other=0.0)
    else:
        kk = tl.load(ptr, mask=mask_c[:, None] & (offs_d < d)[None, :], other=0.0)
    if UPCAST:  # the interpreter multiplies bf16 bit patterns; bf16 products are exact in fp32
        kk = kk.to(tl.float32)
    z = tl.dot(q, tl.trans(kk), input_precision=PRECISION) * scale_log2
    return tl.where(mask_c[None, :], z, float("-inf"))


@triton.jit
def _load_queries(Q, h, qb, n_q, sq_h, sq_i, d, BLOCK_M: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr):
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mask_m = offs_m < n_q
    mask_d = offs_d < d
    q = tl.load(Q + h.to(tl.int64) * sq_h + offs_m[:, None] * sq_i + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q, offs_m, mask_m, offs_d


# Integers that change from chunk to chunk are not specialised (one compile per launch config, not per chunk).
@triton.jit(do_not_specialize=["n_q", "n_key_frames", "frames_per_split"])
def _pooled_lse_partial(
    Q, K, M_PART, L_PART,
    sq_h, sq_i, sk_h, sk_j, n_q, d, height, width, n_key_frames, frames_per_split, scale_log2,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Pass 1: running max and sum (log2 units) of each query row over the key frames of split ``program_id(0)``."""
    split = tl.program_id(0)
    qb = tl.program_id(1)
    h = tl.program_id(2)
    q, offs_m, mask_m, offs_d = _load_queries(Q, h, qb, n_q, sq_h, sq_i, d, BLOCK_M, D, UPCAST)
    offs_c = tl.arange(0, BLOCK_W)
    mask_c = offs_c < width
    K = K + h.to(tl.int64) * sk_h
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    f_lo = split * frames_per_split
    f_hi = tl.minimum(f_lo + frames_per_split, n_key_frames)
    for t in range(f_lo * height, f_hi * height):  # key rows (frame, row) of the split, one loop: pipelined
        z = _scores(q, K, t * width, offs_c, mask_c, offs_d, d, sk_j, scale_log2, EVEN_D, UPCAST, PRECISION)
        m_new = tl.maximum(m, tl.max(z, 1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), 1)
        m = m_new
    # partials: (h, query block, split, BLOCK_M); padded rows are written too (never read as results)
    part = ((h * tl.num_programs(1) + qb) * tl.num_programs(0) + split).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(M_PART + part, m)
    tl.store(L_PART + part, l)


@triton.jit(do_not_specialize=["n_q", "key_frame0", "n_key_frames", "frames_per_split", "n_splits"])
def _pooled_sums_fwd(
    Q, K, TOK, M_PART, L_PART, LSE, BINS,
    sq_h, sq_i, sk_h, sk_j, s_lse, s_bins, n_q, d, frames, height, width, key_frame0, n_key_frames,
    frames_per_split, n_splits, scale_log2,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
    EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Pass 2: combine the partials into lse2 (split 0 stores lse), then P per key row and the pooled sums."""
    split = tl.program_id(0)
    qb = tl.program_id(1)
    h = tl.program_id(2)
    q, offs_m, mask_m, offs_d = _load_queries(Q, h, qb, n_q, sq_h, sq_i, d, BLOCK_M, D, UPCAST)

    offs_s = tl.arange(0, BLOCK_S)
    part = ((h * tl.num_programs(1) + qb) * n_splits + offs_s[None, :]).to(tl.int64) * BLOCK_M \
        + tl.arange(0, BLOCK_M)[:, None]
    mask_s = (offs_s < n_splits)[None, :]
    m_part = tl.load(M_PART + part, mask=mask_s, other=float("-inf"))
    l_part = tl.load(L_PART + part, mask=mask_s, other=0.0)
    m = tl.max(m_part, 1)
    lse2 = m + tl.log2(tl.sum(l_part * tl.exp2(m_part - m[:, None]), 1))
    if split == 0:
        tl.store(LSE + h.to(tl.int64) * s_lse + offs_m, lse2 * 0.6931471805599453, mask=mask_m)

    tok = tl.load(TOK + offs_m, mask=mask_m, other=0)
    q_frame = (tok // (height * width)).to(tl.int32)
    q_row = ((tok // width) % height).to(tl.int32)
    q_col = (tok % width).to(tl.int32)
    offs_c = tl.arange(0, BLOCK_W)
    offs_r = tl.arange(0, BLOCK_H)
    mask_c = offs_c < width
    K = K + h.to(tl.int64) * sk_h
    bins = BINS + h.to(tl.int64) * s_bins  # [frame_mass F·F | offset_t 2F−1 | offset_h 2H−1 | offset_w 2W−1]
    off_t = frames * frames
    off_h = off_t + 2 * frames - 1
    off_w = off_h + 2 * height - 1

    acc_w = tl.zeros([BLOCK_M, BLOCK_W], tl.float32)  # Σ over key rows/frames of P[i, column c]
    acc_h = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)  # Σ over key frames/columns of P[i, row r]
    f_lo = split * frames_per_split
    f_hi = tl.minimum(f_lo + frames_per_split, n_key_frames)
    for f in range(f_lo, f_hi):
        tot = tl.zeros([BLOCK_M], tl.float32)
        for r in range(0, height):
            z = _scores(q, K, (f * height + r) * width, offs_c, mask_c, offs_d, d, sk_j, scale_log2,
                        EVEN_D, UPCAST, PRECISION)
            p = tl.exp2(z - lse2[:, None])  # masked columns: 2^−inf = 0
            acc_w += p
            row_sum = tl.sum(p, 1)
            acc_h += tl.where(offs_r[None, :] == r, row_sum[:, None], 0.0)
            tot += row_sum
        g = key_frame0 + f
        tl.atomic_add(bins + q_frame * frames + g, tot, mask=mask_m)
        tl.atomic_add(bins + off_t + g - q_frame + frames - 1, tot, mask=mask_m)
    tl.atomic_add(bins + off_h + offs_r[None, :] - q_row[:, None] + height - 1, acc_h,
                  mask=mask_m[:, None] & (offs_r < height)[None, :])
    tl.atomic_add(bins + off_w + offs_c[None, :] - q_col[:, None] + width - 1, acc_w,
                  mask=mask_m[:, None] & mask_c[None, :])


SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def launch_config(n_q: int, heads: int, n_key_frames: int) -> dict:
    """Query block and key split of a launch (BLOCK_M ≥ 16 for tl.dot; splits fill ≈ TARGET_PROGRAMS programs)."""
    block_m = pow2(n_q, 16, 64)
    n_qb = triton.cdiv(n_q, block_m)
    want = max(1, min(n_key_frames, triton.cdiv(TARGET_PROGRAMS, heads * n_qb)))
    frames_per_split = triton.cdiv(n_key_frames, want)
    return {"BLOCK_M": block_m, "n_qb": n_qb, "frames_per_split": frames_per_split,
            "n_splits": triton.cdiv(n_key_frames, frames_per_split)}


def pooled_lse_and_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    query_tokens: torch.Tensor,
    key_frames: tuple[int, int],
    grid: tuple[int, int, int],
    *,
    bins: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row LSE and pooled sums of q ``h i d`` (clip tokens ``query_tokens``, on q's device) against k ``h j d``
    (whole frames ``key_frames`` of ``grid``, raster order). Any strides with a contiguous last dim.

    Returns ``(lse, bins)``: lse ``h i`` float32 (natural log), bins ``h n`` float32 in the
    ``toolkit.attention.pooled.packed_bins`` layout. The sums are *added* to ``bins`` when given (e.g. one row
    of a per-(step, chunk) accumulator), else to fresh zeros. Two launches, no host synchronisation."""
    frames, height, width = (int(x) for x in grid)
    kf0, kf1 = (int(x) for x in key_frames)
    h, n_q, d = q.shape
    n_kf = kf1 - kf0
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype:
        raise ToolkitError(f"pooled kernel takes q, k in one of {SUPPORTED_DTYPES}, got {q.dtype} / {k.dtype}")
    if k.shape[0] != h or k.shape[2] != d or k.shape[1] != n_kf * height * width or not 0 <= kf0 < kf1 <= frames:
        raise ToolkitError(f"keys {tuple(k.shape)} do not cover frames {key_frames} of grid {grid} for q "
                           f"{tuple(q.shape)}")
    if query_tokens.shape != (n_q,) or query_tokens.device != q.device:
        raise ToolkitError(f"query_tokens must be {n_q} token indices on {q.device}")
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    n_bins = packed_bins(grid)
    if bins is None:
        bins = torch.zeros(h, n_bins, dtype=torch.float32, device=q.device)
    elif tuple(bins.shape) != (h, n_bins) or bins.dtype != torch.float32 or bins.stride(-1) != 1:
        raise ToolkitError(f"bins must be ({h}, {n_bins}) float32 with a contiguous last dim")
    lse = output_buffer(lse_out, (h, n_q), torch.float32, q.device)
    if n_q == 0:  # a chunk without stored queries adds nothing
        return lse, bins
    cfg = launch_config(n_q, h, n_kf)
    block_m, n_splits, fps = cfg["BLOCK_M"], cfg["n_splits"], cfg["frames_per_split"]
    m_part = scratch((h * cfg["n_qb"] * n_splits * block_m,), torch.float32, q.device)
    l_part = scratch((h * cfg["n_qb"] * n_splits * block_m,), torch.float32, q.device)
    launch_grid = (n_splits, cfg["n_qb"], h)
    upcast = interpreted() and q.dtype != torch.float32
    common = dict(D=pow2(d, 16), EVEN_D=pow2(d, 16) == d, BLOCK_M=block_m, BLOCK_W=pow2(width, 16), UPCAST=upcast)
    # sm_90 (Triton 3.9 AOT, d = 128, W = 52 -> BLOCK_W 64, BLOCK_M 64), both K loads pipelined (cp.async):
    # pass 1 80 registers at 4 warps / 3 stages; pass 2 (acc_w, acc_h and the scores live at once) 209 at
    # 8 warps / 2 stages, no spills (4 warps spill: 255 + 64 B stack).
    scale_log2 = float(scale) * LOG2E

    def launch(precision: str) -> None:
        _pooled_lse_partial[launch_grid](
            q, k, m_part, l_part, q.stride(0), q.stride(1), k.stride(0), k.stride(1), n_q, d, height,
            width, n_kf, fps, scale_log2, PRECISION=precision, num_warps=4, num_stages=3, **common)
        _pooled_sums_fwd[launch_grid](
            q, k, query_tokens, m_part, l_part, lse, bins, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            lse.stride(0), bins.stride(0), n_q, d, frames, height, width, kf0, n_kf, fps, n_splits, scale_log2,
            BLOCK_H=pow2(height, 1), BLOCK_S=pow2(n_splits, 2), PRECISION=precision,
            num_warps=8 if block_m >= 64 else 4, num_stages=2, **common)

    if q.dtype == torch.float32 and not interpreted():
        run_with_precision(launch)  # fp32 data: 3×tf32 (fp32-accurate) products, IEEE if that fails to compile
    else:
        launch("ieee" if interpreted() else "tf32")  # 16-bit operands: exact products, fp32 accumulation
    return lse, bins
