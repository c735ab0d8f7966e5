"""What the Monarch R-step's stores alone cost on this GPU: the write floor of the two-stage design, measured.

The R-step (``_monarch_rows_fwd_v2``) writes α and Y (bf16, d values per slot) and c (fp32) for every
(query tile, key tile, row k, column j): 4.26 GB at the full 480p clip. This script times, over the same bytes,

* ``fill``: ``torch.Tensor.fill_`` of one contiguous buffer (the plain write bandwidth);
* ``pattern``: a store-only Triton kernel with the R-step's launch grid and exactly its address pattern (rows of
  BLOCK_M (tile, column) pairs at stride F·b1·d, one key tile per loop step, α then Y then c), no arithmetic;
* ``read``: the L-step's side, ``torch.sum`` over the same buffer (the plain read bandwidth),

so the R-step kernel's time can be compared with the time its stores need by themselves.

    python benchmarks/bench_store_floor.py --out results/
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _rows_store_pattern(ALPHA, Y, C, n_fk, b1, b2, tiles_per_prog, n_a, n_key_tiles, a_chunk,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, CONTIGUOUS: tl.constexpr):
    """The v2 R-step's stores (same grid, same addresses, same masks), values zero. ``CONTIGUOUS``: the same
    bytes, but each program's α and Y blocks of one key tile are one contiguous BLOCK_M·D run (the layout the
    L-step would then have to read strided): does the strided pattern cost write bandwidth?"""
    row = tl.program_id(0)
    ag = tl.program_id(1)
    pid_bh = tl.program_id(2)
    a_first = ag * tiles_per_prog
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    t_m = offs_m // b2
    mask_m = (t_m < tiles_per_prog) & (a_first + t_m < n_a)
    slab = (pid_bh.to(tl.int64) * a_chunk + a_first) * b2 * n_fk
    out_rows = offs_m * n_fk + row
    zero = tl.zeros((BLOCK_M, D), dtype=ALPHA.dtype.element_ty)
    c = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if CONTIGUOUS:
        slab = (((pid_bh.to(tl.int64) * tl.num_programs(1) + ag) * tl.num_programs(0) + row) * n_key_tiles) \
            * BLOCK_M
    for f in range(0, n_key_tiles):
        rows = out_rows + f * b1
        if CONTIGUOUS:
            rows = f * BLOCK_M + offs_m
        tile_offs = rows[:, None] * D + offs_d[None, :]
        tl.store(ALPHA + slab * D + tile_offs, zero, mask=mask_m[:, None])
        tl.store(Y + slab * D + tile_offs, zero, mask=mask_m[:, None])
        tl.store(C + slab + rows, c, mask=mask_m)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results")
    p.add_argument("--heads", type=int, default=12)
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs a GPU"
    os.makedirs(args.out, exist_ok=True)
    # full 480p clip, tiling (1, 1, 1): A = F = 21 tiles of b1 × b2 = 30 × 52, d = 128, all tiles in one launch
    a_tiles, f_tiles, b1, b2, d, heads = 21, 21, 30, 52, 128, args.heads
    n_fk = f_tiles * b1
    alpha = torch.empty(heads, a_tiles, b2, n_fk, d, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(alpha)
    c = torch.empty(heads, a_tiles, b2, n_fk, dtype=torch.float32, device="cuda")
    total = 2 * alpha.numel() * 2 + c.numel() * 4
    flat = torch.empty(total // 2, dtype=torch.bfloat16, device="cuda")
    rows = {}
    for name, fn in {
        "fill (contiguous write)": lambda: flat.fill_(1.0),
        "read (torch.sum)": lambda: flat.sum(dtype=torch.float32),
    }.items():
        rows[name] = triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")
    for block_m, warps, tiles, contiguous in ((128, 8, 2, False), (64, 4, 1, False), (128, 8, 2, True)):
        grid = (b1, triton.cdiv(a_tiles, tiles), heads)
        if contiguous:  # the contiguous variant needs room for the padded rows too
            need = heads * grid[1] * b1 * f_tiles * block_m
            alpha_c, y_c = (torch.empty(need, d, dtype=torch.bfloat16, device="cuda") for _ in range(2))
            c_c = torch.empty(need, dtype=torch.float32, device="cuda")
        else:
            alpha_c, y_c, c_c = alpha, y, c

        def run(block_m=block_m, warps=warps, tiles=tiles, grid=grid, contiguous=contiguous, bufs=(alpha_c, y_c, c_c)):
            _rows_store_pattern[grid](*bufs, n_fk, b1, b2, tiles, a_tiles, f_tiles, a_tiles, D=d,
                                      BLOCK_M=block_m, CONTIGUOUS=contiguous, num_warps=warps)

        label = "contiguous blocks" if contiguous else "R-step store pattern"
        rows[f"{label}, M={block_m}, {warps} warps"] = triton.testing.do_bench(
            run, warmup=10, rep=100, return_mode="median")
        del alpha_c, y_c, c_c
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "bytes": total, "shape": "full 480p clip (1,1,1), 12 heads, d 128: alpha + Y (bf16) + c (fp32)",
              "median_ms": rows, "TB_per_s": {k: total / (v * 1e-3) / 1e12 for k, v in rows.items()}}
    with open(os.path.join(args.out, "bench_store_floor.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"{result['gpu']}: {total / 1e9:.2f} GB")
    for k, v in rows.items():
        print(f"  {k:45s} {v:7.3f} ms  {result['TB_per_s'][k]:.2f} TB/s")


if __name__ == "__main__":
    main()
