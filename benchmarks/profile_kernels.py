"""Nsight Compute view of the Monarch kernels at the paper's shapes: where each stage's time goes (throughput
against the roofs, warp stall reasons, occupancy). Each shape runs once warm (configs tuned/cached first), and
only launches inside the NVTX range ``profile`` are measured:

    ncu --nvtx --nvtx-include "profile/" --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section WarpStateStats --section Occupancy --section LaunchStats \\
        python benchmarks/profile_kernels.py --shapes full-111 ar-111

Without ncu the script just runs the kernels (a smoke test of the setup). Needs a GPU.
"""

from __future__ import annotations

import argparse

import torch
from toolkit.kernels.bench import SHAPES, _inputs
from toolkit.kernels.monarch import _forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", choices=sorted(SHAPES), default=["full-111", "ar-111"])
    p.add_argument("--heads", type=int, default=12)
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs a GPU"
    for name in args.shapes:
        grid, tiling, qf, kf = SHAPES[name]
        q, k, v = _inputs(grid, qf, kf, args.heads, 128, torch.bfloat16, torch.device("cuda"))

        kw = dict(query_frames=qf, key_frames=kf, autotune=True)
        _forward(q, k, v, grid, tiling, **kw)  # compile + tune (outside the profiled range)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("profile")
        _forward(q, k, v, grid, tiling, **kw)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        print(f"{name}: profiled one call", flush=True)


if __name__ == "__main__":
    main()
