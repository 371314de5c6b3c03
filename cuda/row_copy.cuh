// Warp-level row copies and a block scan shared by the intranode and internode kernels (device code only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/intranode.cuh"
#include "cuda/sync.cuh"

namespace jax_ep {
namespace rows {

constexpr unsigned kFullMask = 0xffffffffu;

// Copy `bytes` (a multiple of 4) from src to every destination of the warp's token. Lanes loop in
// lockstep so the per-destination slot can be shuffled from the lane that loaded it; each lane keeps
// kUnroll loads in flight before it stores them to every destination (the token is read once).
constexpr int kUnroll = 4;

template <typename Vec>
__device__ __forceinline__ void send_row(const uint8_t* src, int bytes, const PeerView& v, size_t area_offset,
                                         int area_row_bytes, int slot_lo, int slot_hi, uint64_t dest_mask) {
  const int lane = threadIdx.x & 31;
  const int n = bytes / static_cast<int>(sizeof(Vec));
  const Vec* in = reinterpret_cast<const Vec*>(src);
  for (int j0 = 0; j0 < n; j0 += 32 * kUnroll) {
    Vec value[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * 32 + lane;
      value[u] = j < n ? in[j] : Vec{};
    }
    uint64_t m = dest_mask;
    while (m) {
      const int r = __ffsll(static_cast<long long>(m)) - 1;
      m &= m - 1;
      const int slot = __shfl_sync(kFullMask, r < 32 ? slot_lo : slot_hi, r & 31);
      Vec* out = reinterpret_cast<Vec*>(v.peers[r] + area_offset + static_cast<size_t>(slot) * area_row_bytes);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = j0 + u * 32 + lane;
        if (j < n) out[j] = value[u];
      }
    }
  }
}

template <typename Vec>
__device__ __forceinline__ void copy_or_zero(const uint8_t* src, uint8_t* dst, int bytes, bool valid) {
  const int lane = threadIdx.x & 31;
  const int n = bytes / static_cast<int>(sizeof(Vec));
  const Vec* in = reinterpret_cast<const Vec*>(src);
  Vec* out = reinterpret_cast<Vec*>(dst);
  for (int j0 = 0; j0 < n; j0 += 32 * kUnroll) {
    Vec value[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * 32 + lane;
      value[u] = (valid && j < n) ? ld_peer_written(in + j) : Vec{};
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * 32 + lane;
      if (j < n) out[j] = value[u];
    }
  }
}

// A token's payload row and its fp8 scales (src_scales == nullptr: none), copied or zeroed together. When
// both are whole 16-byte vectors the scales ride in the payload's last round of loads instead of costing
// a round trip of their own (the receive pulls across NVLink on several GPUs, where round trips dominate).
__device__ __forceinline__ void copy_row_and_scales(const uint8_t* src, uint8_t* dst, int row_bytes,
                                                    const uint8_t* src_scales, uint8_t* dst_scales, int scale_bytes,
                                                    bool valid) {
  const int scales = src_scales != nullptr ? scale_bytes : 0;
  if (row_bytes % 16 != 0 || scales % 16 != 0) {
    if (row_bytes % 16 == 0) {
      copy_or_zero<int4>(src, dst, row_bytes, valid);
    } else {
      copy_or_zero<int>(src, dst, row_bytes, valid);
    }
    if (scales) copy_or_zero<int>(src_scales, dst_scales, scales, valid);
    return;
  }
  const int lane = threadIdx.x & 31;
  const int n_row = row_bytes / 16, n = n_row + scales / 16;
  const int4* in = reinterpret_cast<const int4*>(src);
  const int4* in_scales = reinterpret_cast<const int4*>(src_scales);
  int4* out = reinterpret_cast<int4*>(dst);
  int4* out_scales = reinterpret_cast<int4*>(dst_scales);
  for (int j0 = 0; j0 < n; j0 += 32 * kUnroll) {
    int4 value[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * 32 + lane;
      value[u] = (valid && j < n) ? ld_peer_written(j < n_row ? in + j : in_scales + (j - n_row)) : int4{0, 0, 0, 0};
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * 32 + lane;
      if (j < n_row) {
        out[j] = value[u];
      } else if (j < n) {
        out_scales[j - n_row] = value[u];
      }
    }
  }
}

__device__ __forceinline__ void add_bf16x8(float* acc, int4 raw) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] += f.x;
    acc[2 * i + 1] += f.y;
  }
}

// Block-wide exclusive scan of one int per thread (blockDim.x == kBlock). Returns the total.
template <int kBlock>
__device__ int block_exclusive_scan(int value, int* out_exclusive, int* warp_sums) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int inclusive = value;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int n = __shfl_up_sync(kFullMask, inclusive, d);
    if (lane >= d) inclusive += n;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int s = lane < (kBlock / 32) ? warp_sums[lane] : 0;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int n = __shfl_up_sync(kFullMask, s, d);
      if (lane >= d) s += n;
    }
    warp_sums[lane] = s;  // inclusive over warps
  }
  __syncthreads();
  const int warp_base = warp == 0 ? 0 : warp_sums[warp - 1];
  *out_exclusive = warp_base + inclusive - value;
  const int total = warp_sums[kBlock / 32 - 1];
  __syncthreads();  // warp_sums is reused by the next scan
  return total;
}

// One block of kBlock threads over this rank's a.num_tokens tokens: which ranks each token goes to
// (a.is_token_in_rank), each token's position among the tokens sent to rank r, in token order (a.send_slot,
// -1 where not sent) and row[r], the count per rank. Ids outside [-1, E) are ignored and counted into *invalid
// (shared, zeroed by the caller). Returns synchronised; [t0, t1) is this thread's chunk of tokens.
template <int kBlock>
__device__ void count_tokens_per_rank(const DispatchArgs& a, int R, int K, int* row, int* invalid, int* warp_sums,
                                      int* t0_out, int* t1_out) {
  const int T = a.num_tokens, E = a.num_experts, E_loc = E / R, tid = threadIdx.x;
  int my_invalid = 0;
  for (int t = tid; t < T; t += blockDim.x) {
    uint64_t mask = 0;
    for (int k = 0; k < K; ++k) {
      const int id = a.topk_idx[t * K + k];
      if (id >= 0 && id < E) {
        mask |= 1ull << (id / E_loc);
      } else if (id != -1) {
        ++my_invalid;
      }
    }
    for (int r = 0; r < R; ++r) a.is_token_in_rank[t * R + r] = (mask >> r) & 1;
  }
  if (my_invalid) atomicAdd(invalid, my_invalid);
  __syncthreads();
  const int chunk = (T + blockDim.x - 1) / blockDim.x;
  const int t0 = min(T, tid * chunk), t1 = min(T, t0 + chunk);
  for (int r = 0; r < R; ++r) {
    int count = 0;
    for (int t = t0; t < t1; ++t) count += a.is_token_in_rank[t * R + r];
    int pos;
    const int total = block_exclusive_scan<kBlock>(count, &pos, warp_sums);
    for (int t = t0; t < t1; ++t) a.send_slot[t * R + r] = a.is_token_in_rank[t * R + r] ? pos++ : -1;
    if (tid == 0) row[r] = total;
  }
  __syncthreads();
  *t0_out = t0;
  *t1_out = t1;
}

// A warp stores its token's metadata into its slot at every rank in `dests`: ids and weights (lanes < K),
// the source index (lane 0) and, where fwd_area is nonzero, the forwarder's row index there (lane 0).
__device__ __forceinline__ void store_token_meta(const PeerView& v, uint64_t dests, int slot_lo, int slot_hi, int K,
                                                 int id, float w, int src, size_t fwd_area, int fwd) {
  const int lane = threadIdx.x & 31;
  while (dests) {
    const int r = __ffsll(static_cast<long long>(dests)) - 1;
    dests &= dests - 1;
    const int slot = __shfl_sync(kFullMask, r < 32 ? slot_lo : slot_hi, r & 31);
    uint8_t* peer = v.peers[r];
    if (lane < K) {
      field<int>(peer, v.layout.recv_idx)[slot * K + lane] = id;
      field<float>(peer, v.layout.recv_w)[slot * K + lane] = w;
    }
    if (lane == 0) {
      field<int>(peer, v.layout.recv_src)[slot] = src;
      if (fwd_area) field<int>(peer, fwd_area)[slot] = fwd;
    }
  }
}

}  // namespace rows
}  // namespace jax_ep
