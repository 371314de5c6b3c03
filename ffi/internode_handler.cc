// XLA FFI handlers of the internode normal mode: jax_ep_internode_dispatch, _cached_dispatch, _combine.
// The intranode checks (ffi/normal_args.h) plus the handle's internode arrays, then the kernels of
// cuda/internode.cu. No allocation, no host synchronisation: command-buffer safe.

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "cuda/internode.cuh"
#include "ffi/handler_errors.h"
#include "ffi/handlers.h"
#include "ffi/normal_args.h"
#include "ffi/runtime.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_ep {
namespace {

constexpr const char* kDispatch = "jax_ep_internode_dispatch";
constexpr const char* kCached = "jax_ep_internode_cached_dispatch";
constexpr const char* kCombine = "jax_ep_internode_combine";

// The internode handle arrays for T tokens against the buffer's layout; "" when they fit.
std::string CheckHandle(const IntranodeLayout& l, int64_t T, int64_t node_slot, int64_t recv_fwd, int64_t fwd_src,
                        int64_t fwd_mask) {
  if (l.num_nodes < 2) return "this Buffer is one node: use the intranode ops";
  const int64_t M = l.num_nodes;
  if (node_slot != T * M) return "node_slot must be [T, num_nodes]";
  if (recv_fwd >= 0 && recv_fwd != l.capacity) return "recv_fwd must be [capacity]";
  if (fwd_src >= 0 && (fwd_src != M * l.max_tokens || fwd_mask != M * l.max_tokens)) {
    return "fwd_src / fwd_mask must be [num_nodes * max_tokens_per_rank]";
  }
  return "";
}

ffi::Error DispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::AnyBuffer scales,
                        ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> topk_weights, int64_t uid,
                        int64_t num_experts, int64_t expert_alignment, ffi::Result<ffi::AnyBuffer> out_x,
                        ffi::Result<ffi::AnyBuffer> out_scales, ffi::ResultBuffer<ffi::S32> out_idx,
                        ffi::ResultBuffer<ffi::F32> out_w, ffi::ResultBuffer<ffi::S32> tokens_per_expert,
                        ffi::ResultBuffer<ffi::S32> stats, ffi::ResultBuffer<ffi::PRED> is_token_in_rank,
                        ffi::ResultBuffer<ffi::S32> send_slot, ffi::ResultBuffer<ffi::S32> recv_src,
                        ffi::ResultBuffer<ffi::S32> node_slot, ffi::ResultBuffer<ffi::S32> recv_fwd,
                        ffi::ResultBuffer<ffi::S32> fwd_src, ffi::ResultBuffer<ffi::S32> fwd_mask) {
  PeerView view;
  int num_blocks = 0;
  DispatchArgs a;
  ffi::Error built = BuildDispatch(kDispatch, device, x, scales, topk_idx, topk_weights, uid, num_experts,
                                   expert_alignment, out_x, out_scales, out_idx, out_w, tokens_per_expert, stats,
                                   is_token_in_rank, send_slot, recv_src, &view, &num_blocks, &a);
  if (built.failure()) return built;
  const std::string bad =
      CheckHandle(view.layout, a.num_tokens, node_slot->element_count(), recv_fwd->element_count(),
                  fwd_src->element_count(), fwd_mask->element_count());
  if (!bad.empty()) return Fail(kDispatch, bad);
  InternodeHandle h;
  h.node_slot = node_slot->typed_data();
  h.recv_fwd = recv_fwd->typed_data();
  h.fwd_src = fwd_src->typed_data();
  h.fwd_mask = fwd_mask->typed_data();
  return Launched(kDispatch, launch_internode_dispatch(view, a, h, num_blocks, stream));
}

ffi::Error CachedDispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> send_slot,
                              ffi::Buffer<ffi::S32> recv_src, ffi::Buffer<ffi::S32> stats,
                              ffi::Buffer<ffi::S32> node_slot, int64_t uid, ffi::Result<ffi::AnyBuffer> out_x) {
  PeerView view;
  int num_blocks = 0;
  CachedDispatchArgs a;
  ffi::Error built = BuildCachedDispatch(kCached, device, x, send_slot, recv_src, stats, uid, out_x, &view,
                                         &num_blocks, &a);
  if (built.failure()) return built;
  const std::string bad = CheckHandle(view.layout, a.num_tokens, node_slot.element_count(), -1, -1, -1);
  if (!bad.empty()) return Fail(kCached, bad);
  InternodeHandleView h;
  h.node_slot = node_slot.typed_data();
  return Launched(kCached, launch_internode_cached_dispatch(view, a, h, num_blocks, stream));
}

ffi::Error CombineImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y, ffi::Buffer<ffi::S32> send_slot,
                       ffi::Buffer<ffi::S32> recv_src, ffi::Buffer<ffi::S32> stats, ffi::Buffer<ffi::S32> node_slot,
                       ffi::Buffer<ffi::S32> recv_fwd, ffi::Buffer<ffi::S32> fwd_src, ffi::Buffer<ffi::S32> fwd_mask,
                       int64_t uid, ffi::Result<ffi::AnyBuffer> out) {
  PeerView view;
  int num_blocks = 0;
  CombineArgs a;
  ffi::Error built = BuildCombine(kCombine, device, y, send_slot, recv_src, stats, uid, out, &view, &num_blocks, &a);
  if (built.failure()) return built;
  const std::string bad = CheckHandle(view.layout, a.num_tokens, node_slot.element_count(), recv_fwd.element_count(),
                                      fwd_src.element_count(), fwd_mask.element_count());
  if (!bad.empty()) return Fail(kCombine, bad);
  InternodeHandleView h;
  h.node_slot = node_slot.typed_data();
  h.recv_fwd = recv_fwd.typed_data();
  h.fwd_src = fwd_src.typed_data();
  h.fwd_mask = fwd_mask.typed_data();
  return Launched(kCombine, launch_internode_combine(view, a, h, num_blocks, stream));
}

}  // namespace
}  // namespace jax_ep

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpInternodeDispatch, jax_ep::DispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()            // x [T, H] (bf16 / f32 / fp8)
                                  .Arg<ffi::AnyBuffer>()            // scales [T, S] f32 (placeholder [T, 1] unless fp8)
                                  .Arg<ffi::Buffer<ffi::S32>>()     // topk_idx [T, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()     // topk_weights [T, K]
                                  .Attr<int64_t>("uid")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("expert_alignment")
                                  .Ret<ffi::AnyBuffer>()            // x [C, H]
                                  .Ret<ffi::AnyBuffer>()            // scales [C, S]
                                  .Ret<ffi::Buffer<ffi::S32>>()     // topk_idx [C, K] (local)
                                  .Ret<ffi::Buffer<ffi::F32>>()     // topk_weights [C, K]
                                  .Ret<ffi::Buffer<ffi::S32>>()     // tokens_per_expert [E_loc]
                                  .Ret<ffi::Buffer<ffi::S32>>()     // stats [4]
                                  .Ret<ffi::Buffer<ffi::PRED>>()    // is_token_in_rank [T, R]
                                  .Ret<ffi::Buffer<ffi::S32>>()     // send_slot [T, R]
                                  .Ret<ffi::Buffer<ffi::S32>>()     // recv_src [C]
                                  .Ret<ffi::Buffer<ffi::S32>>()     // node_slot [T, nodes]
                                  .Ret<ffi::Buffer<ffi::S32>>()     // recv_fwd [C]
                                  .Ret<ffi::Buffer<ffi::S32>>()     // fwd_src [nodes * T_max]
                                  .Ret<ffi::Buffer<ffi::S32>>(),    // fwd_mask [nodes * T_max]
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpInternodeCachedDispatch, jax_ep::CachedDispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()            // x [T, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // send_slot [T, R]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // recv_src [C]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // stats [4]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // node_slot [T, nodes]
                                  .Attr<int64_t>("uid")
                                  .Ret<ffi::AnyBuffer>(),           // x [C, D]
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpInternodeCombine, jax_ep::CombineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()            // y [C, D] bf16 / f32
                                  .Arg<ffi::Buffer<ffi::S32>>()     // send_slot [T, R]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // recv_src [C]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // stats [4]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // node_slot [T, nodes]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // recv_fwd [C]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // fwd_src [nodes * T_max]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // fwd_mask [nodes * T_max]
                                  .Attr<int64_t>("uid")
                                  .Ret<ffi::AnyBuffer>(),           // out [T, D] f32 or bf16
                              {ffi::Traits::kCmdBufferCompatible});
