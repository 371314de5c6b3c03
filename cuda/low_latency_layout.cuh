// Memory layout of the low-latency (decode) area inside a rank's communication block. Kept apart from
// the kernels so the runtime (ffi/) and the intranode peer view can carry it without pulling in kernels.
//
// Every area that peers write is double-buffered by op parity (epoch & 1): two results may be in flight.
// Receivers publish "done with epoch n" flags; a sender of epoch n waits for its destination's n - 2. The
// dispatch's presence bits have four copies (epoch % 4): the receive of epoch n clears those of n + 2 while
// its own are still read by its other blocks.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/fast_divmod.cuh"

#ifdef __CUDACC__
#define JAX_EP_HOST_DEVICE __host__ __device__
#else
#define JAX_EP_HOST_DEVICE
#endif

namespace jax_ep {

// 32-bit words of a per-token bit set over T_max tokens.
JAX_EP_HOST_DEVICE inline int low_latency_token_words(int max_tokens) { return (max_tokens + 31) / 32; }

// Bytes of a staged dispatch row's header: {token, the token's K expert ids} as int32, 16-byte aligned.
JAX_EP_HOST_DEVICE inline int low_latency_header_bytes(int num_topk) { return (4 * (1 + num_topk) + 15) / 16 * 16; }

struct LowLatencyLayout {
  bool enabled = false;
  int num_ranks = 0;
  int num_experts = 0;
  int max_tokens = 0;       // T_max
  int num_topk = 0;         // K
  int hidden = 0;           // H
  int row_stride = 0;       // bytes of one staged dispatch row: header (low_latency_header_bytes) + the widest payload (bf16)
  FastDivmod ranks_div;     // R, for the kernels' index arithmetic (fast_divmod.cuh says why)
  FastDivmod local_experts_div;  // E_loc = num_experts / R
  // Absolute byte offsets inside the rank's block (the area starts after the intranode one).
  size_t dispatch_epoch = 0;   // u64: dispatch sends' launch counter, kOpUnit per op (local)
  size_t combine_epoch = 0;    // u64: combine sends' launch counter, kOpUnit per op (local)
  size_t counters = 0;         // u32[4]: last-block detection per kernel (the sends': ranks on other GPUs) (local)
  size_t timing = 0;           // u64[4] start stamps (only the receives' are written), u64[4][2] {sum of ns, launches}
                               // per kernel, then for the two receive kernels u64[2] latest wait end and u64[2][2]
                               // {sum of ns waited, launches},
                               // then the timeline: u64[kLowLatencyTimelineSlots][4][4] {start, latest block start, mid,
                               // end} of each kernel at op epoch % kLowLatencyTimelineSlots (mid: a receive's wait end,
                               // a send's latest block reaching the finish)
  size_t dispatch_signal = 0;  // u64[R]: source rank s's send blocks done writing to me, kOpUnit per op
  size_t dispatch_bits = 0;    // u32[4][E_loc][R][W]: bit t set when source s staged token t for local expert e
  size_t dispatch_done = 0;    // u64[R]: last dispatch epoch rank s finished receiving (s's staging is free)
  size_t combine_signal = 0;   // u64[R]: owner r's send blocks done writing my combine rows, kOpUnit per op
  size_t combine_done = 0;     // u64[R]: last combine epoch rank s finished receiving
  size_t dispatch_stage = 0;   // u8[2][R][T_max][row_stride]: source s's token t at slot t (one row for all its experts here)
  size_t combine_stage = 0;    // u8[2][T_max][K][H] bf16
  size_t end = 0;              // one past the area

  int local_experts() const { return num_experts / num_ranks; }
  JAX_EP_HOST_DEVICE int token_words() const { return low_latency_token_words(max_tokens); }
};

inline constexpr int kLowLatencyKernels = 4;  // dispatch send, dispatch recv, combine send, combine recv
inline constexpr int kLowLatencyTimelineSlots = 32;  // the last 32 ops of each kernel: a whole benchmark call
inline constexpr int kLowLatencyTimelineEntry = 4;     // words per (op, kernel)
inline constexpr int kLowLatencyTimelineWord = 3 * kLowLatencyKernels + 2 + 2 * 2;  // first word of the timeline
inline constexpr int kLowLatencyTimingWords =
    kLowLatencyTimelineWord + kLowLatencyTimelineSlots * kLowLatencyKernels * kLowLatencyTimelineEntry;  // see LowLatencyLayout::timing
inline constexpr int kLowLatencyBitsCopies = 4;  // copies of the dispatch presence bits (epoch % 4)
// T_max bound: the dispatch receive keeps one pair's presence bits and row slots (about 2 * T_max bytes) in
// shared memory, within the 48 KB a launch gets without opt-in; slots are 16-bit.
inline constexpr int kLowLatencyMaxTokens = 16384;
// H bound: the dispatch send copies a token's bf16 row into shared memory (2H bytes; Hopper gives a block up to 227 KB).
inline constexpr int kLowLatencyMaxHidden = 65536;

// Layout of the area starting at `base` (256-aligned). Disabled (all zero, end = base) when num_experts = 0.
LowLatencyLayout make_low_latency_layout(size_t base, int num_ranks, int num_experts, int max_tokens, int num_topk,
                                         int hidden);

}  // namespace jax_ep
