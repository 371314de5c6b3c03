// XLA FFI handlers of the intranode normal mode: jax_ep_dispatch, jax_ep_cached_dispatch, jax_ep_combine.
// Each validates shapes against the communication buffer it names (attribute `uid`) and launches; the
// kernels (cuda/intranode.cu) compute. No allocation, no host synchronisation: command-buffer safe.

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "cuda/intranode.cuh"
#include "ffi/handler_errors.h"
#include "ffi/handlers.h"
#include "ffi/normal_args.h"
#include "ffi/runtime.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_ep {
namespace {

// Bytes of one row of a [rows, ...] buffer; -1 if not rank 2.
int64_t RowBytes(const ffi::AnyBuffer& b) {
  const auto d = b.dimensions();
  if (d.size() != 2) return -1;
  return d[1] * static_cast<int64_t>(ffi::ByteWidth(b.element_type()));
}

int64_t NumRows(const ffi::AnyBuffer& b) { return b.dimensions().size() ? b.dimensions()[0] : 0; }

constexpr const char* kDispatch = "jax_ep_dispatch";
constexpr const char* kCached = "jax_ep_cached_dispatch";
constexpr const char* kCombine = "jax_ep_combine";

}  // namespace

ffi::Error BuildDispatch(const char* target, int32_t device, ffi::AnyBuffer x, ffi::AnyBuffer scales,
                        ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> topk_weights, int64_t uid,
                        int64_t num_experts, int64_t expert_alignment, ffi::Result<ffi::AnyBuffer> out_x,
                        ffi::Result<ffi::AnyBuffer> out_scales, ffi::ResultBuffer<ffi::S32> out_idx,
                        ffi::ResultBuffer<ffi::F32> out_w, ffi::ResultBuffer<ffi::S32> tokens_per_expert,
                        ffi::ResultBuffer<ffi::S32> stats, ffi::ResultBuffer<ffi::PRED> is_token_in_rank,
                        ffi::ResultBuffer<ffi::S32> send_slot, ffi::ResultBuffer<ffi::S32> recv_src, PeerView* view_out, int* blocks_out, DispatchArgs* args_out) {
  int num_blocks = 0;
  std::string error;
  PeerView view_copy;
  if (!runtime_view(uid, device, &view_copy, &num_blocks, &error)) return Fail(target, error);
  const PeerView* view = &view_copy;
  const IntranodeLayout& l = view->layout;
  // Scales travel with fp8 rows only. Other payloads get a [T, 1] placeholder operand and a [capacity, 1]
  // result that stay untouched: a zero-sized buffer would be simpler, but XLA's GPU compiler crashes on one in
  // an eager (un-jitted) shard_map program over several devices (measured: jax 0.11.2, 2 x H200).
  const bool has_scales = x.element_type() == ffi::DataType::F8E4M3FN;
  const int64_t T = NumRows(x), row_bytes = RowBytes(x), scale_bytes = has_scales ? RowBytes(scales) : 0;
  const auto idx_dims = topk_idx.dimensions();
  if (row_bytes <= 0 || row_bytes % 4 || row_bytes > l.max_row_bytes) {
    return Fail(target, "x rows must be 2-D, a multiple of 4 bytes and at most " + std::to_string(l.max_row_bytes) +
                               " bytes, got " + std::to_string(row_bytes));
  }
  if (T > l.max_tokens) return Fail(target, std::to_string(T) + " tokens exceed max_tokens_per_rank");
  if (NumRows(scales) != T || (has_scales && (scale_bytes <= 0 || scale_bytes % 4 || scale_bytes > l.max_scale_bytes))) {
    return Fail(target, "scales must be [T, n] float32 within the buffer's scale row (fp8 x needs them)");
  }
  if (idx_dims.size() != 2 || idx_dims[0] != T || idx_dims[1] != l.num_topk ||
      topk_weights.dimensions().size() != 2 || topk_weights.dimensions()[0] != T ||
      topk_weights.dimensions()[1] != l.num_topk) {
    return Fail(target, "topk_idx / topk_weights must be [T, K] with K = the buffer's num_topk");
  }
  if (num_experts <= 0 || num_experts % l.num_ranks || expert_alignment < 1) {
    return Fail(target, "num_experts must be a positive multiple of num_ranks, expert_alignment >= 1");
  }
  if (num_experts / l.num_ranks > 12288) {  // per-expert counters live in 48 KB of shared memory
    return Fail(target, "at most 12288 experts per rank");
  }
  if (scales.element_type() != ffi::DataType::F32 && scale_bytes > 0) {
    return Fail(target, "scales must be float32");
  }
  const auto oi = out_idx->dimensions(), ow = out_w->dimensions();
  if (oi.size() != 2 || oi[0] != l.capacity || oi[1] != l.num_topk || ow.size() != 2 || ow[0] != l.capacity ||
      ow[1] != l.num_topk || is_token_in_rank->element_count() != static_cast<size_t>(T * l.num_ranks)) {
    return Fail(target, "topk results must be [capacity, K] and is_token_in_rank [T, R]");
  }
  if (NumRows(*out_x) != l.capacity || RowBytes(*out_x) != row_bytes ||
      (has_scales && (NumRows(*out_scales) != l.capacity || RowBytes(*out_scales) != scale_bytes)) ||
      tokens_per_expert->element_count() != static_cast<size_t>(num_experts / l.num_ranks) ||
      stats->element_count() != 4 || send_slot->element_count() != static_cast<size_t>(T * l.num_ranks) ||
      recv_src->element_count() != static_cast<size_t>(l.capacity)) {
    return Fail(target, "result shapes do not match the buffer's capacity / ranks");
  }
  DispatchArgs a;
  a.in.x = x.untyped_data();
  a.in.row_bytes = static_cast<int>(row_bytes);
  a.in.scales = scale_bytes > 0 ? scales.untyped_data() : nullptr;
  a.in.scale_bytes = static_cast<int>(scale_bytes);
  a.topk_idx = topk_idx.typed_data();
  a.topk_weights = topk_weights.typed_data();
  a.num_tokens = static_cast<int>(T);
  a.num_experts = static_cast<int>(num_experts);
  a.expert_alignment = static_cast<int>(expert_alignment);
  a.out_x = out_x->untyped_data();
  a.out_scales = scale_bytes > 0 ? out_scales->untyped_data() : nullptr;
  a.out_idx = out_idx->typed_data();
  a.out_w = out_w->typed_data();
  a.out_tokens_per_expert = tokens_per_expert->typed_data();
  a.out_stats = stats->typed_data();
  a.is_token_in_rank = is_token_in_rank->typed_data();
  a.send_slot = send_slot->typed_data();
  a.recv_src = recv_src->typed_data();
  *view_out = view_copy;
  *blocks_out = num_blocks;
  *args_out = a;
  return ffi::Error::Success();
}

ffi::Error BuildCachedDispatch(const char* target, int32_t device, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> send_slot,
                              ffi::Buffer<ffi::S32> recv_src, ffi::Buffer<ffi::S32> stats, int64_t uid,
                              ffi::Result<ffi::AnyBuffer> out_x, PeerView* view_out, int* blocks_out, CachedDispatchArgs* args_out) {
  int num_blocks = 0;
  std::string error;
  PeerView view_copy;
  if (!runtime_view(uid, device, &view_copy, &num_blocks, &error)) return Fail(target, error);
  const PeerView* view = &view_copy;
  const IntranodeLayout& l = view->layout;
  const int64_t T = NumRows(x), row_bytes = RowBytes(x);
  if (row_bytes <= 0 || row_bytes % 4 || row_bytes > l.max_row_bytes || T > l.max_tokens) {
    return Fail(target, "x must be [T <= T_max, D] with rows a multiple of 4 bytes within the buffer's row");
  }
  const auto sd = send_slot.dimensions();
  if (sd.size() != 2 || sd[0] != T || sd[1] != l.num_ranks ||
      recv_src.element_count() != static_cast<size_t>(l.capacity) || stats.element_count() != 4 ||
      NumRows(*out_x) != l.capacity || RowBytes(*out_x) != row_bytes) {
    return Fail(target, "handle / result shapes do not match the buffer");
  }
  CachedDispatchArgs a;
  a.in.x = x.untyped_data();
  a.in.row_bytes = static_cast<int>(row_bytes);
  a.num_tokens = static_cast<int>(T);
  a.send_slot = send_slot.typed_data();
  a.recv_src = recv_src.typed_data();
  a.stats = stats.typed_data();
  a.out_x = out_x->untyped_data();
  *view_out = view_copy;
  *blocks_out = num_blocks;
  *args_out = a;
  return ffi::Error::Success();
}

ffi::Error BuildCombine(const char* target, int32_t device, ffi::AnyBuffer y, ffi::Buffer<ffi::S32> send_slot,
                       ffi::Buffer<ffi::S32> recv_src, ffi::Buffer<ffi::S32> stats, int64_t uid,
                       ffi::Result<ffi::AnyBuffer> out, PeerView* view_out, int* blocks_out, CombineArgs* args_out) {
  int num_blocks = 0;
  std::string error;
  PeerView view_copy;
  if (!runtime_view(uid, device, &view_copy, &num_blocks, &error)) return Fail(target, error);
  const PeerView* view = &view_copy;
  const IntranodeLayout& l = view->layout;
  const bool bf16 = y.element_type() == ffi::DataType::BF16;
  if (!bf16 && y.element_type() != ffi::DataType::F32) return Fail(target, "y must be bfloat16 or float32");
  const int64_t row_bytes = RowBytes(y);
  if (NumRows(y) != l.capacity || row_bytes <= 0 || row_bytes % 4 || row_bytes > l.max_row_bytes) {
    return Fail(target, "y must be [capacity, D] with rows a multiple of 4 bytes within the buffer's row");
  }
  const auto slot_dims = send_slot.dimensions();
  if (slot_dims.size() != 2 || slot_dims[1] != l.num_ranks || slot_dims[0] > l.max_tokens ||
      recv_src.element_count() != static_cast<size_t>(l.capacity) || stats.element_count() != 4) {
    return Fail(target, "handle shapes do not match the buffer");
  }
  const int64_t T = slot_dims[0], D = y.dimensions()[1];
  const bool out_bf16 = out->element_type() == ffi::DataType::BF16;
  if (out->dimensions().size() != 2 || out->dimensions()[0] != T || out->dimensions()[1] != D ||
      (!out_bf16 && out->element_type() != ffi::DataType::F32)) {
    return Fail(target, "result must be [T, D] float32 or bfloat16");
  }
  CombineArgs a;
  a.y = y.untyped_data();
  a.y_is_bf16 = bf16;
  a.row_elems = static_cast<int>(D);
  a.num_tokens = static_cast<int>(T);
  a.send_slot = send_slot.typed_data();
  a.recv_src = recv_src.typed_data();
  a.stats = stats.typed_data();
  a.out = out->untyped_data();
  a.out_is_bf16 = out_bf16;
  *view_out = view_copy;
  *blocks_out = num_blocks;
  *args_out = a;
  return ffi::Error::Success();
}

namespace {

ffi::Error DispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::AnyBuffer scales,
                        ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> topk_weights, int64_t uid,
                        int64_t num_experts, int64_t expert_alignment, ffi::Result<ffi::AnyBuffer> out_x,
                        ffi::Result<ffi::AnyBuffer> out_scales, ffi::ResultBuffer<ffi::S32> out_idx,
                        ffi::ResultBuffer<ffi::F32> out_w, ffi::ResultBuffer<ffi::S32> tokens_per_expert,
                        ffi::ResultBuffer<ffi::S32> stats, ffi::ResultBuffer<ffi::PRED> is_token_in_rank,
                        ffi::ResultBuffer<ffi::S32> send_slot, ffi::ResultBuffer<ffi::S32> recv_src) {
  PeerView view;
  int num_blocks = 0;
  DispatchArgs a;
  ffi::Error built = BuildDispatch(kDispatch, device, x, scales, topk_idx, topk_weights, uid, num_experts, expert_alignment, out_x, out_scales, out_idx, out_w, tokens_per_expert, stats, is_token_in_rank, send_slot, recv_src, &view, &num_blocks, &a);
  if (built.failure()) return built;
  if (view.layout.num_nodes > 1) return Fail(kDispatch, "this Buffer spans several nodes: use the internode ops");
  return Launched(kDispatch, launch_dispatch(view, a, num_blocks, stream));
}

ffi::Error CachedDispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> send_slot,
                              ffi::Buffer<ffi::S32> recv_src, ffi::Buffer<ffi::S32> stats, int64_t uid,
                              ffi::Result<ffi::AnyBuffer> out_x) {
  PeerView view;
  int num_blocks = 0;
  CachedDispatchArgs a;
  ffi::Error built = BuildCachedDispatch(kCached, device, x, send_slot, recv_src, stats, uid, out_x, &view, &num_blocks, &a);
  if (built.failure()) return built;
  if (view.layout.num_nodes > 1) return Fail(kCached, "this Buffer spans several nodes: use the internode ops");
  return Launched(kCached, launch_cached_dispatch(view, a, num_blocks, stream));
}

ffi::Error CombineImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y, ffi::Buffer<ffi::S32> send_slot,
                       ffi::Buffer<ffi::S32> recv_src, ffi::Buffer<ffi::S32> stats, int64_t uid,
                       ffi::Result<ffi::AnyBuffer> out) {
  PeerView view;
  int num_blocks = 0;
  CombineArgs a;
  ffi::Error built = BuildCombine(kCombine, device, y, send_slot, recv_src, stats, uid, out, &view, &num_blocks, &a);
  if (built.failure()) return built;
  if (view.layout.num_nodes > 1) return Fail(kCombine, "this Buffer spans several nodes: use the internode ops");
  return Launched(kCombine, launch_combine(view, a, num_blocks, stream));
}

}  // namespace
}  // namespace jax_ep

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpDispatch, jax_ep::DispatchImpl,
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
                                  .Ret<ffi::Buffer<ffi::S32>>(),    // recv_src [C]
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpCachedDispatch, jax_ep::CachedDispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()            // x [T, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // send_slot [T, R]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // recv_src [C]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // stats [4]
                                  .Attr<int64_t>("uid")
                                  .Ret<ffi::AnyBuffer>(),           // x [C, D]
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpCombine, jax_ep::CombineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()            // y [C, D] bf16 / f32
                                  .Arg<ffi::Buffer<ffi::S32>>()     // send_slot [T, R]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // recv_src [C]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // stats [4]
                                  .Attr<int64_t>("uid")
                                  .Ret<ffi::AnyBuffer>(),           // out [T, D] f32 or bf16
                              {ffi::Traits::kCmdBufferCompatible});
