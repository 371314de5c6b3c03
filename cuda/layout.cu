// get_dispatch_layout kernels (see layout.cuh for the contract).
//
// Work split: the token axis is cut into chunks of `tokens_per_chunk` tokens;
// each block walks its chunks (grid-stride) and, per chunk,
//   1. clears a shared tile [tokens_per_chunk, R] of is_token_in_rank bytes,
//   2. reads the chunk's topk_idx entries coalesced (one entry per thread and
//      step), marks tile[t][rank(e)] and counts e in a shared expert histogram,
//   3. adds the tile's column sums (4 columns per 32-bit word, reduced across
//      the warp first) to a shared per-rank histogram and copies the tile to
//      its rows of is_token_in_rank (contiguous, 16-byte stores).
// At the end each block adds its shared histograms to the global counts with
// one atomic per non-zero bin. A histogram too large for shared memory
// (R or E > 4096) is accumulated straight in global memory instead. The counts
// are zeroed by a tiny kernel launched just before on the same stream.
// Integer atomics: results are deterministic.
//
// Out-of-range ids (anything outside [0, E), -1 included) are skipped before
// they are used to form any address.

#include <algorithm>

#include "common.cuh"
#include "layout.cuh"

namespace jax_ep {
namespace {

constexpr int kLayoutThreads = 256;
// Blocks are capped; larger inputs are walked grid-stride so the number of
// global flush atomics stays bounded.
constexpr int kLayoutMaxBlocks = 264;
// Dynamic shared memory stays within the default 48 KiB (no opt-in attribute,
// no host call besides the launches).
constexpr int kLayoutSmemBytes = 48 * 1024;
// Each histogram (ranks, experts) lives in shared memory up to this size;
// beyond it the kernel counts straight into global memory.
constexpr int kLayoutMaxSharedCountBytes = 16 * 1024;
constexpr int kLayoutMaxTokensPerChunk = 128;
// Column sums pack 4 per-column counts (<= tokens per chunk) into the bytes of
// a 32-bit word.
static_assert(kLayoutMaxTokensPerChunk <= 255, "byte-lane column sums would carry");
static_assert(kLayoutThreads % 32 == 0, "whole warps");

__global__ void __launch_bounds__(kLayoutThreads)
    zero_layout_counts_kernel(int32_t* __restrict__ num_tokens_per_rank,
                              int num_ranks,
                              int32_t* __restrict__ num_tokens_per_expert,
                              int num_experts) {
  const int stride = gridDim.x * blockDim.x;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < num_ranks + num_experts;
       i += stride) {
    if (i < num_ranks) {
      num_tokens_per_rank[i] = 0;
    } else {
      num_tokens_per_expert[i - num_ranks] = 0;
    }
  }
}

// Adds the column sums of tile [n_tok, num_ranks] (0/1 bytes) to rank_counts.
// Word = uint32_t reads 4 columns at once (num_ranks % 4 == 0) and sums them
// SIMD-within-a-register: each byte lane holds a count <= n_tok <= 128, so no
// carry crosses lanes (sums over disjoint rows of one column stay <= n_tok,
// also after the warp reduction). Threads own (column word, row group) pairs;
// consecutive threads read consecutive words (no bank conflicts). When a warp
// holds whole row groups (words_per_row a power of two <= 32) its lanes are
// reduced with shuffles first: one atomic per column and warp.
template <typename Word>
__device__ __forceinline__ void add_tile_column_sums(const uint8_t* tile, int n_tok,
                                                     int num_ranks,
                                                     int* rank_counts) {
  constexpr int kLanes = sizeof(Word);
  const Word* rows = reinterpret_cast<const Word*>(tile);
  const int words_per_row = num_ranks / kLanes;
  const int tid = threadIdx.x;
  auto flush = [&](uint32_t acc, int w) {
#pragma unroll
    for (int j = 0; j < kLanes; ++j) {
      const int c = static_cast<int>((acc >> (8 * j)) & 0xffu);
      if (c != 0) atomicAdd(rank_counts + w * kLanes + j, c);
    }
  };
  if (words_per_row <= 32 && (words_per_row & (words_per_row - 1)) == 0) {
    // Every thread active (kLayoutThreads is a multiple of 32).
    const int groups = kLayoutThreads / words_per_row;
    const int w = tid % words_per_row;
    uint32_t acc = 0;
    for (int t = tid / words_per_row; t < n_tok; t += groups) {
      acc += rows[t * words_per_row + w];
    }
    for (int offset = 16; offset >= words_per_row; offset >>= 1) {
      acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    }
    if ((tid & 31) < words_per_row) flush(acc, w);
  } else if (words_per_row <= kLayoutThreads) {
    const int groups = kLayoutThreads / words_per_row;
    if (tid < groups * words_per_row) {
      const int w = tid % words_per_row;
      uint32_t acc = 0;
      for (int t = tid / words_per_row; t < n_tok; t += groups) {
        acc += rows[t * words_per_row + w];
      }
      flush(acc, w);
    }
  } else {
    for (int w = tid; w < words_per_row; w += kLayoutThreads) {
      uint32_t acc = 0;
      for (int t = 0; t < n_tok; ++t) acc += rows[t * words_per_row + w];
      flush(acc, w);
    }
  }
}

template <bool kSharedRanks, bool kSharedExperts>
__global__ void __launch_bounds__(kLayoutThreads)
    get_dispatch_layout_kernel(const int32_t* __restrict__ topk_idx,
                               int num_tokens, int num_topk, int num_ranks,
                               int num_experts, int tokens_per_chunk,
                               int tile_bytes,
                               int32_t* __restrict__ num_tokens_per_rank,
                               int32_t* __restrict__ num_tokens_per_expert,
                               bool* __restrict__ is_token_in_rank) {
  // Shared layout: [tile: tile_bytes (multiple of 16)] [rank counts: R, if
  // kSharedRanks] [expert counts: E, if kSharedExperts].
  extern __shared__ uint4 smem_u4[];
  uint8_t* tile = reinterpret_cast<uint8_t*>(smem_u4);
  int* shared_counts = reinterpret_cast<int*>(tile + tile_bytes);
  const int num_shared_counts =
      (kSharedRanks ? num_ranks : 0) + (kSharedExperts ? num_experts : 0);
  int* rank_counts = kSharedRanks ? shared_counts
                                  : reinterpret_cast<int*>(num_tokens_per_rank);
  int* expert_counts =
      kSharedExperts ? shared_counts + (kSharedRanks ? num_ranks : 0)
                     : reinterpret_cast<int*>(num_tokens_per_expert);

  const int tid = threadIdx.x;
  const int experts_per_rank = num_experts / num_ranks;
  const unsigned num_experts_u = static_cast<unsigned>(num_experts);
  const int num_chunks = ceil_div(num_tokens, tokens_per_chunk);

  for (int i = tid; i < num_shared_counts; i += kLayoutThreads) {
    shared_counts[i] = 0;
  }

  for (int chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
    const int t0 = chunk * tokens_per_chunk;
    const int n_tok = min(tokens_per_chunk, num_tokens - t0);
    const int n_bytes = n_tok * num_ranks;

    // 1. clear the tile (the previous chunk's copy-out ended with a barrier).
    const int n_words = ceil_div(n_bytes, 16);
    for (int i = tid; i < n_words; i += kLayoutThreads) {
      smem_u4[i] = make_uint4(0u, 0u, 0u, 0u);
    }
    __syncthreads();

    // 2. scatter this chunk's entries (coalesced reads).
    const int32_t* src = topk_idx + static_cast<int64_t>(t0) * num_topk;
    const int n_entries = n_tok * num_topk;
    for (int i = tid; i < n_entries; i += kLayoutThreads) {
      const int e = __ldg(src + i);
      if (static_cast<unsigned>(e) < num_experts_u) {
        atomicAdd(expert_counts + e, 1);
        tile[(i / num_topk) * num_ranks + e / experts_per_rank] = 1;
      }
    }
    __syncthreads();

    // 3a. rank counts = column sums of the tile (a token counts once per rank).
    if (num_ranks % 4 == 0) {
      add_tile_column_sums<uint32_t>(tile, n_tok, num_ranks, rank_counts);
    } else {
      add_tile_column_sums<uint8_t>(tile, n_tok, num_ranks, rank_counts);
    }

    // 3b. copy the tile to rows [t0, t0 + n_tok) of is_token_in_rank.
    uint8_t* dst = reinterpret_cast<uint8_t*>(is_token_in_rank) +
                   static_cast<int64_t>(t0) * num_ranks;
    int done = 0;
    if ((reinterpret_cast<uintptr_t>(dst) & 15u) == 0) {
      const int n_full = n_bytes / 16;
      uint4* dst4 = reinterpret_cast<uint4*>(dst);
      for (int i = tid; i < n_full; i += kLayoutThreads) dst4[i] = smem_u4[i];
      done = n_full * 16;
    }
    for (int i = done + tid; i < n_bytes; i += kLayoutThreads) dst[i] = tile[i];
    __syncthreads();  // the tile is reused by the next chunk
  }

  // 4. flush the block's shared histograms (one atomic per non-zero bin).
  // (Every block had >= 1 chunk, whose last barrier orders the counts.)
  if (kSharedRanks) {
    for (int i = tid; i < num_ranks; i += kLayoutThreads) {
      const int c = rank_counts[i];
      if (c != 0) atomicAdd(num_tokens_per_rank + i, c);
    }
  }
  if (kSharedExperts) {
    for (int i = tid; i < num_experts; i += kLayoutThreads) {
      const int c = expert_counts[i];
      if (c != 0) atomicAdd(num_tokens_per_expert + i, c);
    }
  }
}

template <bool kSharedRanks, bool kSharedExperts>
void launch_layout_kernel(int blocks, size_t smem, cudaStream_t stream,
                          const int32_t* topk_idx, int num_tokens, int num_topk,
                          int num_ranks, int num_experts, int tokens_per_chunk,
                          int tile_bytes, int32_t* num_tokens_per_rank,
                          int32_t* num_tokens_per_expert,
                          bool* is_token_in_rank) {
  get_dispatch_layout_kernel<kSharedRanks, kSharedExperts>
      <<<blocks, kLayoutThreads, smem, stream>>>(
          topk_idx, num_tokens, num_topk, num_ranks, num_experts,
          tokens_per_chunk, tile_bytes, num_tokens_per_rank,
          num_tokens_per_expert, is_token_in_rank);
}

}  // namespace

void launch_get_dispatch_layout(const int32_t* topk_idx, int num_tokens,
                                int num_topk, int num_ranks, int num_experts,
                                int32_t* num_tokens_per_rank,
                                int32_t* num_tokens_per_expert,
                                bool* is_token_in_rank, cudaStream_t stream) {
  if (num_tokens < 0 || num_topk < 0 || num_ranks <= 0 ||
      num_ranks > kLayoutMaxRanks || num_experts <= 0 ||
      num_experts % num_ranks != 0) {
    return;  // the caller validates; never launch on bad sizes
  }

  const int zero_blocks = static_cast<int>(
      std::min(ceil_div<int64_t>(int64_t{num_ranks} + num_experts,
                                 kLayoutThreads),
               int64_t{kLayoutMaxBlocks}));
  zero_layout_counts_kernel<<<zero_blocks, kLayoutThreads, 0, stream>>>(
      num_tokens_per_rank, num_ranks, num_tokens_per_expert, num_experts);
  if (num_tokens == 0) return;

  const int64_t rank_bytes = int64_t{num_ranks} * int64_t{sizeof(int)};
  const int64_t expert_bytes = int64_t{num_experts} * int64_t{sizeof(int)};
  const bool shared_ranks = rank_bytes <= kLayoutMaxSharedCountBytes;
  const bool shared_experts = expert_bytes <= kLayoutMaxSharedCountBytes;
  const int64_t count_bytes =
      (shared_ranks ? rank_bytes : 0) + (shared_experts ? expert_bytes : 0);
  // >= 16 KiB, a multiple of 16 (so rounding the tile up stays in budget), and
  // >= num_ranks bytes for any num_ranks <= kLayoutMaxRanks.
  const int64_t tile_budget = (kLayoutSmemBytes - count_bytes) & ~int64_t{15};
  const int tokens_per_chunk = static_cast<int>(
      std::max(int64_t{1}, std::min(int64_t{kLayoutMaxTokensPerChunk},
                                    tile_budget / num_ranks)));
  const int tile_bytes = round_up(tokens_per_chunk * num_ranks, 16);
  const int num_chunks = ceil_div(num_tokens, tokens_per_chunk);
  const int blocks = std::min(num_chunks, kLayoutMaxBlocks);
  const size_t smem = static_cast<size_t>(tile_bytes + count_bytes);

  // E >= R, so shared expert counts imply shared rank counts.
  auto* launch = shared_experts ? &launch_layout_kernel<true, true>
                 : shared_ranks ? &launch_layout_kernel<true, false>
                                : &launch_layout_kernel<false, false>;
  launch(blocks, smem, stream, topk_idx, num_tokens, num_topk, num_ranks,
         num_experts, tokens_per_chunk, tile_bytes, num_tokens_per_rank,
         num_tokens_per_expert, is_token_in_rank);
}

}  // namespace jax_ep
