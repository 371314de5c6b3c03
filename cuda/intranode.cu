// Intranode normal-mode kernels (see intranode.cuh for the protocol).
//
// Bytes moved per received row (dispatch): the sender reads its token once and writes it once into its own
// stage for all destinations; each receiver reads it from there and writes XLA's output row. Combine: each
// rank copies its answers into its own stage; each source reads them from there and writes one sum per token.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/intranode.cuh"
#include "cuda/row_copy.cuh"
#include "cuda/sync.cuh"

namespace jax_ep {
namespace {

using rows::add_bf16x8;
using rows::block_exclusive_scan;
using rows::count_tokens_per_rank;
using rows::store_token_meta;
using rows::copy_or_zero;
using rows::copy_row_and_scales;
using rows::kUnroll;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kNotifyThreads = 1024;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ uint64_t* epoch_ptr(const PeerView& v) { return field<uint64_t>(v.local, v.layout.epoch); }

__device__ __forceinline__ uint64_t read_epoch(const PeerView& v) {
  return ld_peer_written(epoch_ptr(v));
}

// Signal "done writing to you in this op" to every peer once all blocks of the kernel have finished
// their stores (the last block to arrive signals).
__device__ void signal_done_when_last_block(const PeerView& v, uint64_t epoch) {
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned* counter = field<unsigned>(v.local, v.layout.block_counter);
    if (atomicAdd(counter, 1u) == gridDim.x - 1) {
      *counter = 0;
      __threadfence_system();
      for (int r = 0; r < v.layout.num_ranks; ++r) {
        st_release_sys(field<uint64_t>(v.peers[r], v.layout.done_flags) + v.rank, epoch);
      }
    }
  }
}

__device__ void wait_all_flags(const PeerView& v, size_t flags_offset, uint64_t epoch, int phase) {
  if (threadIdx.x < v.layout.num_ranks) {
    wait_flag_geq(v, field<uint64_t>(v.local, flags_offset) + threadIdx.x, epoch, threadIdx.x, phase);
  }
  __syncthreads();
}

// The receive kernels' wait, as its own one-block kernel: the copy kernel that follows in the stream holds no
// SM while peers are still sending. Under MPS (several ranks on one GPU) spinning receive blocks otherwise
// occupy the SM share that other ranks' senders need.
// Ranks [first, first + count) (every rank, or in internode mode the ranks of this node).
__global__ void wait_done_kernel(PeerView v, int first, int count, int phase) {
  if (threadIdx.x < count) {
    const int r = first + static_cast<int>(threadIdx.x);
    wait_flag_geq(v, field<uint64_t>(v.local, v.layout.done_flags) + r, read_epoch(v), r, phase);
  }
}

// -- dispatch: notify ------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kNotifyThreads, 1) notify_dispatch_kernel(PeerView v, DispatchArgs a) {
  const int R = v.layout.num_ranks, K = v.layout.num_topk, T = a.num_tokens, me = v.rank;
  const int C = v.layout.capacity, E = a.num_experts, E_loc = E / R;
  __shared__ int warp_sums[32];
  __shared__ int row[kMaxPeers];
  __shared__ int base[kMaxPeers];
  __shared__ int invalid;
  __shared__ uint64_t s_epoch;
  const int tid = threadIdx.x;
  trap_if_closed(v);

  if (tid == 0) {
    s_epoch = read_epoch(v) + 1;
    *epoch_ptr(v) = s_epoch;
    invalid = 0;
  }
  for (int e = tid; e < E_loc; e += blockDim.x) a.out_tokens_per_expert[e] = 0;
  __syncthreads();
  const uint64_t epoch = s_epoch;

  // Membership and each token's position among the tokens sent to each rank (ids outside [-1, E) counted).
  int t0, t1;
  count_tokens_per_rank<kNotifyThreads>(a, R, K, row, &invalid, warp_sums, &t0, &t1);

  // Publish my row of the count matrix to every rank, then wait for everyone's (this is also the barrier
  // that guarantees each receiver has finished copying out its previous op).
  const int parity = static_cast<int>(epoch & 1);
  for (int i = tid; i < R * R; i += blockDim.x) {
    const int s = i / R, r = i % R;
    field<int>(v.peers[s], v.layout.counts)[(parity * R + me) * R + r] = row[r];
  }
  __threadfence_system();
  __syncthreads();
  if (tid < R) st_release_sys(field<uint64_t>(v.peers[tid], v.layout.enter_flags) + me, epoch);
  wait_all_flags(v, v.layout.enter_flags, epoch, kPhaseDispatchNotify);

  const int* counts = field<int>(v.local, v.layout.counts) + parity * R * R;
  if (tid < R) {
    int b = 0;
    for (int s = 0; s < me; ++s) b += ld_peer_written(counts + s * R + tid);
    base[tid] = b;
  }
  if (tid == 0) {
    int total = 0;
    for (int s = 0; s < R; ++s) total += ld_peer_written(counts + s * R + me);
    const int num_recv = min(total, C);
    a.out_stats[0] = num_recv;
    a.out_stats[1] = total - num_recv;
    a.out_stats[2] = invalid;
    a.out_stats[3] = total;
  }
  __syncthreads();
  for (int i = tid; i < T * R; i += blockDim.x) {
    const int pos = a.send_slot[i];
    if (pos >= 0) {
      const int slot = base[i % R] + pos;
      a.send_slot[i] = slot < C ? slot : -1;  // past the capacity: not sent (counted as overflow there)
    }
  }
}

// Enter barrier for ops whose layout is already known (cached dispatch, combine).
__global__ void enter_barrier_kernel(PeerView v, int phase) {
  __shared__ uint64_t s_epoch;
  trap_if_closed(v);
  if (threadIdx.x == 0) {
    s_epoch = read_epoch(v) + 1;
    *epoch_ptr(v) = s_epoch;
  }
  __syncthreads();
  if (threadIdx.x < v.layout.num_ranks) {
    st_release_sys(field<uint64_t>(v.peers[threadIdx.x], v.layout.enter_flags) + v.rank, s_epoch);
  }
  wait_all_flags(v, v.layout.enter_flags, s_epoch, phase);
}

// -- dispatch: send / receive ----------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) dispatch_send_kernel(PeerView v, Rows in, const int32_t* topk_idx,
                                                                  const float* topk_weights, const int32_t* send_slot,
                                                                  int num_tokens, int num_experts) {
  const int R = v.layout.num_ranks, K = v.layout.num_topk, lane = threadIdx.x & 31;
  const uint64_t epoch = read_epoch(v);
  const int warp = blockIdx.x * kWarps + (threadIdx.x >> 5), num_warps = gridDim.x * kWarps;
  for (int t = warp; t < num_tokens; t += num_warps) {
    // Slots come from a handle (a user-visible pytree): anything outside [0, C) is not an address.
    int slot_lo = lane < R ? send_slot[t * R + lane] : -1;
    int slot_hi = lane + 32 < R ? send_slot[t * R + lane + 32] : -1;
    if (slot_lo >= v.layout.capacity) slot_lo = -1;
    if (slot_hi >= v.layout.capacity) slot_hi = -1;
    const uint64_t dest_mask = static_cast<uint64_t>(__ballot_sync(kFullMask, slot_lo >= 0)) |
                               (static_cast<uint64_t>(__ballot_sync(kFullMask, slot_hi >= 0)) << 32);
    if (dest_mask == 0) continue;
    // The row goes once into this rank's own stage (local stores); its receivers pull it from there.
    const uint8_t* scales = in.scales != nullptr
                                ? static_cast<const uint8_t*>(in.scales) + static_cast<size_t>(t) * in.scale_bytes
                                : nullptr;
    copy_row_and_scales(static_cast<const uint8_t*>(in.x) + static_cast<size_t>(t) * in.row_bytes,
                        v.local + v.layout.stage_x + static_cast<size_t>(t) * v.layout.max_row_bytes, in.row_bytes,
                        scales, v.local + v.layout.stage_scales + static_cast<size_t>(t) * v.layout.max_scale_bytes,
                        in.scale_bytes, true);
    if (topk_idx != nullptr) {
      int id = -1;
      float w = 0.f;
      if (lane < K) {
        id = topk_idx[t * K + lane];
        if (id < 0 || id >= num_experts) id = -1;
        w = topk_weights[t * K + lane];
      }
      store_token_meta(v, dest_mask, slot_lo, slot_hi, K, id, w, v.rank * v.layout.max_tokens + t, 0, 0);
    }
  }
  signal_done_when_last_block(v, epoch);
}

// One kernel for dispatch (with metadata) and cached dispatch (rows only). pull: slot c's row is read from its
// source's stage (source from handle_src, else from the metadata the source pushed); otherwise from this
// rank's staging area (internode mode, where rows are pushed).
__global__ void __launch_bounds__(kThreads) dispatch_recv_kernel(PeerView v, DispatchArgs a, const int32_t* stats,
                                                                  bool pull, const int32_t* handle_src) {
  extern __shared__ int tokens_per_expert[];
  const int R = v.layout.num_ranks, K = v.layout.num_topk, C = v.layout.capacity, lane = threadIdx.x & 31;
  const bool meta = a.out_idx != nullptr;
  const int E_loc = meta ? a.num_experts / R : 0;
  for (int e = threadIdx.x; e < E_loc; e += blockDim.x) tokens_per_expert[e] = 0;
  __syncthreads();  // every peer's rows are in: wait_done_kernel ran before this kernel

  const int num_recv = min(max(stats[0], 0), C);
  const int lo = v.rank * E_loc;
  const int warp = blockIdx.x * kWarps + (threadIdx.x >> 5), num_warps = gridDim.x * kWarps;
  const int T_max = v.layout.max_tokens;
  for (int c = warp; c < C; c += num_warps) {
    const bool valid = c < num_recv;
    const uint8_t* src = v.local + v.layout.recv_x + static_cast<size_t>(c) * v.layout.max_row_bytes;
    const uint8_t* src_scales = v.local + v.layout.recv_scales + static_cast<size_t>(c) * v.layout.max_scale_bytes;
    bool row_valid = valid;
    if (pull) {
      int from = -1;
      if (valid) from = handle_src != nullptr ? handle_src[c] : ld_peer_written(field<int>(v.local, v.layout.recv_src) + c);
      row_valid = valid && from >= 0 && from < R * T_max;  // handle values are never trusted as addresses
      const int s = row_valid ? from / T_max : 0, t = row_valid ? from % T_max : 0;
      src = v.peers[s] + v.layout.stage_x + static_cast<size_t>(t) * v.layout.max_row_bytes;
      src_scales = v.peers[s] + v.layout.stage_scales + static_cast<size_t>(t) * v.layout.max_scale_bytes;
    }
    uint8_t* dst_scales = a.out_scales != nullptr
                              ? static_cast<uint8_t*>(a.out_scales) + static_cast<size_t>(c) * a.in.scale_bytes
                              : nullptr;
    copy_row_and_scales(src, static_cast<uint8_t*>(a.out_x) + static_cast<size_t>(c) * a.in.row_bytes, a.in.row_bytes,
                        dst_scales != nullptr ? src_scales : nullptr, dst_scales, a.in.scale_bytes, row_valid);
    if (meta) {
      if (lane < K) {
        const int id = valid ? ld_peer_written(field<int>(v.local, v.layout.recv_idx) + c * K + lane) : -1;
        const int local = (id >= lo && id < lo + E_loc) ? id - lo : -1;
        a.out_idx[c * K + lane] = local;
        a.out_w[c * K + lane] =
            local >= 0 ? ld_peer_written(field<float>(v.local, v.layout.recv_w) + c * K + lane) : 0.f;
        if (local >= 0) atomicAdd(&tokens_per_expert[local], 1);
      }
      if (lane == 0) a.recv_src[c] = valid ? ld_peer_written(field<int>(v.local, v.layout.recv_src) + c) : -1;
    }
  }
  if (!meta) return;
  __syncthreads();
  for (int e = threadIdx.x; e < E_loc; e += blockDim.x) {
    if (tokens_per_expert[e]) atomicAdd(&a.out_tokens_per_expert[e], tokens_per_expert[e]);
  }
  // The last block rounds the per-expert counts up to the alignment.
  __threadfence();
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0) {
    unsigned* counter = field<unsigned>(v.local, v.layout.block_counter) + 1;
    last = atomicAdd(counter, 1u) == gridDim.x - 1;
    if (last) *counter = 0;
  }
  __syncthreads();
  if (last && a.expert_alignment > 1) {
    __threadfence();
    for (int e = threadIdx.x; e < E_loc; e += blockDim.x) {
      const int n = atomicAdd(&a.out_tokens_per_expert[e], 0);
      a.out_tokens_per_expert[e] = (n + a.expert_alignment - 1) / a.expert_alignment * a.expert_alignment;
    }
  }
}

// -- combine ----------------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) combine_send_kernel(PeerView v, CombineArgs a, int row_bytes) {
  const uint64_t epoch = read_epoch(v);
  const int num_recv = min(max(a.stats[0], 0), v.layout.capacity);
  const int warp = blockIdx.x * kWarps + (threadIdx.x >> 5), num_warps = gridDim.x * kWarps;
  const bool vec16 = (row_bytes % 16) == 0;
  const int T_max = v.layout.max_tokens, me = v.rank;
  for (int c = warp; c < num_recv; c += num_warps) {
    // Slot c's answer goes into this rank's own combine stage (local stores); its source pulls it from there.
    // This rank's own tokens are read from y by combine_recv: staging them would cost a write and a read.
    // (recv_src comes from a handle: a wrong value only makes this rank skip or stage a row, never an address.)
    const int from = a.recv_src[c];
    if (from >= me * T_max && from < (me + 1) * T_max) continue;
    const uint8_t* in = static_cast<const uint8_t*>(a.y) + static_cast<size_t>(c) * row_bytes;
    uint8_t* out = v.local + v.layout.stage_comb + static_cast<size_t>(c) * v.layout.max_row_bytes;
    if (vec16) {
      copy_or_zero<int4>(in, out, row_bytes, true);
    } else {
      copy_or_zero<int>(in, out, row_bytes, true);
    }
  }
  signal_done_when_last_block(v, epoch);
}

// Token t's answers are pulled from the combine stage of every rank it was sent to, at the slot dispatch gave
// it there (the handle's send_slot).
__global__ void __launch_bounds__(kThreads) combine_recv_kernel(PeerView v, CombineArgs a) {
  __shared__ const uint8_t* answer[kWarps][kMaxPeers];  // this warp's token: its row at rank r
  const int R = v.layout.num_ranks, lane = threadIdx.x & 31, C = v.layout.capacity;
  // Every peer's rows are in: wait_done_kernel ran before this kernel.
  const int elem_bytes = a.y_is_bf16 ? 2 : 4;
  const int row_bytes = a.row_elems * elem_bytes;
  const bool vec16 = (row_bytes % 16) == 0;
  const int warp = blockIdx.x * kWarps + (threadIdx.x >> 5), num_warps = gridDim.x * kWarps;
  const uint8_t* const* rows = answer[threadIdx.x >> 5];
  const int me = v.rank;
  for (int t = warp; t < a.num_tokens; t += num_warps) {
    // Slots come from a handle (a user-visible pytree): anything outside [0, C) is not an address.
    const int slot_lo = lane < R ? a.send_slot[t * R + lane] : -1;
    const int slot_hi = lane + 32 < R ? a.send_slot[t * R + lane + 32] : -1;
    const bool lo = slot_lo >= 0 && slot_lo < C, hi = slot_hi >= 0 && slot_hi < C;
    __syncwarp();  // the previous token's row pointers are no longer read
    const size_t stride = v.layout.max_row_bytes;
    // Peers' answers from their combine stage; this rank's own straight from y (combine_send did not stage them).
    const uint8_t* y = static_cast<const uint8_t*>(a.y);
    if (lo) {
      answer[threadIdx.x >> 5][lane] = lane == me ? y + static_cast<size_t>(slot_lo) * row_bytes
                                                  : v.peers[lane] + v.layout.stage_comb + slot_lo * stride;
    }
    if (hi) {
      answer[threadIdx.x >> 5][lane + 32] = lane + 32 == me ? y + static_cast<size_t>(slot_hi) * row_bytes
                                                            : v.peers[lane + 32] + v.layout.stage_comb + slot_hi * stride;
    }
    __syncwarp();  // the row pointers are visible to every lane
    const uint64_t mask = static_cast<uint64_t>(__ballot_sync(kFullMask, lo)) |
                          (static_cast<uint64_t>(__ballot_sync(kFullMask, hi)) << 32);
    float* out = static_cast<float*>(a.out) + static_cast<size_t>(t) * a.row_elems;
    __nv_bfloat16* out16 = static_cast<__nv_bfloat16*>(a.out) + static_cast<size_t>(t) * a.row_elems;
    if (vec16) {
      const int per_vec = 16 / elem_bytes;  // 8 bf16 or 4 f32
      for (int j = lane; j < row_bytes / 16; j += 32) {
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        // Ascending rank (the reference backend's f32 order); 4 ranks' loads in flight at a time.
        for (int r0 = 0; r0 < R; r0 += 4) {
          int4 raw[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int r = r0 + u;
            raw[u] = (r < R && ((mask >> r) & 1))
                         ? ld_peer_written(reinterpret_cast<const int4*>(rows[r]) + j)
                         : int4{0, 0, 0, 0};
          }
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int r = r0 + u;
            if (r < R && ((mask >> r) & 1)) {
              if (a.y_is_bf16) {
                add_bf16x8(acc, raw[u]);
              } else {
                const float* f = reinterpret_cast<const float*>(&raw[u]);
                acc[0] += f[0], acc[1] += f[1], acc[2] += f[2], acc[3] += f[3];
              }
            }
          }
        }
        if (a.out_is_bf16) {
          __nv_bfloat162 h[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
          if (a.y_is_bf16) {
            *reinterpret_cast<int4*>(out16 + j * per_vec) = *reinterpret_cast<const int4*>(h);
          } else {
            *reinterpret_cast<uint2*>(out16 + j * per_vec) = *reinterpret_cast<const uint2*>(h);
          }
        } else {
          float4* o = reinterpret_cast<float4*>(out + j * per_vec);
          o[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
          if (a.y_is_bf16) o[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
        }
      }
    } else {
      for (int i = lane; i < a.row_elems; i += 32) {
        float acc = 0.f;
        uint64_t m = mask;
        while (m) {
          const int r = __ffsll(static_cast<long long>(m)) - 1;
          m &= m - 1;
          const uint8_t* row = rows[r];
          acc += a.y_is_bf16 ? __bfloat162float(ld_peer_written(reinterpret_cast<const __nv_bfloat16*>(row) + i))
                             : ld_peer_written(reinterpret_cast<const float*>(row) + i);
        }
        if (a.out_is_bf16) {
          out16[i] = __float2bfloat16_rn(acc);
        } else {
          out[i] = acc;
        }
      }
    }
  }
}

int grid_for(int num_blocks, int work_warps) {
  const int needed = (work_warps + kWarps - 1) / kWarps;
  return num_blocks < 1 ? 1 : (needed < num_blocks ? (needed < 1 ? 1 : needed) : num_blocks);
}

}  // namespace

const char* wait_phase_name(int phase) {
  switch (phase) {
    case kPhaseDispatchNotify: return "dispatch (count exchange)";
    case kPhaseDispatchRecv: return "dispatch (receive)";
    case kPhaseCachedEnter: return "cached dispatch (enter barrier)";
    case kPhaseCombineEnter: return "combine (enter barrier)";
    case kPhaseCombineRecv: return "combine (receive)";
    case kPhaseClosed: return "an op on a closed buffer";
    case kPhaseLowLatencyDispatchSend: return "low-latency dispatch send (receiver's staging area still in use)";
    case kPhaseLowLatencyDispatchRecv: return "low-latency dispatch receive";
    case kPhaseLowLatencyCombineSend: return "low-latency combine send (receiver's staging area still in use)";
    case kPhaseLowLatencyCombineRecv: return "low-latency combine receive";
    case kPhaseInternodeCounts: return "internode dispatch (count exchange, sender side)";
    case kPhaseInternodeForward: return "internode dispatch (forwarder waiting for a source node's rows)";
    case kPhaseInternodeReceive: return "internode dispatch (receiver waiting for its node's ranks)";
    case kPhaseInternodeEnter: return "internode combine / cached dispatch (enter barrier)";
    case kPhaseInternodeReduce: return "internode combine (forwarder waiting for its node's rows)";
    case kPhaseInternodeCombine: return "internode combine (receiver waiting for another node's partial sums)";
    case kPhaseLowLatencyTooMany:
      return "a low-latency send while two results of the same kind were still pending (call *_recv before a "
             "third *_send)";
    case kPhaseLowLatencyOutOfOrder:
      return "a low-latency receive before an earlier pending result of the same kind was received (receive "
             "results in the order they were sent)";
    default: return "unknown phase";
  }
}

IntranodeLayout make_intranode_layout(int num_ranks, int capacity, int max_tokens, int num_topk, int max_row_bytes,
                                      int max_scale_bytes, int num_nodes) {
  IntranodeLayout l;
  l.num_ranks = num_ranks;
  l.capacity = capacity;
  l.max_tokens = max_tokens;
  l.num_topk = num_topk;
  l.max_row_bytes = (max_row_bytes + 15) / 16 * 16;
  l.max_scale_bytes = (max_scale_bytes + 15) / 16 * 16;
  size_t off = 0;
  auto take = [&off](size_t bytes) {
    const size_t at = off;
    off = (off + bytes + 255) / 256 * 256;  // every area 256-byte aligned
    return at;
  };
  const size_t R = num_ranks, C = capacity, T = max_tokens, K = num_topk;
  l.num_nodes = num_nodes < 1 ? 1 : num_nodes;
  l.node_size = num_ranks / l.num_nodes;
  // Intranode dispatch pulls from the senders' stages (T_max rows each); internode pushes into C staging rows.
  const size_t staged_rows = l.num_nodes > 1 ? C : 0, stage_rows = l.num_nodes > 1 ? 0 : T;
  l.epoch = take(8);
  l.block_counter = take(8);
  l.enter_flags = take(8 * R);
  l.done_flags = take(8 * R);
  l.counts = take(4 * 2 * R * R);
  l.recv_x = take(staged_rows * l.max_row_bytes);
  l.recv_scales = take(staged_rows * l.max_scale_bytes);
  l.recv_idx = take(4 * C * K);
  l.recv_w = take(4 * C * K);
  l.recv_src = take(4 * C);
  l.comb = take(staged_rows > 0 ? R * T * l.max_row_bytes : 0);  // internode: answers pushed back to sources
  l.stage_x = take(stage_rows * l.max_row_bytes);
  l.stage_scales = take(stage_rows * l.max_scale_bytes);
  l.stage_comb = take(staged_rows > 0 ? 0 : C * l.max_row_bytes);  // intranode: answers kept for the sources
  if (l.num_nodes > 1) {
    const size_t M = l.num_nodes, N = l.node_size;
    l.net_meta_bytes = (16 + 4 * static_cast<int>(N) + 8 * num_topk + 15) / 16 * 16;
    l.net_row_stride = l.net_meta_bytes + l.max_row_bytes + l.max_scale_bytes;
    l.node_counts = take(4 * M);
    l.net_signal = take(8 * M);
    l.comb_signal = take(8 * M);
    l.recv_fwd = take(4 * C);
    l.net_send = take(M * T * l.net_row_stride);
    l.net_recv = take(M * T * l.net_row_stride);
    l.reduce = take(M * T * N * l.max_row_bytes);
    l.comb_send = take(M * T * l.max_row_bytes);
    l.comb_recv = take(M * T * l.max_row_bytes);
  }
  l.total = off;
  return l;
}

cudaError_t launch_dispatch(const PeerView& view, const DispatchArgs& args, int num_blocks, cudaStream_t stream) {
  notify_dispatch_kernel<<<1, kNotifyThreads, 0, stream>>>(view, args);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  dispatch_send_kernel<<<grid_for(num_blocks, args.num_tokens), kThreads, 0, stream>>>(
      view, args.in, args.topk_idx, args.topk_weights, args.send_slot, args.num_tokens, args.num_experts);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  const int E_loc = args.num_experts / view.layout.num_ranks;
  wait_done_kernel<<<1, kMaxPeers, 0, stream>>>(view, 0, view.layout.num_ranks, kPhaseDispatchRecv);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  dispatch_recv_kernel<<<grid_for(num_blocks, view.layout.capacity), kThreads, E_loc * sizeof(int), stream>>>(
      view, args, args.out_stats, /*pull=*/true, nullptr);
  return cudaGetLastError();
}

cudaError_t launch_wait_done(const PeerView& view, int first_rank, int num_ranks, int phase, cudaStream_t stream) {
  wait_done_kernel<<<1, kMaxPeers, 0, stream>>>(view, first_rank, num_ranks, phase);
  return cudaGetLastError();
}

cudaError_t launch_dispatch_receive(const PeerView& view, const DispatchArgs& args, const int32_t* stats,
                                    int num_blocks, cudaStream_t stream) {
  const bool meta = args.out_idx != nullptr;
  const size_t smem = meta ? (args.num_experts / view.layout.num_ranks) * sizeof(int) : 0;
  dispatch_recv_kernel<<<grid_for(num_blocks, view.layout.capacity), kThreads, smem, stream>>>(
      view, args, stats, /*pull=*/false, nullptr);
  return cudaGetLastError();
}

cudaError_t launch_cached_dispatch(const PeerView& view, const CachedDispatchArgs& args, int num_blocks,
                                   cudaStream_t stream) {
  enter_barrier_kernel<<<1, kMaxPeers, 0, stream>>>(view, kPhaseCachedEnter);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  dispatch_send_kernel<<<grid_for(num_blocks, args.num_tokens), kThreads, 0, stream>>>(
      view, args.in, nullptr, nullptr, args.send_slot, args.num_tokens, 0);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  DispatchArgs recv;
  recv.in = args.in;
  recv.in.scales = nullptr;
  recv.out_x = args.out_x;
  wait_done_kernel<<<1, kMaxPeers, 0, stream>>>(view, 0, view.layout.num_ranks, kPhaseDispatchRecv);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  dispatch_recv_kernel<<<grid_for(num_blocks, view.layout.capacity), kThreads, 0, stream>>>(
      view, recv, args.stats, /*pull=*/true, args.recv_src);
  return cudaGetLastError();
}

cudaError_t launch_combine(const PeerView& view, const CombineArgs& args, int num_blocks, cudaStream_t stream) {
  enter_barrier_kernel<<<1, kMaxPeers, 0, stream>>>(view, kPhaseCombineEnter);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  const int row_bytes = args.row_elems * (args.y_is_bf16 ? 2 : 4);
  combine_send_kernel<<<grid_for(num_blocks, view.layout.capacity), kThreads, 0, stream>>>(view, args, row_bytes);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  wait_done_kernel<<<1, kMaxPeers, 0, stream>>>(view, 0, view.layout.num_ranks, kPhaseCombineRecv);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  combine_recv_kernel<<<grid_for(num_blocks, args.num_tokens), kThreads, 0, stream>>>(view, args);
  return cudaGetLastError();
}

}  // namespace jax_ep
