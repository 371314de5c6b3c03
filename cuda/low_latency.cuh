// Low-latency (decode) dispatch / combine over load/store peers. Host-side declarations for the FFI
// handlers; kernels in cuda/low_latency.cu.
//
// Each op is two launches that never wait for each other's SMs: a send kernel that writes every token's row
// straight into the staging area of each rank on another GPU owning one of its experts (once per rank) and once
// into its own area for itself for the owners on its GPU, and raises a signal counter per rank (each block its share
// as its stores complete on one GPU, the last block otherwise), and a receive kernel that waits for those counters
// and lays the rows out for the caller. Work placed between the two runs while the transfer completes. The send
// kernel returns a ticket (the op's epoch) that the receive kernel reads, so the pair needs no host-side state.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/intranode.cuh"

namespace jax_ep {

struct LowLatencyDispatchSendArgs {
  const void* x = nullptr;             // [T, H] bf16
  const int32_t* topk_idx = nullptr;   // [T, K]
  int num_tokens = 0;
  bool use_fp8 = true;
  bool round_scale = false;            // power-of-two scales
  bool use_ue8m0 = false;              // scales packed as UE8M0 bytes (implies round_scale)
  uint32_t* ticket = nullptr;          // [2]: epoch (lo, hi)
};

struct LowLatencyDispatchRecvArgs {
  const uint32_t* ticket = nullptr;
  bool use_fp8 = true;
  bool use_ue8m0 = false;
  void* out_x = nullptr;               // [E_loc, S, H] fp8 or bf16 (S = R * T_max); rows past count untouched
  void* out_scales = nullptr;          // [E_loc, S, scale_words] f32 or packed UE8M0 int32; null for bf16
  int32_t* out_count = nullptr;        // [E_loc]
  int32_t* out_src_info = nullptr;     // [E_loc, S]: source token index, -1 past count
  int32_t* out_layout_range = nullptr; // [E_loc, R]: rows from each source rank
  int32_t* out_recv_k = nullptr;       // [E_loc, S]: first k of the source token naming this expert, -1 past count
  uint32_t* out_own_bits = nullptr;    // [E_loc, W]: bit t set when this rank's token t was received for expert e
};

struct LowLatencyCombineSendArgs {
  const void* y = nullptr;             // [E_loc, S, H] bf16
  const int32_t* src_info = nullptr;   // handle
  const int32_t* layout_range = nullptr;
  const int32_t* recv_k = nullptr;
  uint32_t* ticket = nullptr;
};

struct LowLatencyCombineRecvArgs {
  const uint32_t* ticket = nullptr;
  const void* y = nullptr;             // [E_loc, S, H] bf16: this rank's answers to its own tokens are read here
  const int32_t* layout_range = nullptr;  // handle [E_loc, R]
  const uint32_t* own_bits = nullptr;  // handle [E_loc, W]: where this rank's own tokens' answers are in y
  const int32_t* topk_idx = nullptr;   // [T, K]
  const float* topk_weights = nullptr; // [T, K]
  int num_tokens = 0;
  void* out = nullptr;                 // [T, H] bf16
};

// Scale words per staged / output fp8 row: H/128 f32, or ceil(H/512) int32 of packed UE8M0.
JAX_EP_HOST_DEVICE inline int low_latency_scale_words(int hidden, bool use_ue8m0) {
  return use_ue8m0 ? (hidden / 128 + 3) / 4 : hidden / 128;
}

// num_blocks: the Buffer's grid budget (4 blocks per SM by default); kernels size their grids from it and the work.
cudaError_t launch_low_latency_dispatch_send(const PeerView& view, const LowLatencyDispatchSendArgs& args,
                                             int num_blocks, cudaStream_t stream);
cudaError_t launch_low_latency_dispatch_recv(const PeerView& view, const LowLatencyDispatchRecvArgs& args, int num_blocks,
                                             cudaStream_t stream);
cudaError_t launch_low_latency_combine_send(const PeerView& view, const LowLatencyCombineSendArgs& args, int num_blocks,
                                            cudaStream_t stream);
cudaError_t launch_low_latency_combine_recv(const PeerView& view, const LowLatencyCombineRecvArgs& args, int num_blocks,
                                            cudaStream_t stream);

}  // namespace jax_ep
