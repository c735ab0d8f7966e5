// Read bandwidth of distributed shared memory (a thread-block cluster's blocks reading each other's shared memory)
// against a block reading its own: the rate a fused Monarch forward would hand α/Y between SMs at
// (kernels/NOTES.md, "The two rates, measured": the candidate whose R-step programs pass their results to the
// L-step programs of the same cluster).
//
// Each block fills 64 KB of shared memory with a pattern, the cluster synchronises, then every thread reads
// 16-byte vectors from the shared memory of block (rank + 1) mod C of its cluster (or its own, "local"), coalesced,
// `iters` passes over the 64 KB, and sums them. Before timing, a check pass copies one remote pass to global memory
// for the host to compare with the neighbour's pattern, and the sums of a full launch are compared with their exact
// values; a mismatch exits non-zero. The pass order depends on a run-time argument so the compiler cannot keep a
// pass in registers, and each case runs at two pass counts: the time must scale with them. Prints one JSON object
// (medians of 10 timed launches after 2 warm-ups, CUDA events), ending with the number of clusters of 1–8 blocks
// that can be resident at once for this test's blocks and for one-block-per-SM blocks of 200 KB.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o dsmem benchmarks/dsmem_bandwidth.cu && ./dsmem

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <vector>

#include "cuda_timing.cuh"

namespace cg = cooperative_groups;

constexpr int kThreads = 512;
constexpr int kVectors = 64 * 1024 / 16;  // float4 per block: 64 KB
constexpr int kPerThread = kVectors / kThreads;

__device__ __forceinline__ float4 sum_passes(const float4* src, int iters, int stride) {
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      // each pass reads the thread's 8 vectors in an order set by `stride` (1 at run time, unknown when compiled),
      // so no pass can be proven to repeat an earlier one and its loads cannot be kept in registers
      const float4 v = src[(threadIdx.x + (j + it * stride) * kThreads) & (kVectors - 1)];
      acc.x += v.x;
      acc.y += v.y;
      acc.z += v.z;
      acc.w += v.w;
    }
  }
  return acc;
}

__global__ void read_cluster_smem(float4* out, int iters, int stride, int remote, int check) {
  extern __shared__ float4 buf[];
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank();
  for (int i = threadIdx.x; i < kVectors; i += kThreads)
    buf[i] = make_float4(float(i), float(blockIdx.x), 1.0f, 0.5f);
  cluster.sync();  // every block's buffer written before any block reads another's
  const float4* src = remote ? cluster.map_shared_rank(buf, (rank + 1) % cluster.num_blocks()) : buf;
  if (check) {
    for (int j = 0; j < kPerThread; ++j) {
      const int idx = threadIdx.x + j * kThreads;
      out[size_t(blockIdx.x) * kVectors + idx] = src[idx];
    }
  } else {
    // own memory through `buf` itself, so the compiler emits shared-memory loads (LDS), not generic ones
    const float4 acc = remote ? sum_passes(src, iters, stride) : sum_passes(buf, iters, stride);
    out[size_t(blockIdx.x) * kThreads + threadIdx.x] = acc;
  }
  cluster.sync();  // no block leaves while another may still read its shared memory
}

// `blocks` blocks of `threads` threads and `smem` bytes of dynamic shared memory, in clusters of `cluster` along x:
// what a launch and an occupancy query both take. Not copyable: `cfg.attrs` points at the member `attr`.
struct ClusterLaunch {
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr = {};
  ClusterLaunch(int cluster, int blocks, int threads, int smem) {
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = cluster;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

static void launch(int cluster, int blocks, float4* out, int iters, int remote, int check) {
  const int stride = 1;
  const ClusterLaunch config(cluster, blocks, kThreads, kVectors * int(sizeof(float4)));
  CHECK(cudaLaunchKernelEx(&config.cfg, read_cluster_smem, out, iters, stride, remote, check));
  CHECK(cudaGetLastError());
}

// One thread's sums over `iters` passes: every pass reads all 8 of its vectors once, so y = 8·iters·(source
// block), z = 8·iters, w = 4·iters exactly (integers below 2^24 in float32).
static long count_bad_sums(const std::vector<float4>& host, int blocks, int cluster, int iters, int remote) {
  long bad = 0;
  for (int b = 0; b < blocks; ++b) {
    const int source = remote ? b - b % cluster + (b % cluster + 1) % cluster : b;
    for (int t = 0; t < kThreads; ++t) {
      const float4 v = host[size_t(b) * kThreads + t];
      bad += !(v.y == 8.0f * iters * source && v.z == 8.0f * iters && v.w == 4.0f * iters);
    }
  }
  return bad;
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  CHECK(cudaFuncSetAttribute(read_cluster_smem, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             kVectors * int(sizeof(float4))));
  const int pass_counts[2] = {500, 1000};
  std::printf("{\"gpu\": \"%s\", \"multiprocessors\": %d, \"bytes_per_block_pass\": %d, \"rows\": [",
              prop.name, prop.multiProcessorCount, kVectors * 16);
  bool first = true;
  for (int cluster : {2, 4, 8}) {
    const int blocks = (2 * prop.multiProcessorCount) / cluster * cluster;
    float4* out;
    CHECK(cudaMalloc(&out, size_t(blocks) * kVectors * sizeof(float4)));
    // check: one remote pass copied out equals the neighbour's pattern
    CHECK(cudaMemset(out, 0xff, size_t(blocks) * kVectors * sizeof(float4)));  // NaN poison
    launch(cluster, blocks, out, 0, 1, 1);
    CHECK(cudaDeviceSynchronize());
    std::vector<float4> host(size_t(blocks) * kVectors);
    CHECK(cudaMemcpy(host.data(), out, host.size() * sizeof(float4), cudaMemcpyDeviceToHost));
    long bad = 0;
    for (int b = 0; b < blocks; ++b) {
      const int neighbour = b - b % cluster + (b % cluster + 1) % cluster;
      for (int i = 0; i < kVectors; ++i) {
        const float4 v = host[size_t(b) * kVectors + i];
        bad += !(v.x == float(i) && v.y == float(neighbour) && v.z == 1.0f && v.w == 0.5f);
      }
    }
    if (bad) {
      std::fprintf(stderr, "cluster %d: %ld vectors of the neighbour's pattern read wrong\n", cluster, bad);
      return 1;
    }
    for (int remote : {1, 0}) {
      double median[2];
      for (int p = 0; p < 2; ++p) {
        const int iters = pass_counts[p];
        CHECK(cudaMemset(out, 0xff, size_t(blocks) * kThreads * sizeof(float4)));
        launch(cluster, blocks, out, iters, remote, 0);  // warm-up 1, and the launch whose sums are checked
        CHECK(cudaDeviceSynchronize());
        CHECK(cudaMemcpy(host.data(), out, size_t(blocks) * kThreads * sizeof(float4), cudaMemcpyDeviceToHost));
        const long bad_sums = count_bad_sums(host, blocks, cluster, iters, remote);
        if (bad_sums) {
          std::fprintf(stderr, "cluster %d, %s, %d passes: %ld threads' sums wrong\n", cluster,
                       remote ? "remote" : "local", iters, bad_sums);
          return 1;
        }
        // the checked launch was warm-up 1
        median[p] = median_ms([&] { launch(cluster, blocks, out, iters, remote, 0); }, 1);
      }
      const double bytes = double(blocks) * pass_counts[1] * kVectors * 16.0;
      std::printf("%s\n {\"cluster\": %d, \"blocks\": %d, \"source\": \"%s\", \"checked\": true, "
                  "\"median_ms_500_passes\": %.4f, \"median_ms_1000_passes\": %.4f, \"TB_per_s\": %.3f}",
                  first ? "" : ",", cluster, blocks, remote ? "neighbour's shared memory" : "own shared memory",
                  median[0], median[1], bytes / (median[1] * 1e-3) / 1e12);
      first = false;
    }
    CHECK(cudaFree(out));
  }
  // How many clusters can be resident at once (cudaOccupancyMaxActiveClusters), for this test's blocks (512
  // threads, 64 KB: two per SM) and for blocks shaped like a fused Monarch forward's (256 threads, 200 KB: one per
  // SM): the reads above fell for clusters of 4 and 8, and a fused design needs clusters of 8 on every SM.
  constexpr int kFusedSmem = 200 * 1024;
  CHECK(cudaFuncSetAttribute(read_cluster_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, kFusedSmem));
  std::printf("\n], \"max_active_clusters\": [");
  first = true;
  for (const int threads : {kThreads, 256}) {
    const int smem = threads == kThreads ? kVectors * int(sizeof(float4)) : kFusedSmem;
    for (int cluster : {1, 2, 4, 8}) {
      const ClusterLaunch config(cluster, cluster * prop.multiProcessorCount, threads, smem);
      int clusters = 0;
      CHECK(cudaOccupancyMaxActiveClusters(&clusters, read_cluster_smem, &config.cfg));
      std::printf("%s\n {\"threads\": %d, \"shared_bytes\": %d, \"cluster\": %d, \"clusters\": %d, "
                  "\"blocks\": %d}", first ? "" : ",", threads, smem, cluster, clusters, clusters * cluster);
      first = false;
    }
  }
  std::printf("\n]}\n");
  return 0;
}
