#!/usr/bin/env bash
# The rates a fused Monarch forward would run on (kernels/NOTES.md, "The two rates, measured"), in one GPU call:
# L2 re-reads and Triton thin products (bench_fused_floor.py), N = 8 / 16 / 32 mma.sync products with A from
# shared memory (thin_mma.cu), and distributed shared memory reads inside a cluster (dsmem_bandwidth.cu).
# Each checks its results before timing and exits non-zero on a mismatch.
#     OUT=results/ bash benchmarks/fused_floor_gpu.sh       # about 2 minutes on an H200, most of it compiling
set -euo pipefail
out="${OUT:-results}"
mkdir -p "$out"
build="$(mktemp -d)"
arch=(-O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a)
nvcc "${arch[@]}" -o "$build/thin_mma" benchmarks/thin_mma.cu
nvcc "${arch[@]}" -o "$build/dsmem" benchmarks/dsmem_bandwidth.cu
status=0
python3 benchmarks/bench_fused_floor.py --out "$out" || status=1
"$build/thin_mma" > "$out/thin_mma.json" && cat "$out/thin_mma.json" || status=1
"$build/dsmem" > "$out/dsmem_bandwidth.json" && cat "$out/dsmem_bandwidth.json" || status=1
exit $status
