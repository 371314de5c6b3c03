// get_dispatch_layout: per-rank / per-expert token counts and the token -> rank
// membership matrix of one rank's routing (docs/semantics.md).
//
// Host-only declarations: this header is included by the FFI handler, which is
// compiled by the host compiler.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace jax_ep {

// Largest num_ranks the layout kernel supports (one token's row of
// is_token_in_rank must fit the kernel's shared-memory tile).
inline constexpr int kLayoutMaxRanks = 32768;

// Computes, for topk_idx [num_tokens, num_topk] (global expert ids; ids outside
// [0, num_experts) are ignored and never used as an address):
//   is_token_in_rank [num_tokens, num_ranks]: token t has >= 1 valid entry whose
//       expert is owned by rank r (expert e belongs to rank e / (E / R));
//   num_tokens_per_rank [num_ranks]: column sums of is_token_in_rank;
//   num_tokens_per_expert [num_experts]: number of valid (t, k) entries with id e.
// Every output element is written (counts are zeroed on `stream` first), nothing
// is allocated and the host never waits: safe inside CUDA graph capture.
// Preconditions (checked by the caller): num_tokens >= 0, num_topk >= 0,
// 0 < num_ranks <= kLayoutMaxRanks, num_experts > 0, num_experts % num_ranks == 0.
// Launch errors are left for cudaGetLastError().
void launch_get_dispatch_layout(const int32_t* topk_idx, int num_tokens,
                                int num_topk, int num_ranks, int num_experts,
                                int32_t* num_tokens_per_rank,
                                int32_t* num_tokens_per_expert,
                                bool* is_token_in_rank, cudaStream_t stream);

}  // namespace jax_ep
