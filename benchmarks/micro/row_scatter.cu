// Row-scatter microbenchmark: how much of the device copy bandwidth the normal mode's copy pattern can get.
//
// The dispatch send reads each token row once and writes it to every destination rank's staging slot (DeepEP's
// routing: ~5.3 distinct ranks of 8 per token). The kernels copy rows of H bf16 from a [T, H] source to D
// destination slots each, scattered over a [T * D, H] buffer, with
//   warp<U>  one warp per token, U 16-byte loads in flight per lane, stored to every destination (what
//            cuda/intranode.cu does today, U = 4);
//   tma      one warp per token whose lane 0 moves the row with bulk copies (cp.async.bulk): global ->
//            shared once, then shared -> global per destination, two rows in flight per warp;
// next to cudaMemcpy (device to device) of the same bytes. Reported: GB/s of HBM traffic (bytes read +
// written, the convention of B in the issues) and the ratio to cudaMemcpy's.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 benchmarks/micro/row_scatter.cu -o /tmp/row_scatter && /tmp/row_scatter
//   args: [T=4096] [H=7168] [D=5] [reps=20]
// Prediction to check: warp<4> ~65% of cudaMemcpy (what the R=1 dispatch suggested), tma >= 85%.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <random>
#include <vector>

#define CK(x)                                                                             \
  do {                                                                                    \
    cudaError_t e_ = (x);                                                                 \
    if (e_ != cudaSuccess) {                                                              \
      std::printf("CUDA error %s at line %d: %s\n", cudaGetErrorName(e_), __LINE__, #x); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

constexpr int kWarpsPerBlock = 4;

template <int U>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) warp_scatter(const int4* src, int4* dst, const int* dst_rows,
                                                                   int T, int D, int row_vecs) {
  const int lane = threadIdx.x & 31;
  for (int t = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5); t < T; t += gridDim.x * kWarpsPerBlock) {
    const int4* in = src + static_cast<size_t>(t) * row_vecs;
    for (int j0 = 0; j0 < row_vecs; j0 += 32 * U) {
      int4 v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = j0 + u * 32 + lane;
        if (j < row_vecs) v[u] = __ldg(in + j);
      }
      for (int d = 0; d < D; ++d) {
        int4* out = dst + static_cast<size_t>(dst_rows[t * D + d]) * row_vecs;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int j = j0 + u * 32 + lane;
          if (j < row_vecs) out[j] = v[u];
        }
      }
    }
  }
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  }
}

__device__ __forceinline__ void bulk_load(void* smem, const void* gmem, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_addr(smem)),
               "l"(gmem), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}

__device__ __forceinline__ void bulk_store(void* gmem, const void* smem, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(gmem), "r"(smem_addr(smem)),
               "r"(bytes)
               : "memory");
}

// Each warp owns two row-sized stages of shared memory; lane 0 drives the copies.
__global__ void __launch_bounds__(32 * kWarpsPerBlock) tma_scatter(const uint8_t* src, uint8_t* dst,
                                                                  const int* dst_rows, int T, int D, int row_bytes) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ __align__(8) uint64_t bars[kWarpsPerBlock][2];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  uint8_t* stage[2] = {smem + static_cast<size_t>(warp) * 2 * row_bytes,
                       smem + static_cast<size_t>(warp) * 2 * row_bytes + row_bytes};
  if (lane == 0) {
    mbar_init(&bars[warp][0]);
    mbar_init(&bars[warp][1]);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncwarp();
  if (lane != 0) return;
  int i = 0;
  for (int t = blockIdx.x * kWarpsPerBlock + warp; t < T; t += gridDim.x * kWarpsPerBlock, ++i) {
    const int s = i & 1;
    // Stage s was last read by the stores of row i - 2: allow only row i - 1's group to be pending.
    asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
    mbar_expect_tx(&bars[warp][s], row_bytes);
    bulk_load(stage[s], src + static_cast<size_t>(t) * row_bytes, row_bytes, &bars[warp][s]);
    mbar_wait(&bars[warp][s], (i >> 1) & 1);
    for (int d = 0; d < D; ++d) {
      bulk_store(dst + static_cast<size_t>(dst_rows[t * D + d]) * row_bytes, stage[s], row_bytes);
    }
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

int main(int argc, char** argv) {
  const int T = argc > 1 ? std::atoi(argv[1]) : 4096, H = argc > 2 ? std::atoi(argv[2]) : 7168;
  const int D = argc > 3 ? std::atoi(argv[3]) : 5, reps = argc > 4 ? std::atoi(argv[4]) : 20;
  const int row_bytes = 2 * H, row_vecs = row_bytes / 16;
  if (row_bytes % 16) {
    std::printf("H must be a multiple of 8\n");
    return 1;
  }
  int sms = 0, device = 0;
  CK(cudaGetDevice(&device));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const size_t src_bytes = static_cast<size_t>(T) * row_bytes, dst_bytes = src_bytes * D;
  uint8_t *src, *dst, *copy_dst;
  int* rows;
  CK(cudaMalloc(&src, src_bytes));
  CK(cudaMalloc(&dst, dst_bytes));
  CK(cudaMalloc(&copy_dst, dst_bytes));
  CK(cudaMalloc(&rows, sizeof(int) * T * D));
  std::vector<uint8_t> h_src(src_bytes);
  std::mt19937 rng(0);
  for (auto& b : h_src) b = static_cast<uint8_t>(rng());
  CK(cudaMemcpy(src, h_src.data(), src_bytes, cudaMemcpyHostToDevice));
  std::vector<int> h_rows(static_cast<size_t>(T) * D);
  for (size_t i = 0; i < h_rows.size(); ++i) h_rows[i] = static_cast<int>(i);
  std::shuffle(h_rows.begin(), h_rows.end(), rng);  // destination slots scattered like staging slots
  CK(cudaMemcpy(rows, h_rows.data(), sizeof(int) * h_rows.size(), cudaMemcpyHostToDevice));

  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  auto time_ms = [&](auto&& launch) {
    launch();
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    CK(cudaEventRecord(a));
    for (int r = 0; r < reps; ++r) launch();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    return ms / reps;
  };
  auto verify = [&](const char* name) {
    std::vector<uint8_t> h_dst(dst_bytes);
    CK(cudaMemcpy(h_dst.data(), dst, dst_bytes, cudaMemcpyDeviceToHost));
    for (int t = 0; t < T; t += 97) {
      for (int d = 0; d < D; ++d) {
        const uint8_t* got = h_dst.data() + static_cast<size_t>(h_rows[t * D + d]) * row_bytes;
        for (int k = 0; k < row_bytes; ++k) {
          if (got[k] != h_src[static_cast<size_t>(t) * row_bytes + k]) {
            std::printf("%s: MISMATCH at token %d dest %d byte %d\n", name, t, d, k);
            std::exit(2);
          }
        }
      }
    }
  };
  // HBM traffic of the scatter: read T rows once, write T * D rows.
  const double traffic = static_cast<double>(src_bytes) + static_cast<double>(dst_bytes);
  const float ms_copy = time_ms([&] { CK(cudaMemcpyAsync(copy_dst, src, src_bytes, cudaMemcpyDeviceToDevice)); });
  const double copy_bw = 2.0 * src_bytes / (ms_copy * 1e-3);
  std::printf("T=%d H=%d D=%d rows of %d B, %d SMs\n", T, H, D, row_bytes, sms);
  std::printf("%-26s %9.1f GB/s (read + write)\n", "cudaMemcpy D2D", copy_bw / 1e9);
  auto report = [&](const char* name, float ms) {
    const double bw = traffic / (ms * 1e-3);
    std::printf("%-26s %9.1f GB/s  %.2f x cudaMemcpy  (%.1f us)\n", name, bw / 1e9, bw / copy_bw, ms * 1e3);
  };
  for (int blocks_per_sm : {1, 2, 4}) {
    char name[64];
    const int grid = blocks_per_sm * sms * 4;  // blocks of 4 warps: 16 warps per SM per unit
    CK(cudaMemset(dst, 0, dst_bytes));
    std::snprintf(name, sizeof(name), "warp<4>, %d x 16 warps/SM", blocks_per_sm);
    report(name, time_ms([&] {
             warp_scatter<4><<<grid, 32 * kWarpsPerBlock>>>(reinterpret_cast<const int4*>(src),
                                                            reinterpret_cast<int4*>(dst), rows, T, D, row_vecs);
           }));
    verify(name);
    CK(cudaMemset(dst, 0, dst_bytes));
    std::snprintf(name, sizeof(name), "warp<8>, %d x 16 warps/SM", blocks_per_sm);
    report(name, time_ms([&] {
             warp_scatter<8><<<grid, 32 * kWarpsPerBlock>>>(reinterpret_cast<const int4*>(src),
                                                            reinterpret_cast<int4*>(dst), rows, T, D, row_vecs);
           }));
    verify(name);
  }
  const size_t tma_smem = static_cast<size_t>(kWarpsPerBlock) * 2 * row_bytes;
  CK(cudaFuncSetAttribute(tma_scatter, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(tma_smem)));
  int per_sm = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, tma_scatter, 32 * kWarpsPerBlock, tma_smem));
  for (int blocks_per_sm = 1; blocks_per_sm <= per_sm; ++blocks_per_sm) {
    char name[64];
    std::snprintf(name, sizeof(name), "tma, %d x 4 warps/SM", blocks_per_sm);
    CK(cudaMemset(dst, 0, dst_bytes));
    report(name, time_ms([&] {
             tma_scatter<<<blocks_per_sm * sms, 32 * kWarpsPerBlock, tma_smem>>>(src, dst, rows, T, D, row_bytes);
           }));
    verify(name);
  }
  return 0;
}
