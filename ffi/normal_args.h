// Argument checking shared by the intranode and internode normal-mode handlers: each validates the XLA
// buffers of one op against the Buffer named by `uid`, and returns the peer view, the grid budget and the
// kernel arguments (ffi/intranode_handler.cc). `target` names the custom call in error messages.
#pragma once

#include <cstdint>

#include "cuda/intranode.cuh"
#include "xla/ffi/api/ffi.h"

namespace jax_ep {

namespace ffi = xla::ffi;

ffi::Error BuildDispatch(const char* target, int32_t device, ffi::AnyBuffer x, ffi::AnyBuffer scales,
                        ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> topk_weights, int64_t uid,
                        int64_t num_experts, int64_t expert_alignment, ffi::Result<ffi::AnyBuffer> out_x,
                        ffi::Result<ffi::AnyBuffer> out_scales, ffi::ResultBuffer<ffi::S32> out_idx,
                        ffi::ResultBuffer<ffi::F32> out_w, ffi::ResultBuffer<ffi::S32> tokens_per_expert,
                        ffi::ResultBuffer<ffi::S32> stats, ffi::ResultBuffer<ffi::PRED> is_token_in_rank,
                        ffi::ResultBuffer<ffi::S32> send_slot, ffi::ResultBuffer<ffi::S32> recv_src, PeerView* view_out, int* blocks_out, DispatchArgs* args_out);

ffi::Error BuildCachedDispatch(const char* target, int32_t device, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> send_slot,
                              ffi::Buffer<ffi::S32> recv_src, ffi::Buffer<ffi::S32> stats, int64_t uid,
                              ffi::Result<ffi::AnyBuffer> out_x, PeerView* view_out, int* blocks_out, CachedDispatchArgs* args_out);

ffi::Error BuildCombine(const char* target, int32_t device, ffi::AnyBuffer y, ffi::Buffer<ffi::S32> send_slot,
                       ffi::Buffer<ffi::S32> recv_src, ffi::Buffer<ffi::S32> stats, int64_t uid,
                       ffi::Result<ffi::AnyBuffer> out, PeerView* view_out, int* blocks_out, CombineArgs* args_out);

}  // namespace jax_ep
