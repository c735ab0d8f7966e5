// Tensor-core rate of thin products with A read from shared memory every time: acc[64, N] += A[64, 128] · B[128, N]
// for N = 8, 16, 32 (`mma.sync.m16n8k16`, bf16 in, fp32 accumulate; A through `ldmatrix`, B held in registers).
// N = 8 is the width of the fused Monarch R-step's products (kernels/NOTES.md, "The two rates, measured"), which
// `tl.dot` cannot express; bench_fused_floor.py measured N >= 16 through Triton.
//
// Each block copies 4 A tiles (64 x 128, rows padded to 136 elements so `ldmatrix` is free of bank conflicts) into
// shared memory; each warp then runs `iters` passes, one tile per pass (a ring, offset by the warp), and keeps B and
// its accumulators in registers. Before timing, a short run's accumulators are compared on the host with float64
// (relative Frobenius error; a failure exits non-zero). Prints one JSON object (medians of 10 timed launches after
// 2 warm-ups, CUDA events; FLOPs 2·64·N·128 per pass and warp).
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o thin_mma benchmarks/thin_mma.cu && ./thin_mma

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cuda_timing.cuh"

constexpr int kM = 64, kK = 128, kPad = 136, kTiles = 4, kWarps = 4;
constexpr int kSmemBytes = kTiles * kM * kPad * 2;

__device__ __forceinline__ uint32_t pack(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return uint32_t(__bfloat16_as_ushort(lo)) | (uint32_t(__bfloat16_as_ushort(hi)) << 16);
}

// A: kTiles tiles [64, 128] row-major; B: [128, N] row-major (k, n); out: per block and warp [64, N] fp32.
template <int NB>  // N = 8 · NB
__global__ void __launch_bounds__(kWarps * 32) thin_mma(const __nv_bfloat16* A, const __nv_bfloat16* B, float* out,
                                                         int iters, int stride) {
  extern __shared__ __nv_bfloat16 smem[];
  for (int i = threadIdx.x; i < kTiles * kM * kK; i += blockDim.x) {
    const int t = i / (kM * kK), r = (i / kK) % kM, c = i % kK;
    smem[(t * kM + r) * kPad + c] = A[i];
  }
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, q = lane % 4;
  constexpr int N = 8 * NB;
  // B fragments of m16n8k16 (col operand): b0 = B[16s + 2q .. +1][8n + g], b1 = B[16s + 2q + 8 .. +9][8n + g]
  uint32_t b[NB][8][2];
#pragma unroll
  for (int n = 0; n < NB; ++n)
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const int col = 8 * n + g, k0 = 16 * s + 2 * q;
      b[n][s][0] = pack(B[(k0) * N + col], B[(k0 + 1) * N + col]);
      b[n][s][1] = pack(B[(k0 + 8) * N + col], B[(k0 + 9) * N + col]);
    }
  float acc[4][NB][4] = {};
  // ldmatrix.x4 addresses: lanes 0-15 rows 0-15 at column 0, lanes 16-31 rows 0-15 at column 8 of a 16 x 16 block
  const int ld_row = lane % 16, ld_col = (lane / 16) * 8;
  for (int it = 0; it < iters; ++it) {
    const int tile = (warp + it * stride) % kTiles;
    const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem + tile * kM * kPad));
#pragma unroll
    for (int m = 0; m < 4; ++m)
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        uint32_t a0, a1, a2, a3;
        const uint32_t addr = base + 2u * uint32_t((16 * m + ld_row) * kPad + 16 * s + ld_col);
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(a0), "=r"(a1), "=r"(a2), "=r"(a3) : "r"(addr));
#pragma unroll
        for (int n = 0; n < NB; ++n)
          asm volatile(
              "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
              "{%0, %1, %2, %3};\n"
              : "+f"(acc[m][n][0]), "+f"(acc[m][n][1]), "+f"(acc[m][n][2]), "+f"(acc[m][n][3])
              : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b[n][s][0]), "r"(b[n][s][1]));
      }
  }
  // accumulator fragment: d0, d1 at row g, columns 2q, 2q + 1; d2, d3 at row g + 8
  float* o = out + (size_t(blockIdx.x) * kWarps + warp) * kM * N;
#pragma unroll
  for (int m = 0; m < 4; ++m)
#pragma unroll
    for (int n = 0; n < NB; ++n) {
      const int r = 16 * m + g, c = 8 * n + 2 * q;
      o[r * N + c] = acc[m][n][0];
      o[r * N + c + 1] = acc[m][n][1];
      o[(r + 8) * N + c] = acc[m][n][2];
      o[(r + 8) * N + c + 1] = acc[m][n][3];
    }
}

template <int NB>
static void run_case(int blocks, bool& first, std::mt19937& rng) {
  constexpr int N = 8 * NB;
  std::normal_distribution<float> normal;
  std::vector<__nv_bfloat16> a(kTiles * kM * kK), b(kK * N);
  for (auto& x : a) x = __float2bfloat16(normal(rng));
  for (auto& x : b) x = __float2bfloat16(normal(rng));
  __nv_bfloat16 *da, *db;
  float* dout;
  const size_t out_elems = size_t(blocks) * kWarps * kM * N;
  CHECK(cudaMalloc(&da, a.size() * 2));
  CHECK(cudaMalloc(&db, b.size() * 2));
  CHECK(cudaMalloc(&dout, out_elems * 4));
  CHECK(cudaMemcpy(da, a.data(), a.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(db, b.data(), b.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaFuncSetAttribute(thin_mma<NB>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  const int stride = 1;  // a run-time 1: the compiler cannot tell which tile a pass reads

  // check: 7 passes (every tile, one of them twice) against float64 on the host, for every warp of two blocks
  const int check_iters = 7;
  CHECK(cudaMemset(dout, 0xff, out_elems * 4));  // NaN poison
  thin_mma<NB><<<blocks, kWarps * 32, kSmemBytes>>>(da, db, dout, check_iters, stride);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<float> out(out_elems);
  CHECK(cudaMemcpy(out.data(), dout, out_elems * 4, cudaMemcpyDeviceToHost));
  double worst = 0;
  for (int blk : {0, blocks - 1})
    for (int w = 0; w < kWarps; ++w) {
      double err = 0, norm = 0;
      for (int r = 0; r < kM; ++r)
        for (int c = 0; c < N; ++c) {
          double want = 0;
          for (int it = 0; it < check_iters; ++it) {
            const int t = (w + it) % kTiles;
            for (int k = 0; k < kK; ++k)
              want += double(__bfloat162float(a[(t * kM + r) * kK + k])) * double(__bfloat162float(b[k * N + c]));
          }
          const double got = out[((size_t(blk) * kWarps + w) * kM + r) * N + c];
          err += (got - want) * (got - want);
          norm += want * want;
        }
      const double rel = std::sqrt(err / norm);
      worst = std::isnan(rel) ? INFINITY : std::max(worst, rel);
    }
  if (!(worst < 1e-4)) {
    std::fprintf(stderr, "N = %d: relative error %.3g against float64\n", N, worst);
    std::exit(1);
  }

  const int iters = 4000;
  const double median =
      median_ms([&] { thin_mma<NB><<<blocks, kWarps * 32, kSmemBytes>>>(da, db, dout, iters, stride); });
  const double flops = double(blocks) * kWarps * iters * 2.0 * kM * N * kK;
  const double a_bytes = double(blocks) * kWarps * iters * kM * kK * 2.0;
  std::printf("%s\n {\"N\": %d, \"M\": %d, \"K\": %d, \"blocks\": %d, \"warps_per_block\": %d, \"iters\": %d, "
              "\"check_relative_error\": %.3g, \"median_ms\": %.4f, \"TFLOP_per_s\": %.1f, "
              "\"A_from_shared_TB_per_s\": %.2f}",
              first ? "" : ",", N, kM, kK, blocks, kWarps, iters, worst, median, flops / (median * 1e-3) / 1e12,
              a_bytes / (median * 1e-3) / 1e12);
  first = false;
  CHECK(cudaFree(da));
  CHECK(cudaFree(db));
  CHECK(cudaFree(dout));
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int blocks = 3 * prop.multiProcessorCount;  // 3 blocks of 70 KB shared memory fit one SM
  std::mt19937 rng(0);
  std::printf("{\"gpu\": \"%s\", \"multiprocessors\": %d, \"instruction\": \"mma.sync.m16n8k16 bf16, A via "
              "ldmatrix.x4\", \"rows\": [",
              prop.name, prop.multiProcessorCount);
  bool first = true;
  run_case<1>(blocks, first, rng);
  run_case<2>(blocks, first, rng);
  run_case<4>(blocks, first, rng);
  std::printf("\n]}\n");
  return 0;
}
