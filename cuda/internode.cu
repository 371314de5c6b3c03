// Internode normal-mode kernels (design: docs/internode.md; host API: internode.cuh).
//
// Dispatch, per op:  notify (count exchange by put-with-signal, slots, per-node streams)
//                 -> send (same-node rows stored directly; each other node's rows copied once into
//                    net_send and put to the rail peer = the rank with my local index there)
//                 -> forward (rows from each other node copied to the final ranks of my node)
//                 -> wait for my node's ranks, then the intranode receive copy.
// Combine:         enter barrier -> rows back (same-node sources directly; others into the forwarder's
//                  reduce area) -> forwarder sums per token and puts one partial row per node
//                  -> each source adds its node's rows and the partial sums, ascending node.
// Ranks of other nodes are touched only through NVSHMEM (puts, put-with-signal, signal ops); every wait
// is bounded and names the rank and the stage.

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/internode.cuh"
#include "cuda/row_copy.cuh"
#include "cuda/sync.cuh"

namespace jax_ep {
namespace {

using rows::add_bf16x8;
using rows::block_exclusive_scan;
using rows::count_tokens_per_rank;
using rows::store_token_meta;
using rows::copy_or_zero;
using rows::send_row;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kNotifyThreads = 1024;
constexpr unsigned kFullMask = 0xffffffffu;

struct Node {  // where this rank sits
  int size, count, index, local, base;
};

__device__ __forceinline__ Node node_of(const PeerView& v) {
  const int n = v.layout.node_size;
  return Node{n, v.layout.num_nodes, v.rank / n, v.rank % n, (v.rank / n) * n};
}

__device__ __forceinline__ uint64_t* epoch_ptr(const PeerView& v) { return field<uint64_t>(v.local, v.layout.epoch); }
__device__ __forceinline__ uint64_t read_epoch(const PeerView& v) { return ld_peer_written(epoch_ptr(v)); }

// The rail peer of `me` in node m: same local index.
__device__ __forceinline__ int rail_pe(const PeerView& v, const Node& nd, int m) { return v.pes[m * nd.size + nd.local]; }

__device__ __forceinline__ uint8_t* net_row(const PeerView& v, size_t area, int node, int row) {
  return v.local + area + (static_cast<size_t>(node) * v.layout.max_tokens + row) * v.layout.net_row_stride;
}

// Every rank of the mesh has entered this op (epoch): a signal to each rank, then wait for all of theirs.
// Ranks enter an op only after finishing the previous one, so after this nobody still reads what this op
// will overwrite. One block.
__device__ void enter_all(const PeerView& v, uint64_t epoch, int phase) {
  const int R = v.layout.num_ranks;
  uint64_t* flags = field<uint64_t>(v.local, v.layout.enter_flags);
  for (int s = threadIdx.x; s < R; s += blockDim.x) {
    if (s == v.rank) {
      st_release_sys(flags + v.rank, epoch);
    } else {
      nvshmemx_signal_op(flags + v.rank, epoch, NVSHMEM_SIGNAL_SET, v.pes[s]);
    }
  }
  __syncthreads();
  if (threadIdx.x < R) wait_flag_geq(v, flags + threadIdx.x, epoch, threadIdx.x, phase);
  __syncthreads();
}

// Done flags to the ranks of my node once every block has finished (the last block signals).
__device__ void node_done_when_last_block(const PeerView& v, uint64_t epoch, int counter_index) {
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned* counter = field<unsigned>(v.local, v.layout.block_counter) + counter_index;
    if (atomicAdd(counter, 1u) == gridDim.x - 1) {
      *counter = 0;
      __threadfence_system();
      const Node nd = node_of(v);
      for (int l = 0; l < nd.size; ++l) {
        st_release_sys(field<uint64_t>(v.peers[nd.base + l], v.layout.done_flags) + v.rank, epoch);
      }
    }
  }
}

// True in the whole block that finishes last (its peers' work and puts are complete: each block quiets
// its puts before counting).
__device__ bool last_block(const PeerView& v, int counter_index) {
  __shared__ bool s_last;
  __threadfence_system();  // this block's direct stores (P2P puts are stores by its own threads)
  __syncthreads();
  if (threadIdx.x == 0) {
    nvshmem_quiet();  // completes every put this PE posted (one quiet per block: with IBGDA it sweeps every QP)
    unsigned* counter = field<unsigned>(v.local, v.layout.block_counter) + counter_index;
    s_last = atomicAdd(counter, 1u) == gridDim.x - 1;
    if (s_last) {
      *counter = 0;
      __threadfence_system();  // the signals that follow are ordered after every block's data
    }
  }
  __syncthreads();
  return s_last;
}

// -- dispatch: notify ------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kNotifyThreads, 1) notify_kernel(PeerView v, DispatchArgs a, InternodeHandle h) {
  const int R = v.layout.num_ranks, K = v.layout.num_topk, T = a.num_tokens, me = v.rank;
  const int C = v.layout.capacity, E = a.num_experts, E_loc = E / R;
  const Node nd = node_of(v);
  const int M = nd.count;
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

  int t0, t1;
  count_tokens_per_rank<kNotifyThreads>(a, R, K, row, &invalid, warp_sums, &t0, &t1);

  // My row of the count matrix, to every rank: written locally, then put (with the enter signal) from the
  // same symmetric address. The signal doubles as the entry barrier (see enter_all).
  const int parity = static_cast<int>(epoch & 1);
  int* counts = field<int>(v.local, v.layout.counts) + parity * R * R;
  if (tid < R) counts[me * R + tid] = row[tid];
  __threadfence_system();
  __syncthreads();
  // These puts are completed by the quiet of this op's send kernel (every op quiets before its last signal):
  // without it, op n's SET could land after op n + 1's and move the flag backwards.
  uint64_t* enter = field<uint64_t>(v.local, v.layout.enter_flags);
  for (int s = 0; s < R; ++s) {
    if (s == me) continue;
    nvshmemx_putmem_signal_nbi_block(counts + me * R, counts + me * R, R * sizeof(int), enter + me, epoch,
                                     NVSHMEM_SIGNAL_SET, v.pes[s]);
  }
  if (tid == 0) st_release_sys(enter + me, epoch);
  __syncthreads();
  if (tid < R) wait_flag_geq(v, enter + tid, epoch, tid, kPhaseInternodeCounts);
  __syncthreads();

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
  __syncthreads();

  // Per other node: the token's row in my stream to it (tokens with at least one surviving slot there).
  int* node_counts = field<int>(v.local, v.layout.node_counts);
  for (int m = 0; m < M; ++m) {
    int count = 0;
    if (m != nd.index) {
      for (int t = t0; t < t1; ++t) {
        bool any = false;
        for (int l = 0; l < nd.size; ++l) any |= a.send_slot[t * R + m * nd.size + l] >= 0;
        count += any;
      }
    }
    int pos;
    const int total = block_exclusive_scan<kNotifyThreads>(count, &pos, warp_sums);
    for (int t = t0; t < t1; ++t) {
      bool any = false;
      if (m != nd.index) {
        for (int l = 0; l < nd.size; ++l) any |= a.send_slot[t * R + m * nd.size + l] >= 0;
      }
      h.node_slot[t * M + m] = any ? pos++ : -1;
    }
    if (tid == 0) node_counts[m] = total;
  }
}

// -- dispatch: send ---------------------------------------------------------------------------------------

// One warp per token. meta: ids / weights / source travel with the row (dispatch) or not (cached dispatch).
__global__ void __launch_bounds__(kThreads) send_kernel(PeerView v, Rows in, const int32_t* topk_idx,
                                                        const float* topk_weights, const int32_t* send_slot,
                                                        const int32_t* node_slot, int num_tokens, int num_experts) {
  const int R = v.layout.num_ranks, K = v.layout.num_topk, C = v.layout.capacity, lane = threadIdx.x & 31;
  const Node nd = node_of(v);
  const int M = nd.count, T_max = v.layout.max_tokens;
  const uint64_t epoch = read_epoch(v);
  const int warp = blockIdx.x * kWarps + (threadIdx.x >> 5), num_warps = gridDim.x * kWarps;
  const bool vec16 = (in.row_bytes % 16) == 0;
  const uint64_t node_bits = (nd.size == 64 ? ~0ull : ((1ull << nd.size) - 1)) << nd.base;
  for (int t = warp; t < num_tokens; t += num_warps) {
    int slot_lo = lane < R ? send_slot[t * R + lane] : -1;
    int slot_hi = lane + 32 < R ? send_slot[t * R + lane + 32] : -1;
    if (slot_lo >= C) slot_lo = -1;
    if (slot_hi >= C) slot_hi = -1;
    const uint64_t all = static_cast<uint64_t>(__ballot_sync(kFullMask, slot_lo >= 0)) |
                         (static_cast<uint64_t>(__ballot_sync(kFullMask, slot_hi >= 0)) << 32);
    const uint64_t direct = all & node_bits;
    const uint8_t* x = static_cast<const uint8_t*>(in.x) + static_cast<size_t>(t) * in.row_bytes;
    const uint8_t* s = in.scales ? static_cast<const uint8_t*>(in.scales) + static_cast<size_t>(t) * in.scale_bytes
                                 : nullptr;
    int id = -1;
    float w = 0.f;
    if (topk_idx != nullptr && lane < K) {
      id = topk_idx[t * K + lane];
      if (id < 0 || id >= num_experts) id = -1;
      w = topk_weights[t * K + lane];
    }
    if (direct) {  // my node: straight into the final staging slots, as in intranode mode
      if (vec16) {
        send_row<int4>(x, in.row_bytes, v, v.layout.recv_x, v.layout.max_row_bytes, slot_lo, slot_hi, direct);
      } else {
        send_row<int>(x, in.row_bytes, v, v.layout.recv_x, v.layout.max_row_bytes, slot_lo, slot_hi, direct);
      }
      if (s) send_row<int>(s, in.scale_bytes, v, v.layout.recv_scales, v.layout.max_scale_bytes, slot_lo, slot_hi, direct);
      if (topk_idx != nullptr) {
        store_token_meta(v, direct, slot_lo, slot_hi, K, id, w, v.rank * T_max + t, v.layout.recv_fwd, -1);
      }
    }
    for (int m = 0; m < M; ++m) {  // other nodes: one network row each, to the rail peer
      if (m == nd.index) continue;
      const int j = node_slot[t * M + m];
      if (j < 0 || j >= T_max) continue;
      uint8_t* row = net_row(v, v.layout.net_send, m, j);
      if (lane == 0) *reinterpret_cast<int4*>(row) = make_int4(t, 0, 0, 0);
      if (lane < nd.size) {
        const int slot = send_slot[t * R + m * nd.size + lane];
        reinterpret_cast<int*>(row + 16)[lane] = slot < C ? slot : -1;
      }
      if (lane < K) {
        reinterpret_cast<int*>(row + 16 + 4 * nd.size)[lane] = id;
        reinterpret_cast<float*>(row + 16 + 4 * nd.size + 4 * K)[lane] = w;
      }
      uint8_t* payload = row + v.layout.net_meta_bytes;
      if (vec16) {
        copy_or_zero<int4>(x, payload, in.row_bytes, true);
      } else {
        copy_or_zero<int>(x, payload, in.row_bytes, true);
      }
      if (s) copy_or_zero<int>(s, payload + v.layout.max_row_bytes, in.scale_bytes, true);
      __syncwarp();
      __threadfence();  // the put reads what the warp just wrote
      uint8_t* dst = net_row(v, v.layout.net_recv, nd.index, j);
      nvshmemx_putmem_nbi_warp(dst, row, v.layout.net_meta_bytes + in.row_bytes, rail_pe(v, nd, m));
      if (s) {
        nvshmemx_putmem_nbi_warp(dst + v.layout.net_meta_bytes + v.layout.max_row_bytes,
                                 row + v.layout.net_meta_bytes + v.layout.max_row_bytes, in.scale_bytes,
                                 rail_pe(v, nd, m));
      }
    }
  }
  if (last_block(v, 0)) {
    // Rows of every block are delivered (each quieted its puts): tell each rail peer how many arrive.
    const int* node_counts = field<int>(v.local, v.layout.node_counts);
    for (int m = threadIdx.x; m < M; m += blockDim.x) {
      if (m == nd.index) continue;
      const uint64_t value = (epoch << 32) | static_cast<uint32_t>(node_counts[m]);
      nvshmemx_signal_op(field<uint64_t>(v.local, v.layout.net_signal) + nd.index, value, NVSHMEM_SIGNAL_SET,
                         rail_pe(v, nd, m));
    }
  }
}

// -- waits on other nodes ----------------------------------------------------------------------------------

// One block waits for every other node's signal (flags[m] >= epoch << shift) before the next kernel is
// launched: no grid ever spins, so ranks sharing a GPU may each use every SM (JAX_EP_MPS_SM_PERCENT=100).
__global__ void wait_nodes_kernel(PeerView v, size_t flags_offset, int shift, int phase) {
  const Node nd = node_of(v);
  const uint64_t epoch = read_epoch(v);
  const uint64_t* flags = field<uint64_t>(v.local, flags_offset);
  for (int m = threadIdx.x; m < nd.count; m += blockDim.x) {
    if (m != nd.index) wait_flag_geq(v, flags + m, epoch << shift, m * nd.size + nd.local, phase);
  }
}

// -- dispatch: forward ------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) forward_kernel(PeerView v, int row_bytes, int scale_bytes, bool meta,
                                                           InternodeHandle h) {
  const int R = v.layout.num_ranks, K = v.layout.num_topk, C = v.layout.capacity, T_max = v.layout.max_tokens;
  const int lane = threadIdx.x & 31;
  const Node nd = node_of(v);
  const int M = nd.count;
  const uint64_t epoch = read_epoch(v);
  __shared__ int rows_from[kMaxPeers];
  const uint64_t* signal = field<uint64_t>(v.local, v.layout.net_signal);
  for (int m = threadIdx.x; m < M; m += blockDim.x) {  // every signal is in: wait_nodes_kernel ran first
    const int rows = m == nd.index ? 0 : static_cast<int>(ld_acquire_sys(signal + m) & 0xffffffffull);
    rows_from[m] = min(rows, T_max);
  }
  __syncthreads();
  if (meta && h.fwd_src != nullptr) {  // the forwarder's half of the handle, every entry written
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < M * T_max; i += gridDim.x * blockDim.x) {
      if (i % T_max >= rows_from[i / T_max]) {
        h.fwd_src[i] = -1;
        h.fwd_mask[i] = 0;
      }
    }
  }
  const bool vec16 = (row_bytes % 16) == 0;
  const int warp = blockIdx.x * kWarps + (threadIdx.x >> 5), num_warps = gridDim.x * kWarps;
  for (int item = warp; item < M * T_max; item += num_warps) {
    const int m = item / T_max, j = item % T_max;
    if (j >= rows_from[m]) continue;
    const uint8_t* row = net_row(v, v.layout.net_recv, m, j);
    const int t = ld_peer_written(reinterpret_cast<const int*>(row));
    // Lane r (and r + 32) holds the slot at global rank r: read by local index, moved by shuffles.
    int local_slot = lane < nd.size ? ld_peer_written(reinterpret_cast<const int*>(row + 16) + lane) : -1;
    if (local_slot >= C) local_slot = -1;
    const int from_lo = lane - nd.base, from_hi = lane + 32 - nd.base;
    const int lo = __shfl_sync(kFullMask, local_slot, from_lo & 31);
    const int hi = __shfl_sync(kFullMask, local_slot, from_hi & 31);
    const int slot_lo = (from_lo >= 0 && from_lo < nd.size) ? lo : -1;
    const int slot_hi = (from_hi >= 0 && from_hi < nd.size) ? hi : -1;
    const uint64_t dests = static_cast<uint64_t>(__ballot_sync(kFullMask, slot_lo >= 0)) |
                           (static_cast<uint64_t>(__ballot_sync(kFullMask, slot_hi >= 0)) << 32);
    const uint8_t* payload = row + v.layout.net_meta_bytes;
    if (dests) {
      if (vec16) {
        send_row<int4>(payload, row_bytes, v, v.layout.recv_x, v.layout.max_row_bytes, slot_lo, slot_hi, dests);
      } else {
        send_row<int>(payload, row_bytes, v, v.layout.recv_x, v.layout.max_row_bytes, slot_lo, slot_hi, dests);
      }
      if (scale_bytes) {
        send_row<int>(payload + v.layout.max_row_bytes, scale_bytes, v, v.layout.recv_scales,
                      v.layout.max_scale_bytes, slot_lo, slot_hi, dests);
      }
    }
    if (!meta) continue;
    const int id = lane < K ? ld_peer_written(reinterpret_cast<const int*>(row + 16 + 4 * nd.size) + lane) : -1;
    const float w = lane < K ? ld_peer_written(reinterpret_cast<const float*>(row + 16 + 4 * nd.size + 4 * K) + lane)
                             : 0.f;
    store_token_meta(v, dests, slot_lo, slot_hi, K, id, w, (m * nd.size + nd.local) * T_max + t, v.layout.recv_fwd,
                     m * T_max + j);
    if (lane == 0 && h.fwd_src != nullptr) {
      h.fwd_src[m * T_max + j] = t;
      h.fwd_mask[m * T_max + j] = static_cast<int>((dests >> nd.base) & ((1ull << nd.size) - 1));  // size <= 31
    }
  }
  node_done_when_last_block(v, epoch, 0);
  (void)R;
}

// recv_fwd of the received rows, padding -1 (the receive copy writes the other handle fields).
__global__ void copy_recv_fwd_kernel(PeerView v, const int32_t* stats, int32_t* out) {
  const int C = v.layout.capacity, num_recv = min(max(stats[0], 0), C);
  const int* staged = field<int>(v.local, v.layout.recv_fwd);
  for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += gridDim.x * blockDim.x) {
    out[c] = c < num_recv ? ld_peer_written(staged + c) : -1;
  }
}

// Entry barrier of cached dispatch and combine; cached dispatch also recounts its per-node streams.
__global__ void __launch_bounds__(kNotifyThreads, 1) enter_kernel(PeerView v, const int32_t* node_slot, int num_tokens,
                                                                   int phase) {
  __shared__ uint64_t s_epoch;
  trap_if_closed(v);
  const Node nd = node_of(v);
  if (threadIdx.x == 0) {
    s_epoch = read_epoch(v) + 1;
    *epoch_ptr(v) = s_epoch;
  }
  if (node_slot != nullptr) {  // rows per node = 1 + the largest row index (rows are dense per node)
    int* node_counts = field<int>(v.local, v.layout.node_counts);
    if (threadIdx.x < nd.count) node_counts[threadIdx.x] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < num_tokens * nd.count; i += blockDim.x) {
      const int j = node_slot[i];
      if (j >= 0 && j < v.layout.max_tokens) atomicMax(&node_counts[i % nd.count], j + 1);
    }
  }
  __syncthreads();
  enter_all(v, s_epoch, phase);
}

// -- combine ----------------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) combine_send_kernel(PeerView v, CombineArgs a, InternodeHandleView h,
                                                                int row_bytes) {
  const uint64_t epoch = read_epoch(v);
  const Node nd = node_of(v);
  const int num_recv = min(max(a.stats[0], 0), v.layout.capacity), T_max = v.layout.max_tokens;
  const int R = v.layout.num_ranks;
  const int warp = blockIdx.x * kWarps + (threadIdx.x >> 5), num_warps = gridDim.x * kWarps;
  const bool vec16 = (row_bytes % 16) == 0;
  for (int c = warp; c < num_recv; c += num_warps) {
    const int src = a.recv_src[c];
    if (src < 0 || src >= R * T_max) continue;  // handle values are never trusted as addresses
    const int s = src / T_max, t = src % T_max;
    const uint8_t* in = static_cast<const uint8_t*>(a.y) + static_cast<size_t>(c) * row_bytes;
    uint8_t* out;
    if (s / nd.size == nd.index) {
      out = v.peers[s] + v.layout.comb + (static_cast<size_t>(v.rank) * T_max + t) * v.layout.max_row_bytes;
    } else {
      const int fwd = h.recv_fwd[c];
      if (fwd < 0 || fwd >= nd.count * T_max) continue;
      const int forwarder = nd.base + s % nd.size;
      out = v.peers[forwarder] + v.layout.reduce +
            (static_cast<size_t>(fwd) * nd.size + nd.local) * v.layout.max_row_bytes;
    }
    if (vec16) {
      copy_or_zero<int4>(in, out, row_bytes, true);
    } else {
      copy_or_zero<int>(in, out, row_bytes, true);
    }
  }
  node_done_when_last_block(v, epoch, 0);
}

// The forwarder: per row it forwarded, sum what its node's ranks returned (f32, ascending local rank), and
// put the sum (in y's dtype) to the source's comb_recv[my node][token]. A bf16 partial is rounded once more
// than the flat sum (DeepEP sends bf16 too); f32 partials would fit the rows but double the network bytes.
__global__ void __launch_bounds__(kThreads) reduce_kernel(PeerView v, InternodeHandleView h, bool y_is_bf16,
                                                          int row_elems) {
  const uint64_t epoch = read_epoch(v);
  const Node nd = node_of(v);
  const int M = nd.count, T_max = v.layout.max_tokens, lane = threadIdx.x & 31;
  const int row_bytes = row_elems * (y_is_bf16 ? 2 : 4);
  const int warp = blockIdx.x * kWarps + (threadIdx.x >> 5), num_warps = gridDim.x * kWarps;
  for (int item = warp; item < M * T_max; item += num_warps) {
    const int m = item / T_max;
    if (m == nd.index) continue;
    const int t = h.fwd_src[item];
    const int mask = h.fwd_mask[item];
    if (t < 0 || t >= T_max) continue;
    const uint8_t* rows = v.local + v.layout.reduce + static_cast<size_t>(item) * nd.size * v.layout.max_row_bytes;
    uint8_t* sum = v.local + v.layout.comb_send + static_cast<size_t>(item) * v.layout.max_row_bytes;
    if (y_is_bf16 && row_bytes % 16 == 0) {
      for (int j = lane; j < row_bytes / 16; j += 32) {
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int l = 0; l < nd.size; ++l) {
          if ((mask >> l) & 1) {
            add_bf16x8(acc, ld_peer_written(reinterpret_cast<const int4*>(rows + static_cast<size_t>(l) *
                                                                                  v.layout.max_row_bytes) + j));
          }
        }
        __nv_bfloat162 p[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) p[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
        reinterpret_cast<int4*>(sum)[j] = *reinterpret_cast<const int4*>(p);
      }
    } else {
      for (int j = lane; j < row_elems; j += 32) {
        float acc = 0.f;
        for (int l = 0; l < nd.size; ++l) {
          if (!((mask >> l) & 1)) continue;
          const uint8_t* r = rows + static_cast<size_t>(l) * v.layout.max_row_bytes;
          acc += y_is_bf16 ? __bfloat162float(ld_peer_written(reinterpret_cast<const __nv_bfloat16*>(r) + j))
                           : ld_peer_written(reinterpret_cast<const float*>(r) + j);
        }
        if (y_is_bf16) {
          reinterpret_cast<__nv_bfloat16*>(sum)[j] = __float2bfloat16_rn(acc);
        } else {
          reinterpret_cast<float*>(sum)[j] = acc;
        }
      }
    }
    __syncwarp();
    __threadfence();
    nvshmemx_putmem_nbi_warp(v.local + v.layout.comb_recv + (static_cast<size_t>(nd.index) * T_max + t) * v.layout.max_row_bytes,
                             sum, row_bytes, rail_pe(v, nd, m));
  }
  if (last_block(v, 1)) {
    for (int m = threadIdx.x; m < M; m += blockDim.x) {
      if (m == nd.index) continue;
      nvshmemx_signal_op(field<uint64_t>(v.local, v.layout.comb_signal) + nd.index, epoch, NVSHMEM_SIGNAL_SET,
                         rail_pe(v, nd, m));
    }
  }
}

// The source: for each token, ascending node: my node's rows one by one (ascending rank), other nodes'
// partial sums.
__global__ void __launch_bounds__(kThreads) combine_recv_kernel(PeerView v, CombineArgs a, InternodeHandleView h) {
  const int R = v.layout.num_ranks, T_max = v.layout.max_tokens, lane = threadIdx.x & 31;
  const Node nd = node_of(v);
  const int M = nd.count;
  // Every node's partial sums are in: wait_nodes_kernel ran first (its acquire, then this kernel's launch).
  const int elem_bytes = a.y_is_bf16 ? 2 : 4, row_bytes = a.row_elems * elem_bytes;
  const int warp = blockIdx.x * kWarps + (threadIdx.x >> 5), num_warps = gridDim.x * kWarps;
  // Row of source (kind 0: my node's rank r, kind 1: node n's partial sum) for token t.
  auto row_of = [&](int kind, int who, int t) {
    const size_t area = kind == 0 ? v.layout.comb : v.layout.comb_recv;
    return v.local + area + (static_cast<size_t>(who) * T_max + t) * v.layout.max_row_bytes;
  };
  for (int t = warp; t < a.num_tokens; t += num_warps) {
    float* out = static_cast<float*>(a.out) + static_cast<size_t>(t) * a.row_elems;
    __nv_bfloat16* out16 = static_cast<__nv_bfloat16*>(a.out) + static_cast<size_t>(t) * a.row_elems;
    if (row_bytes % 16 == 0) {  // 16-byte pieces: 8 bf16 or 4 f32 channels per lane and step
      for (int j = lane; j < row_bytes / 16; j += 32) {
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        auto add = [&](const uint8_t* row) {
          const int4 raw = ld_peer_written(reinterpret_cast<const int4*>(row) + j);
          if (a.y_is_bf16) {
            add_bf16x8(acc, raw);
          } else {
            const float* f = reinterpret_cast<const float*>(&raw);
            acc[0] += f[0], acc[1] += f[1], acc[2] += f[2], acc[3] += f[3];
          }
        };
        for (int n = 0; n < M; ++n) {
          if (n == nd.index) {
            for (int l = 0; l < nd.size; ++l) {
              if (a.send_slot[t * R + nd.base + l] >= 0) add(row_of(0, nd.base + l, t));
            }
          } else if (h.node_slot[t * M + n] >= 0) {
            add(row_of(1, n, t));
          }
        }
        const int per_vec = 16 / elem_bytes;
        if (a.out_is_bf16) {
          __nv_bfloat162 p[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) p[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
          if (a.y_is_bf16) {
            *reinterpret_cast<int4*>(out16 + j * per_vec) = *reinterpret_cast<const int4*>(p);
          } else {
            *reinterpret_cast<uint2*>(out16 + j * per_vec) = *reinterpret_cast<const uint2*>(p);
          }
        } else {
          float4* o = reinterpret_cast<float4*>(out + j * per_vec);
          o[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
          if (a.y_is_bf16) o[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
        }
      }
      continue;
    }
    for (int i = lane; i < a.row_elems; i += 32) {
      float acc = 0.f;
      auto add = [&](const uint8_t* row) {
        acc += a.y_is_bf16 ? __bfloat162float(ld_peer_written(reinterpret_cast<const __nv_bfloat16*>(row) + i))
                           : ld_peer_written(reinterpret_cast<const float*>(row) + i);
      };
      for (int n = 0; n < M; ++n) {
        if (n == nd.index) {
          for (int l = 0; l < nd.size; ++l) {
            if (a.send_slot[t * R + nd.base + l] >= 0) add(row_of(0, nd.base + l, t));
          }
        } else if (h.node_slot[t * M + n] >= 0) {
          add(row_of(1, n, t));
        }
      }
      if (a.out_is_bf16) {
        out16[i] = __float2bfloat16_rn(acc);
      } else {
        out[i] = acc;
      }
    }
  }
}

int grid_for(int num_blocks, int work_warps) {
  const int needed = (work_warps + kWarps - 1) / kWarps;
  return num_blocks < 1 ? 1 : (needed < num_blocks ? (needed < 1 ? 1 : needed) : num_blocks);
}

}  // namespace

cudaError_t launch_internode_dispatch(const PeerView& view, const DispatchArgs& args, const InternodeHandle& handle,
                                      int num_blocks, cudaStream_t stream) {
  const IntranodeLayout& l = view.layout;
  notify_kernel<<<1, kNotifyThreads, 0, stream>>>(view, args, handle);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  send_kernel<<<grid_for(num_blocks, args.num_tokens), kThreads, 0, stream>>>(
      view, args.in, args.topk_idx, args.topk_weights, args.send_slot, handle.node_slot, args.num_tokens,
      args.num_experts);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  wait_nodes_kernel<<<1, kMaxPeers, 0, stream>>>(view, l.net_signal, 32, kPhaseInternodeForward);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  forward_kernel<<<grid_for(num_blocks, l.num_nodes * l.max_tokens), kThreads, 0, stream>>>(
      view, args.in.row_bytes, args.in.scales ? args.in.scale_bytes : 0, true, handle);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  const int node_base = (view.rank / l.node_size) * l.node_size;
  JAX_EP_CUDA_RETURN_IF_ERROR(launch_wait_done(view, node_base, l.node_size, kPhaseInternodeReceive, stream));
  JAX_EP_CUDA_RETURN_IF_ERROR(launch_dispatch_receive(view, args, args.out_stats, num_blocks, stream));
  copy_recv_fwd_kernel<<<grid_for(num_blocks, l.capacity / 16 + 1), kThreads, 0, stream>>>(view, args.out_stats,
                                                                                            handle.recv_fwd);
  return cudaGetLastError();
}

cudaError_t launch_internode_cached_dispatch(const PeerView& view, const CachedDispatchArgs& args,
                                             const InternodeHandleView& handle, int num_blocks, cudaStream_t stream) {
  const IntranodeLayout& l = view.layout;
  enter_kernel<<<1, kNotifyThreads, 0, stream>>>(view, handle.node_slot, args.num_tokens, kPhaseInternodeEnter);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  send_kernel<<<grid_for(num_blocks, args.num_tokens), kThreads, 0, stream>>>(
      view, args.in, nullptr, nullptr, args.send_slot, handle.node_slot, args.num_tokens, 0);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  wait_nodes_kernel<<<1, kMaxPeers, 0, stream>>>(view, l.net_signal, 32, kPhaseInternodeForward);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  forward_kernel<<<grid_for(num_blocks, l.num_nodes * l.max_tokens), kThreads, 0, stream>>>(
      view, args.in.row_bytes, 0, false, InternodeHandle{});
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  const int node_base = (view.rank / l.node_size) * l.node_size;
  JAX_EP_CUDA_RETURN_IF_ERROR(launch_wait_done(view, node_base, l.node_size, kPhaseInternodeReceive, stream));
  DispatchArgs recv;
  recv.in = args.in;
  recv.in.scales = nullptr;
  recv.out_x = args.out_x;
  return launch_dispatch_receive(view, recv, args.stats, num_blocks, stream);
}

cudaError_t launch_internode_combine(const PeerView& view, const CombineArgs& args, const InternodeHandleView& handle,
                                     int num_blocks, cudaStream_t stream) {
  const IntranodeLayout& l = view.layout;
  enter_kernel<<<1, kNotifyThreads, 0, stream>>>(view, nullptr, 0, kPhaseInternodeEnter);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  const int row_bytes = args.row_elems * (args.y_is_bf16 ? 2 : 4);
  combine_send_kernel<<<grid_for(num_blocks, l.capacity), kThreads, 0, stream>>>(view, args, handle, row_bytes);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  const int node_base = (view.rank / l.node_size) * l.node_size;
  JAX_EP_CUDA_RETURN_IF_ERROR(launch_wait_done(view, node_base, l.node_size, kPhaseInternodeReduce, stream));
  reduce_kernel<<<grid_for(num_blocks, l.num_nodes * l.max_tokens), kThreads, 0, stream>>>(view, handle, args.y_is_bf16,
                                                                                           args.row_elems);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  wait_nodes_kernel<<<1, kMaxPeers, 0, stream>>>(view, l.comb_signal, 0, kPhaseInternodeCombine);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  combine_recv_kernel<<<grid_for(num_blocks, args.num_tokens), kThreads, 0, stream>>>(view, args, handle);
  return cudaGetLastError();
}

}  // namespace jax_ep
