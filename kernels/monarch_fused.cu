// Fused Monarch attention forward (MonarchRT, T = 1): α, Y and c never leave the multiprocessor.
//
// Math (per batch and head; docs/monarch.md "MonarchAttention (variational)"; kernels/monarch.py computes the same
// function in two kernels with the intermediates in device memory). Query tile a, row i, column j; key tile f,
// row k, column l; scale_log2 = s · log2(e):
//
//     R-step   x[l]     = scale_log2 · q[a,k,j]·k[f,k,l]          (query row k sees key row k)
//              R        = softmax_l(x)          α[j,k] = Σ_l R · k[f,k,l]      Y[j,k] = Σ_l R · v[f,k,l]
//              c[j,k]   = Σ_l R log2 R
//     L-step   z[i,(f,k)] = scale_log2 · q[a,i,j]·α[j,k] − c[j,k]
//              out[a,i,j] = Σ_(f,k) softmax_(f,k)(z)[i,(f,k)] · Y[j,k]         (online softmax in base 2)
//
// Work split. One block of 8 warps owns (batch·head, query tile a, 8 columns j0 .. j0 + 7) and every row i of them
// (b1 ≤ 32); warp w keeps the L-step accumulator of column j0 + w (32 rows × D, fp32) in registers for the whole
// loop over allowed key tiles f < allowed[a] (a prefix: keys are frame-major, docs/monarch.md "Block-causal and
// KV-cache modes"). The key rows k of a tile are taken 8 at a time (a chunk):
//
//   R-step  two groups of 4 warps, each on one key row at a time (rows 4·group .. 4·group + 3 of the chunk);
//           K and V of that row (b2 × D each) are copied to shared memory with cp.async one row ahead.
//           Phase 1: warp q of the group computes S^T = K·Q^T for l in [16q, 16q + 16) and the 8 columns
//           (mma m16n8k16, N = 8: the 8 columns are the product's N); the softmax over l is completed across the
//           group through shared memory (max, then sum and Σ p·(x − max)), and p^T goes to shared memory in the
//           input dtype.
//           Phase 2: warp q computes α^T = K^T·p^T and Y^T = V^T·p^T for its quarter of D, scales by 1 / sum and
//           writes α, Y (input dtype) and c (fp32) of the row into the chunk's slab in shared memory.
//   L-step  after the chunk's 8 rows: warp w runs flash attention of q[a, ·, j0 + w] (32 rows) over the chunk's 8
//           "keys" α with bias −c and "values" Y (m16n8k16 for the logits, m16n8k8 for p·Y, base-2 online
//           softmax), then the block moves to the next chunk.
//
// Padding. Rows k ≥ b1 of the last chunk get α = Y = 0 and c = +inf (logit −inf, weight 0). Columns l ≥ b2 read a
// zero row of shared memory and get logit −inf. Columns j ≥ b2 of the last column block and rows i ≥ b1 are
// computed on zero queries and not written.
//
// Compile-time shape (nvcc -D): MF_D (head dim, 64 or 128), MF_NL (16-column l tiles, b2 ≤ 16·MF_NL ≤ 64), MF_MI
// (16-row i tiles per warp, b1 ≤ 16·MF_MI ≤ 32), MF_FP16 (fp16 instead of bf16). Launch: grid (⌈b2 / 8⌉,
// query tiles, batch·heads), 256 threads, Layout(b2).bytes of dynamic shared memory (mirrored by smem_bytes in
// monarch_fused.py; a CPU test compares the two).
// Needs sm_80 or newer (mma.sync, ldmatrix, cp.async).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#ifndef MF_D
#define MF_D 128
#endif
#ifndef MF_NL
#define MF_NL 4
#endif
#ifndef MF_MI
#define MF_MI 2
#endif
// Timing ablations (benchmarks/profile_fused.py; the result is then wrong): leave out the K/V copies, the R-step's
// products, its phase 2, or the L-step.
#ifndef MF_SKIP_LOAD
#define MF_SKIP_LOAD 0
#endif
#ifndef MF_SKIP_RSTEP
#define MF_SKIP_RSTEP 0
#endif
#ifndef MF_SKIP_PHASE2
#define MF_SKIP_PHASE2 0
#endif
#ifndef MF_SKIP_LSTEP
#define MF_SKIP_LSTEP 0
#endif
// MF_TIMING: blocks (0, 0, 0) and (0, gridDim.y / 2, gridDim.z / 2) write the clock64 cycles of each phase, per
// warp, to p.timing (padding rows count under phase 0).
#ifndef MF_TIMING
#define MF_TIMING 0
#endif
#define TIMED_PHASES 7  // wait + barrier + issue; phase 1; softmax; phase 2; chunk barrier; L-step; slab barrier

#if MF_FP16
typedef __half elem_t;
typedef __half2 elem2_t;
#define MF_MMA_TYPE "f16"
__device__ __forceinline__ elem2_t to_elem2(float lo, float hi) { return __floats2half2_rn(lo, hi); }
__device__ __forceinline__ elem_t to_elem(float x) { return __float2half_rn(x); }
#else
typedef __nv_bfloat16 elem_t;
typedef __nv_bfloat162 elem2_t;
#define MF_MMA_TYPE "bf16"
__device__ __forceinline__ elem2_t to_elem2(float lo, float hi) { return __floats2bfloat162_rn(lo, hi); }
__device__ __forceinline__ elem_t to_elem(float x) { return __float2bfloat16_rn(x); }
#endif
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {  // two values as one mma operand register
  elem2_t h = to_elem2(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ void store2(elem_t* p, float lo, float hi) {
  *reinterpret_cast<elem2_t*>(p) = to_elem2(lo, hi);
}

namespace {

constexpr int D = MF_D, NL = MF_NL, MI = MF_MI;
constexpr int BJ = 8;            // columns per block: the R-step products' N
constexpr int CHUNK = 8;         // key rows per L-step pass
constexpr int WARPS = 8, THREADS = WARPS * 32;
constexpr int ROW = D + 8;       // shared-memory row stride in elements: +16 B keeps ldmatrix free of bank conflicts
constexpr int PROW = 32 * ((NL + 1) / 2) + 8;  // row stride of p^T (phase 2 loads l in pairs of 16-column tiles)
// Query slab column stride: the L-step reads 8 consecutive rows i of one column, the R-step one row k of 8 columns;
// 16·MI·ROW + 8 elements puts both sets of 8 rows in distinct 16-byte bank groups.
constexpr int QCOL = 16 * MI * ROW + 8;
#define NEG_INF (-__int_as_float(0x7f800000))

struct Params {
  const elem_t* q;
  const elem_t* k;
  const elem_t* v;
  elem_t* out;
  const int* allowed;  // key tiles each query tile attends (a prefix)
  long long* timing;   // MF_TIMING builds only: clock64 cycles per phase, [2 blocks][warp][TIMED_PHASES]
  long long sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h;  // strides in elements
  int heads, b1, b2;
  int height, width, h_in, w_in, f_tied, h_reduce, w_reduce;  // tile geometry (kernels/_common.py tile_token)
  float scale_log2;
};

// Shared memory, in elements of elem_t unless noted (offsets computed by Layout).
struct Layout {
  int q, kv, slab_a, slab_y, zero, p, c, stats, bytes;
  __host__ __device__ explicit Layout(int b2) {
    int off = 0;
    q = off;      off += BJ * QCOL;                      // [j][i][ROW], column stride QCOL
    kv = off;     off += 2 * 2 * 2 * b2 * ROW;           // [group][slot][K|V][l][ROW]
    slab_a = off; off += BJ * CHUNK * ROW;               // [j][kk][ROW]
    slab_y = off; off += BJ * CHUNK * ROW;
    zero = off;   off += ROW;                            // one zero row (l ≥ b2)
    p = off;      off += 2 * BJ * PROW;                  // [group][j][l]
    off = (off + 1) & ~1;                                // fp32 from here (4-byte aligned)
    c = off;      off += 2 * BJ * CHUNK;                 // fp32 [j][kk]
    stats = off;  off += 2 * 3 * 4 * BJ * 2;             // fp32 [group][max|sum|spx][warp][j]
    bytes = off * 2;
  }
};

__device__ __forceinline__ int tile_token(const Params& p, int tile, int i, int j) {
  const int alpha = tile / (p.h_reduce * p.w_reduce);
  const int gamma = (tile / p.w_reduce) % p.h_reduce;
  const int eps = tile % p.w_reduce;
  return ((alpha * p.f_tied + i / p.h_in) * p.height + gamma * p.h_in + i % p.h_in) * p.width + eps * p.w_in + j;
}

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

// acc[16 × 8] += A[16 × 16] · B[16 × 8]
__device__ __forceinline__ void mma16(float* acc, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                      uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MF_MMA_TYPE "." MF_MMA_TYPE
               ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// acc[16 × 8] += A[16 × 8] · B[8 × 8]
__device__ __forceinline__ void mma8(float* acc, uint32_t a0, uint32_t a1, uint32_t b0) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32." MF_MMA_TYPE "." MF_MMA_TYPE
               ".f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
               : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
               : "r"(a0), "r"(a1), "r"(b0));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Barrier of the 4 warps of one R-step group (ids 1, 2; __syncthreads uses 0).
__device__ __forceinline__ void group_sync(int group) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(group + 1) : "memory");
}

__device__ __forceinline__ float ex2(float x) {  // 2^x, ex2.approx (2 ulp; −inf → 0), as Triton's exp2
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float x) {  // over the 8 lanes of one lane % 4 (the rows g of a fragment)
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 8));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 16));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  return x + __shfl_xor_sync(0xffffffffu, x, 16);
}
__device__ __forceinline__ float row_max(float x) {  // over the 4 lanes of one row g
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float row_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS, 1) monarch_fused_fwd(const Params p) {
  extern __shared__ __align__(16) elem_t smem[];
  const Layout lay(p.b2);
  elem_t* sq = smem + lay.q;
  elem_t* skv = smem + lay.kv;
  elem_t* sa = smem + lay.slab_a;
  elem_t* sy = smem + lay.slab_y;
  elem_t* sp = smem + lay.p;
  float* sc = reinterpret_cast<float*>(smem + lay.c);
  float* sstat = reinterpret_cast<float*>(smem + lay.stats);
  const uint32_t zero_row = smem_addr(smem + lay.zero);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int j0 = blockIdx.x * BJ, a = blockIdx.y, bh = blockIdx.z;
  const int b = bh / p.heads, h = bh % p.heads;
  const int b1 = p.b1, b2 = p.b2;
  const elem_t* qh = p.q + b * p.sq_b + h * p.sq_h;
  const elem_t* kh = p.k + b * p.sk_b + h * p.sk_h;
  const elem_t* vh = p.v + b * p.sv_b + h * p.sv_h;
  const int n_f = p.allowed[a];

  // Queries of the block: sq[j][i][:] = q[a, i, j0 + j] (zeros where i ≥ b1 or j0 + j ≥ b2); the zero row.
  for (int idx = tid; idx < BJ * 16 * MI * (D / 8); idx += THREADS) {
    const int c8 = idx % (D / 8), i = (idx / (D / 8)) % (16 * MI), j = idx / (D / 8 * 16 * MI);
    uint4 val = make_uint4(0, 0, 0, 0);
    if (i < b1 && j0 + j < b2)
      val = *reinterpret_cast<const uint4*>(qh + (long long)tile_token(p, a, i, j0 + j) * p.sq_t + 8 * c8);
    *reinterpret_cast<uint4*>(sq + j * QCOL + i * ROW + 8 * c8) = val;
  }
  for (int idx = tid; idx < D / 8; idx += THREADS)
    *reinterpret_cast<uint4*>(smem + lay.zero + 8 * idx) = make_uint4(0, 0, 0, 0);

  // ---- R-step bookkeeping: group `grp` (warps 4·grp .. 4·grp + 3) handles rows 4·grp + r (r < 4) of each chunk.
  const int grp = warp / 4, wq = warp % 4, gtid = tid % 128;
  const int n_chunks = (b1 + CHUNK - 1) / CHUNK;
  const int rows_per_group = n_f * n_chunks * 4;  // flat schedule n → (f, chunk, r)
  auto row_of = [&](int n, int& f, int& k) {
    const int r = n % 4, chunk = (n / 4) % n_chunks;
    f = n / (4 * n_chunks);
    k = chunk * CHUNK + 4 * grp + r;
  };
  auto kv_slot = [&](int slot, int which) { return skv + (((grp * 2 + slot) * 2 + which) * b2) * ROW; };
  // cp.async of key row k of tile f (K and V, b2 × D each) into `slot`, spread over the group's 128 threads.
  auto load_row = [&](int n) {
    if (MF_SKIP_LOAD || n >= rows_per_group) return;
    int f, k;
    row_of(n, f, k);
    if (k >= b1) return;
    const long long tok0 = tile_token(p, f, k, 0);
    elem_t* dk = kv_slot(n & 1, 0);
    elem_t* dv = kv_slot(n & 1, 1);
    for (int idx = gtid; idx < b2 * (D / 8); idx += 128) {
      const int l = idx / (D / 8), c8 = idx % (D / 8);
      cp_async16(smem_addr(dk + l * ROW + 8 * c8), kh + (tok0 + l) * p.sk_t + 8 * c8);
      cp_async16(smem_addr(dv + l * ROW + 8 * c8), vh + (tok0 + l) * p.sv_t + 8 * c8);
    }
  };

  // ---- L-step state of this warp's column: rows 16·mt + g (+ 8), head-dim columns 8·nt + 2t (+ 1).
  float acc[MI][D / 8][4];
  float m_run[MI][2], l_run[MI][2];
#pragma unroll
  for (int mt = 0; mt < MI; ++mt) {
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;
    m_run[mt][0] = m_run[mt][1] = NEG_INF;
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }
  const elem_t* sq_col = sq + warp * QCOL;  // this warp's column j0 + warp
  const float scale_log2 = p.scale_log2;

  load_row(0);
  cp_async_commit();
  __syncthreads();  // queries and the zero row in place

  long long cycles[TIMED_PHASES] = {};
  long long t_last = MF_TIMING ? clock64() : 0;
  auto mark = [&](int phase) {
    if (MF_TIMING) {
      const long long now = clock64();
      cycles[phase] += now - t_last;
      t_last = now;
    }
  };

  int n = 0;
  for (int f = 0; f < n_f; ++f) {
    for (int chunk = 0; chunk < n_chunks; ++chunk) {
      for (int r = 0; r < 4; ++r, ++n) {
        const int k = chunk * CHUNK + 4 * grp + r, kk = 4 * grp + r;
        cp_async_wait_all();
        group_sync(grp);  // row n landed for every thread; every warp of the group is done with row n − 1
        load_row(n + 1);  // into the slot row n − 1 used
        cp_async_commit();
        mark(0);
        if (k >= b1 || MF_SKIP_RSTEP) {  // padding row of the last chunk: weight 0 in the L-step
          for (int idx = gtid; idx < BJ * D; idx += 128) {
            const int j = idx / D, d = idx % D;
            sa[(j * CHUNK + kk) * ROW + d] = to_elem(0.f);
            sy[(j * CHUNK + kk) * ROW + d] = to_elem(0.f);
          }
          if (gtid < BJ) sc[gtid * CHUNK + kk] = __int_as_float(0x7f800000);
          continue;
        }
        const elem_t* sk = kv_slot(n & 1, 0);
        const elem_t* sv = kv_slot(n & 1, 1);
        float* smax = sstat + (grp * 3 + 0) * 4 * BJ;
        float* ssum = sstat + (grp * 3 + 1) * 4 * BJ;
        float* sspx = sstat + (grp * 3 + 2) * 4 * BJ;
        elem_t* spg = sp + grp * BJ * PROW;

        // Phase 1: S^T[l, j] for l in [16·wq, 16·wq + 16), j < 8 (K rows as M, query columns as N).
        float s[4] = {0.f, 0.f, 0.f, 0.f};
        const bool has_l = wq < NL;
        if (has_l) {
          // A = K[l][d] (row-major, d contiguous): lane → row 16·wq + lane % 16, column 8·(lane / 16)
          const int la = 16 * wq + (lane % 8) + 8 * ((lane / 8) % 2);
          const uint32_t a_row = la < b2 ? smem_addr(sk + la * ROW) : zero_row;
          // B = Q[j][i = k][d] (stored [n][k]): lane → column j = lane % 8, d offset 8·(lane / 8) in two k-steps
          const uint32_t b_row = smem_addr(sq + (lane % 8) * QCOL + k * ROW);
#pragma unroll
          for (int ks = 0; ks < D / 16; ks += 2) {
            uint32_t b0, b1_, b2_, b3;
            ldsm_x4(b_row + 2u * (16 * ks + 8 * (lane / 8)), b0, b1_, b2_, b3);
#pragma unroll
            for (int u = 0; u < 2; ++u) {
              uint32_t a0, a1, a2, a3;
              ldsm_x4(a_row + 2u * (16 * (ks + u) + 8 * (lane / 16)), a0, a1, a2, a3);
              mma16(s, a0, a1, a2, a3, u ? b2_ : b0, u ? b3 : b1_);
            }
          }
          // s0: (l = 16wq + g, j = 2t), s1: (l, 2t + 1), s2: (l + 8, 2t), s3: (l + 8, 2t + 1)
          const int l0 = 16 * wq + g;
#pragma unroll
          for (int e = 0; e < 4; ++e) s[e] = (l0 + 8 * (e / 2) < b2) ? s[e] * scale_log2 : NEG_INF;
        } else {
          s[0] = s[1] = s[2] = s[3] = NEG_INF;
        }
        const float mx0 = quad_max(fmaxf(s[0], s[2])), mx1 = quad_max(fmaxf(s[1], s[3]));
        if (g == 0) {
          smax[wq * BJ + 2 * t] = mx0;
          smax[wq * BJ + 2 * t + 1] = mx1;
        }
        group_sync(grp);
        mark(1);
        float m0 = NEG_INF, m1 = NEG_INF;
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          m0 = fmaxf(m0, smax[w * BJ + 2 * t]);
          m1 = fmaxf(m1, smax[w * BJ + 2 * t + 1]);
        }
        float pr[4], sum0 = 0.f, sum1 = 0.f, px0 = 0.f, px1 = 0.f;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float m = (e % 2) ? m1 : m0;
          pr[e] = s[e] == NEG_INF ? 0.f : ex2(s[e] - m);
          const float px = s[e] == NEG_INF ? 0.f : pr[e] * (s[e] - m);
          if (e % 2) { sum1 += pr[e]; px1 += px; } else { sum0 += pr[e]; px0 += px; }
        }
        sum0 = quad_sum(sum0); sum1 = quad_sum(sum1); px0 = quad_sum(px0); px1 = quad_sum(px1);
        if (g == 0) {
          ssum[wq * BJ + 2 * t] = sum0;
          ssum[wq * BJ + 2 * t + 1] = sum1;
          sspx[wq * BJ + 2 * t] = px0;
          sspx[wq * BJ + 2 * t + 1] = px1;
        }
        if (has_l) {  // p^T[j][l] (B operand of phase 2: stored [n][k])
          const int l0 = 16 * wq + g;
          spg[(2 * t) * PROW + l0] = to_elem(pr[0]);
          spg[(2 * t + 1) * PROW + l0] = to_elem(pr[1]);
          spg[(2 * t) * PROW + l0 + 8] = to_elem(pr[2]);
          spg[(2 * t + 1) * PROW + l0 + 8] = to_elem(pr[3]);
        }
        group_sync(grp);
        mark(2);

        // Phase 2: α^T[d, j] = Σ_l K[l, d] p[l, j] and Y^T likewise, for d in this warp's quarter of D.
        float sum_0 = 0.f, sum_1 = 0.f, spx_0 = 0.f, spx_1 = 0.f;
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          sum_0 += ssum[w * BJ + 2 * t];
          sum_1 += ssum[w * BJ + 2 * t + 1];
          spx_0 += sspx[w * BJ + 2 * t];
          spx_1 += sspx[w * BJ + 2 * t + 1];
        }
        const float inv0 = 1.f / sum_0, inv1 = 1.f / sum_1;
        if (wq == 0 && g == 0) {  // c = Σ R log2 R = Σ p (x − m) / sum − log2(sum)
          sc[(2 * t) * CHUNK + kk] = spx_0 * inv0 - __log2f(sum_0);
          sc[(2 * t + 1) * CHUNK + kk] = spx_1 * inv1 - __log2f(sum_1);
        }
        constexpr int MT_PER_WARP = D / 16 / 4;
        uint32_t pb[(NL + 1) / 2][4];  // B = p^T (stored [j][l]): lane → j = lane % 8, l = 16kl + 8·(lane / 8)
#pragma unroll
        for (int kl = 0; kl < NL; kl += 2)
          ldsm_x4(smem_addr(spg + (lane % 8) * PROW + 16 * kl + 8 * (lane / 8)), pb[kl / 2][0], pb[kl / 2][1],
                  pb[kl / 2][2], pb[kl / 2][3]);
#pragma unroll
        for (int u = 0; u < (MF_SKIP_PHASE2 ? 0 : MT_PER_WARP); ++u) {
          const int d0 = 16 * (wq * MT_PER_WARP + u);
          float ea[4] = {0.f, 0.f, 0.f, 0.f}, ey[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int kl = 0; kl < NL; kl += 2) {
            const uint32_t pb0 = pb[kl / 2][0], pb1 = pb[kl / 2][1], pb2 = pb[kl / 2][2], pb3 = pb[kl / 2][3];
#pragma unroll
            for (int v2 = 0; v2 < 2; ++v2) {
              if (kl + v2 >= NL) break;
              // A = K^T (stored K[l][d], d contiguous): transposed 8 × 8 loads; lane → l = 16(kl + v2) + lane % 8
              // + 8·(lane / 16), d = d0 + 8·((lane / 8) % 2)
              const int la = 16 * (kl + v2) + (lane % 8) + 8 * (lane / 16);
              const int dcol = d0 + 8 * ((lane / 8) % 2);
              const uint32_t ka = la < b2 ? smem_addr(sk + la * ROW + dcol) : zero_row + 2u * dcol;
              const uint32_t va = la < b2 ? smem_addr(sv + la * ROW + dcol) : zero_row + 2u * dcol;
              uint32_t a0, a1, a2, a3;
              ldsm_x4_t(ka, a0, a1, a2, a3);
              mma16(ea, a0, a1, a2, a3, v2 ? pb2 : pb0, v2 ? pb3 : pb1);
              ldsm_x4_t(va, a0, a1, a2, a3);
              mma16(ey, a0, a1, a2, a3, v2 ? pb2 : pb0, v2 ? pb3 : pb1);
            }
          }
          // ea0: (d = d0 + g, j = 2t), ea1: (d, 2t + 1), ea2: (d + 8, 2t), ea3: (d + 8, 2t + 1)
          elem_t* a_j0 = sa + ((2 * t) * CHUNK + kk) * ROW + d0 + g;
          elem_t* a_j1 = sa + ((2 * t + 1) * CHUNK + kk) * ROW + d0 + g;
          elem_t* y_j0 = sy + ((2 * t) * CHUNK + kk) * ROW + d0 + g;
          elem_t* y_j1 = sy + ((2 * t + 1) * CHUNK + kk) * ROW + d0 + g;
          a_j0[0] = to_elem(ea[0] * inv0);
          a_j1[0] = to_elem(ea[1] * inv1);
          a_j0[8] = to_elem(ea[2] * inv0);
          a_j1[8] = to_elem(ea[3] * inv1);
          y_j0[0] = to_elem(ey[0] * inv0);
          y_j1[0] = to_elem(ey[1] * inv1);
          y_j0[8] = to_elem(ey[2] * inv0);
          y_j1[8] = to_elem(ey[3] * inv1);
        }
        mark(3);
      }
      __syncthreads();  // the chunk's slab (α, Y, c of 8 rows × 8 columns) is complete
      mark(4);

      // L-step: this warp's column against the chunk's 8 keys.
      if (!MF_SKIP_LSTEP) {
        const elem_t* a_col = sa + warp * CHUNK * ROW;
        const elem_t* y_col = sy + warp * CHUNK * ROW;
        float z[MI][4];
#pragma unroll
        for (int mt = 0; mt < MI; ++mt) z[mt][0] = z[mt][1] = z[mt][2] = z[mt][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ks += 2) {
          uint32_t b0, b1_, b2_, b3;  // B = α (stored [kk][d]): lane → kk = lane % 8, d offset 8·(lane / 8)
          ldsm_x4(smem_addr(a_col + (lane % 8) * ROW + 16 * ks + 8 * (lane / 8)), b0, b1_, b2_, b3);
#pragma unroll
          for (int mt = 0; mt < MI; ++mt)
#pragma unroll
            for (int u = 0; u < 2; ++u) {
              uint32_t a0, a1, a2, a3;  // A = Q[i][d]: lane → row 16mt + lane % 16, column 8·(lane / 16)
              ldsm_x4(smem_addr(sq_col + (16 * mt + lane % 16) * ROW + 16 * (ks + u) + 8 * (lane / 16)), a0, a1,
                      a2, a3);
              mma16(z[mt], a0, a1, a2, a3, u ? b2_ : b0, u ? b3 : b1_);
            }
        }
        const float c0 = sc[warp * CHUNK + 2 * t], c1 = sc[warp * CHUNK + 2 * t + 1];
        uint32_t pa[MI][2];
#pragma unroll
        for (int mt = 0; mt < MI; ++mt) {
          // z0, z1: row 16mt + g, keys 2t, 2t + 1; z2, z3: row + 8
          float x[4] = {z[mt][0] * scale_log2 - c0, z[mt][1] * scale_log2 - c1, z[mt][2] * scale_log2 - c0,
                        z[mt][3] * scale_log2 - c1};
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const float mx = row_max(fmaxf(x[2 * hr], x[2 * hr + 1]));
            const float m_new = fmaxf(m_run[mt][hr], mx);
            const float corr = m_run[mt][hr] == NEG_INF ? 0.f : ex2(m_run[mt][hr] - m_new);
            const float p0 = ex2(x[2 * hr] - m_new), p1 = ex2(x[2 * hr + 1] - m_new);
            l_run[mt][hr] = l_run[mt][hr] * corr + p0 + p1;
            m_run[mt][hr] = m_new;
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
              acc[mt][nt][2 * hr] *= corr;
              acc[mt][nt][2 * hr + 1] *= corr;
            }
            pa[mt][hr] = pack2(p0, p1);
          }
        }
#pragma unroll
        for (int nq = 0; nq < D / 32; ++nq) {
          uint32_t y0, y1, y2, y3;  // B = Y (stored [kk][d]), transposed: lane → kk = lane % 8, d = 32nq + 8(lane / 8)
          ldsm_x4_t(smem_addr(y_col + (lane % 8) * ROW + 32 * nq + 8 * (lane / 8)), y0, y1, y2, y3);
#pragma unroll
          for (int mt = 0; mt < MI; ++mt) {
            mma8(acc[mt][4 * nq + 0], pa[mt][0], pa[mt][1], y0);
            mma8(acc[mt][4 * nq + 1], pa[mt][0], pa[mt][1], y1);
            mma8(acc[mt][4 * nq + 2], pa[mt][0], pa[mt][1], y2);
            mma8(acc[mt][4 * nq + 3], pa[mt][0], pa[mt][1], y3);
          }
        }
      }
      mark(5);
      __syncthreads();  // the slab is free for the next chunk
      mark(6);
    }
  }
  cp_async_wait_all();
  if (MF_TIMING && lane == 0) {
    const int which = blockIdx.z == 0 && blockIdx.y == 0 && blockIdx.x == 0 ? 0
                      : blockIdx.z == gridDim.z / 2 && blockIdx.y == gridDim.y / 2 && blockIdx.x == 0 ? 1 : -1;
    if (which >= 0)
      for (int ph = 0; ph < TIMED_PHASES; ++ph) p.timing[(which * WARPS + warp) * TIMED_PHASES + ph] = cycles[ph];
  }

  // Output: rows i < b1 of column j0 + warp (if < b2), raster order.
  const int j = j0 + warp;
  if (j < b2) {
    elem_t* oh = p.out + b * p.so_b + h * p.so_h;
#pragma unroll
    for (int mt = 0; mt < MI; ++mt)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const float inv = 1.f / row_sum(l_run[mt][hr]);  // all lanes: the shuffle precedes the row test
        const int i = 16 * mt + g + 8 * hr;
        if (i >= b1) continue;
        elem_t* o = oh + (long long)tile_token(p, a, i, j) * p.so_t + 2 * t;
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) store2(o + 8 * nt, acc[mt][nt][2 * hr] * inv, acc[mt][nt][2 * hr + 1] * inv);
      }
  }
}

extern "C" __global__ void monarch_fused_smem_bytes(int b2, int* out) { *out = Layout(b2).bytes; }
