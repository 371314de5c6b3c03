// Intranode (load/store peers: NVLink, or one GPU shared by several processes) normal-mode
// dispatch / combine. Host-side declarations, included by the FFI handlers.
//
// Every rank owns one block of communication memory with the layout below; peers write into it
// through peer pointers (CUDA IPC or in-process peer access). An op is: an "enter" barrier (which for
// dispatch also carries each rank's per-destination counts), the sends, a "done" signal per peer, and the
// receive into XLA's output buffers. Dispatch pulls: every sender copies each of its tokens once into its
// own stage (and pushes the small per-row metadata into each receiver's slot), every receiver reads its
// rows straight from the senders' stages into its output; combine the same way back (each rank keeps its
// answers, each source reads its token's rows at the slots dispatch gave it). Internode mode pushes instead
// (cuda/internode.cuh). Flags carry a
// per-rank op counter (epoch), so nothing is ever reset and consecutive ops cannot be confused.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda/low_latency_layout.cuh"

namespace jax_ep {

inline constexpr int kMaxPeers = 64;  // ranks of one load/store group (a 64-bit rank mask)

struct IntranodeLayout {
  int num_ranks = 0;
  int capacity = 0;         // C: receive slots per rank
  int max_tokens = 0;       // T_max per rank
  int num_topk = 0;         // K
  int max_row_bytes = 0;    // widest payload row (f32 x H)
  int max_scale_bytes = 0;  // fp8 scales row (H / 128 floats)
  // Byte offsets inside one rank's block.
  size_t epoch = 0;          // u64: ops this rank has started (local only)
  size_t block_counter = 0;  // u32[2]: last-block detection (local only)
  size_t enter_flags = 0;    // u64[R]: epoch at which rank s entered its op (written by s)
  size_t done_flags = 0;     // u64[R]: epoch at which rank s finished writing here (written by s)
  size_t counts = 0;         // i32[2][R][R]: rank s's tokens per destination, by op parity
  size_t recv_x = 0;         // u8[C][max_row_bytes] (internode mode only: rows pushed by senders / forwarders)
  size_t recv_scales = 0;    // u8[C][max_scale_bytes] (internode mode only)
  size_t recv_idx = 0;       // i32[C][K]: global expert ids (-1 = none)
  size_t recv_w = 0;         // f32[C][K]
  size_t recv_src = 0;       // i32[C]: source rank * T_max + source token
  size_t comb = 0;           // u8[R][T_max][max_row_bytes]: combine rows from rank r for my token t (internode)
  size_t stage_x = 0;        // u8[T_max][max_row_bytes]: my tokens, read by their receivers (intranode only)
  size_t stage_scales = 0;   // u8[T_max][max_scale_bytes] (intranode only)
  size_t stage_comb = 0;     // u8[C][max_row_bytes]: combine answers, read by their sources (intranode only)
  // Internode mode (num_nodes > 1, cuda/internode.cuh): a node is node_size consecutive ranks; ranks of
  // other nodes are reached by NVSHMEM puts only. Unused (zero) in intranode mode.
  int num_nodes = 1;
  int node_size = 0;
  int net_row_stride = 0;    // one network row: meta (header, slots, ids, weights), payload, scales
  int net_meta_bytes = 0;
  size_t node_counts = 0;    // i32[nodes]: my tokens per destination node in this op (local only)
  size_t net_signal = 0;     // u64[nodes]: epoch << 32 | rows, put by node m's rail peer (dispatch)
  size_t net_send = 0;       // u8[nodes][T_max][net_row_stride]: the puts' source (registered memory)
  size_t net_recv = 0;       // u8[nodes][T_max][net_row_stride]: rows from node m's rail peer
  size_t recv_fwd = 0;       // i32[C]: a forwarded row's (source node * T_max + network row), -1 if direct
  size_t reduce = 0;         // u8[nodes * T_max][node_size][max_row_bytes]: combine rows to sum per node
  size_t comb_signal = 0;    // u64[nodes]: epoch, put by node m's rail peer (combine partial sums)
  size_t comb_send = 0;      // u8[nodes][T_max][max_row_bytes]
  size_t comb_recv = 0;      // u8[nodes][T_max][max_row_bytes]: node m's partial sum for my token t
  size_t total = 0;
};

IntranodeLayout make_intranode_layout(int num_ranks, int capacity, int max_tokens, int num_topk,
                                      int max_row_bytes, int max_scale_bytes, int num_nodes = 1);

// What a kernel needs to reach its peers. `peers` is a device array of num_ranks base pointers
// (peers[rank] is this rank's own block).
struct PeerView {
  uint8_t* local = nullptr;
  uint8_t* const* peers = nullptr;
  int rank = 0;
  IntranodeLayout layout;
  LowLatencyLayout ll;  // the low-latency area (ll.enabled) of the same block
  unsigned long long timeout_ns = 0;
  int* diag = nullptr;  // host-mapped i32[4]: {phase + 1, rank, peer, 0} of the first timeout
  const int* alive = nullptr;  // device word: 1 while open; a CUDA graph replayed after close() sees 0
  const int* pes = nullptr;    // internode: device i32[R], the NVSHMEM PE of each rank
  // Bit r: rank r's memory is on this rank's GPU (this rank's own bit included). The low-latency dispatch reads those
  // ranks' rows from their areas for themselves (they share this GPU's memory) and writes its rows into the others'.
  unsigned long long same_gpu = 0;

  // Whether every rank of the low-latency area is on this GPU: the launchers pick builds by it, the kernels how to
  // signal.
  __host__ __device__ bool every_rank_on_this_gpu() const {
    const unsigned long long every_rank = ll.num_ranks >= 64 ? ~0ull : (1ull << ll.num_ranks) - 1;
    return (same_gpu & every_rank) == every_rank;
  }
};

// Wait phases, reported by timeouts.
enum WaitPhase : int {
  kPhaseDispatchNotify = 0,
  kPhaseDispatchRecv = 1,
  kPhaseCachedEnter = 2,
  kPhaseCombineEnter = 3,
  kPhaseCombineRecv = 4,
  kPhaseClosed = 5,  // an op ran on a closed buffer (a replayed graph)
  kPhaseLowLatencyDispatchSend = 6,  // waiting for a receiver to free its staging area (epoch n - 2)
  kPhaseLowLatencyDispatchRecv = 7,
  kPhaseLowLatencyCombineSend = 8,
  kPhaseLowLatencyCombineRecv = 9,
  kPhaseLowLatencyTooMany = 10,  // a third send before the first result was received (not a wait)
  kPhaseInternodeCounts = 11,    // count exchange over the network
  kPhaseInternodeForward = 12,   // a forwarder waiting for a source node's rows
  kPhaseInternodeReceive = 13,   // a receiver waiting for its node's ranks
  kPhaseInternodeEnter = 14,     // combine / cached dispatch entry barrier
  kPhaseInternodeReduce = 15,    // a forwarder waiting for its node's combine rows
  kPhaseInternodeCombine = 16,   // a source waiting for another node's partial sums
  kPhaseLowLatencyOutOfOrder = 17,  // a receive before an earlier pending result of its kind (not a wait)
};
const char* wait_phase_name(int phase);

// Row payload shared by dispatch and cached dispatch.
struct Rows {
  const void* x = nullptr;       // [T, row_bytes]
  int row_bytes = 0;             // multiple of 4
  const void* scales = nullptr;  // [T, scale_bytes] or null
  int scale_bytes = 0;           // multiple of 4
};

// Dispatch (rank-major). Outputs are XLA buffers of this rank.
struct DispatchArgs {
  Rows in;
  const int32_t* topk_idx = nullptr;      // [T, K]
  const float* topk_weights = nullptr;    // [T, K]
  int num_tokens = 0;
  int num_experts = 0;
  int expert_alignment = 1;
  void* out_x = nullptr;                  // [C, row_bytes]
  void* out_scales = nullptr;             // [C, scale_bytes] or null
  int32_t* out_idx = nullptr;             // [C, K] local ids
  float* out_w = nullptr;                 // [C, K]
  int32_t* out_tokens_per_expert = nullptr;  // [E_loc]
  int32_t* out_stats = nullptr;           // [4]: num_recv, overflow, num_invalid_ids, total received
  bool* is_token_in_rank = nullptr;       // [T, R] (handle)
  int32_t* send_slot = nullptr;           // [T, R] (handle): slot at rank r, -1 = not sent
  int32_t* recv_src = nullptr;            // [C] (handle): src rank * T_max + token, -1 = padding
};

cudaError_t launch_dispatch(const PeerView& view, const DispatchArgs& args, int num_blocks,
                            cudaStream_t stream);

// Cached dispatch: rows of a new [T, row_bytes] tensor along a handle's routing -> [C, row_bytes].
struct CachedDispatchArgs {
  Rows in;
  int num_tokens = 0;
  const int32_t* send_slot = nullptr;     // [T, R]
  const int32_t* recv_src = nullptr;      // [C]
  const int32_t* stats = nullptr;         // [4] (num_recv first)
  void* out_x = nullptr;                  // [C, row_bytes]
};

cudaError_t launch_cached_dispatch(const PeerView& view, const CachedDispatchArgs& args, int num_blocks,
                                   cudaStream_t stream);

// Combine: received rows y [C, D] (bf16 or f32) back to their sources, summed in f32 over ranks in
// ascending order -> out [T, D], f32 or bf16 (rounded once from the f32 sum: what an f32 output then a
// cast gives, without writing and re-reading the f32 tensor).
struct CombineArgs {
  const void* y = nullptr;
  bool y_is_bf16 = true;
  int row_elems = 0;                      // D
  int num_tokens = 0;
  const int32_t* send_slot = nullptr;     // [T, R]
  const int32_t* recv_src = nullptr;      // [C] (the internode combine's; intranode sources read by send_slot)
  const int32_t* stats = nullptr;         // [4]
  void* out = nullptr;                    // [T, D]
  bool out_is_bf16 = false;
};

cudaError_t launch_combine(const PeerView& view, const CombineArgs& args, int num_blocks, cudaStream_t stream);

// Building blocks the internode kernels reuse: wait for the done flags of ranks [first, first + n), and the
// receive copy (staging area -> XLA outputs; with metadata when args.out_idx is set) without its wait.
cudaError_t launch_wait_done(const PeerView& view, int first_rank, int num_ranks, int phase, cudaStream_t stream);
cudaError_t launch_dispatch_receive(const PeerView& view, const DispatchArgs& args, const int32_t* stats,
                                    int num_blocks, cudaStream_t stream);

}  // namespace jax_ep
