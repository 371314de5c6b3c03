// XLA FFI handlers of the low-latency (decode) mode, one per phase: jax_ep_ll_dispatch_send / _recv and
// jax_ep_ll_combine_send / _recv, plus jax_ep_ll_dispatch / jax_ep_ll_combine that launch both phases in
// one call. Each checks shapes against the Buffer's low-latency area (attribute `uid`) and launches
// (cuda/low_latency.cu). The send -> receive pairing travels in a device-side ticket, so no handler keeps
// state between calls: command-buffer safe, no host synchronisation.
//
// Why the one-call ops: XLA orders custom calls only by data. Two independent dispatches written as
// send/recv pairs may be scheduled send, send, send, recv, ...: a third result in flight, which the
// kernels must refuse. One call per op keeps its two phases together whatever the schedule.

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "cuda/low_latency.cuh"
#include "ffi/handler_errors.h"
#include "ffi/handlers.h"
#include "ffi/runtime.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_ep {
namespace {

constexpr const char* kDispatchSend = "jax_ep_ll_dispatch_send";
constexpr const char* kDispatchRecv = "jax_ep_ll_dispatch_recv";
constexpr const char* kCombineSend = "jax_ep_ll_combine_send";
constexpr const char* kCombineRecv = "jax_ep_ll_combine_recv";
constexpr const char* kDispatch = "jax_ep_ll_dispatch";
constexpr const char* kCombine = "jax_ep_ll_combine";

// Whether buffer b (typed or not) has exactly these dimensions.
template <typename B>
bool Dims(const B& b, std::initializer_list<int64_t> want) {
  const auto d = b.dimensions();
  if (d.size() != want.size()) return false;
  size_t i = 0;
  for (int64_t w : want) {
    if (d[i++] != w) return false;
  }
  return true;
}

// The view of (uid, device) with a low-latency area; false with `error` otherwise.
bool LowLatencyView(const char* target, int64_t uid, int32_t device, PeerView* view, int* num_blocks,
                    ffi::Error* error) {
  std::string why;
  if (!runtime_view(uid, device, view, num_blocks, &why)) {
    *error = Fail(target, why);
    return false;
  }
  if (!view->ll.enabled) {
    *error = Fail(target, "the Buffer was built without low_latency=True");
    return false;
  }
  return true;
}

// Checks the send's operands against the buffer and fills its launch arguments (the ticket comes from the caller).
ffi::Error DispatchSendArgsOf(const char* target, const LowLatencyLayout& l, ffi::AnyBuffer x,
                              ffi::Buffer<ffi::S32> topk_idx, int64_t use_fp8, int64_t round_scale, int64_t use_ue8m0,
                              LowLatencyDispatchSendArgs* a) {
  const auto xd = x.dimensions();
  if (x.element_type() != ffi::DataType::BF16 || xd.size() != 2 || xd[1] != l.hidden || xd[0] > l.max_tokens) {
    return Fail(target, "x must be bfloat16 [T <= " + std::to_string(l.max_tokens) + ", " + std::to_string(l.hidden) +
                            "]");
  }
  if (!Dims(topk_idx, {xd[0], l.num_topk})) return Fail(target, "topk_idx must be int32 [T, num_topk]");
  if ((use_fp8 && l.hidden % 128) || (use_ue8m0 && !use_fp8)) {
    return Fail(target, "fp8 needs hidden % 128 == 0; use_ue8m0 needs use_fp8");
  }
  a->x = x.untyped_data();
  a->topk_idx = topk_idx.typed_data();
  a->num_tokens = static_cast<int>(xd[0]);
  a->use_fp8 = use_fp8 != 0;
  a->round_scale = round_scale != 0 || use_ue8m0 != 0;
  a->use_ue8m0 = use_ue8m0 != 0;
  return ffi::Error::Success();
}

// The same for the receive's results.
ffi::Error DispatchRecvArgsOf(const char* target, const LowLatencyLayout& l, int64_t use_fp8, int64_t use_ue8m0,
                              ffi::Result<ffi::AnyBuffer> out_x, ffi::Result<ffi::AnyBuffer> out_scales,
                              ffi::ResultBuffer<ffi::S32> count, ffi::ResultBuffer<ffi::S32> src_info,
                              ffi::ResultBuffer<ffi::S32> layout_range, ffi::ResultBuffer<ffi::S32> recv_k,
                              ffi::ResultBuffer<ffi::S32> own_bits, LowLatencyDispatchRecvArgs* a) {
  const int64_t E_loc = l.local_experts(), S = int64_t{l.num_ranks} * l.max_tokens, H = l.hidden;
  const auto want_x = use_fp8 ? ffi::DataType::F8E4M3FN : ffi::DataType::BF16;
  const int64_t words = use_fp8 ? low_latency_scale_words(l.hidden, use_ue8m0 != 0) : 0;
  if (out_x->element_type() != want_x || !Dims(*out_x, {E_loc, S, H}) ||
      (use_fp8 && !Dims(*out_scales, {E_loc, S, words})) || !Dims(*count, {E_loc}) ||
      !Dims(*src_info, {E_loc, S}) || !Dims(*layout_range, {E_loc, l.num_ranks}) || !Dims(*recv_k, {E_loc, S}) ||
      !Dims(*own_bits, {E_loc, l.token_words()})) {
    return Fail(target, "result shapes do not match the buffer's low-latency configuration");
  }
  a->use_fp8 = use_fp8 != 0;
  a->use_ue8m0 = use_ue8m0 != 0;
  a->out_x = out_x->untyped_data();
  a->out_scales = use_fp8 ? out_scales->untyped_data() : nullptr;
  a->out_count = count->typed_data();
  a->out_src_info = src_info->typed_data();
  a->out_layout_range = layout_range->typed_data();
  a->out_recv_k = recv_k->typed_data();
  a->out_own_bits = reinterpret_cast<uint32_t*>(own_bits->typed_data());
  return ffi::Error::Success();
}

ffi::Error DispatchSendImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> topk_idx,
                            int64_t uid, int64_t use_fp8, int64_t round_scale, int64_t use_ue8m0,
                            ffi::ResultBuffer<ffi::U32> ticket) {
  PeerView view;
  int num_blocks = 0;
  ffi::Error error;
  if (!LowLatencyView(kDispatchSend, uid, device, &view, &num_blocks, &error)) return error;
  LowLatencyDispatchSendArgs a;
  error = DispatchSendArgsOf(kDispatchSend, view.ll, x, topk_idx, use_fp8, round_scale, use_ue8m0, &a);
  if (error.failure()) return error;
  if (ticket->element_count() != 2) return Fail(kDispatchSend, "ticket must be uint32 [2]");
  a.ticket = ticket->typed_data();
  return Launched(kDispatchSend, launch_low_latency_dispatch_send(view, a, num_blocks, stream));
}

ffi::Error DispatchRecvImpl(cudaStream_t stream, int32_t device, ffi::Buffer<ffi::U32> ticket, int64_t uid,
                            int64_t use_fp8, int64_t use_ue8m0, ffi::Result<ffi::AnyBuffer> out_x,
                            ffi::Result<ffi::AnyBuffer> out_scales, ffi::ResultBuffer<ffi::S32> count,
                            ffi::ResultBuffer<ffi::S32> src_info, ffi::ResultBuffer<ffi::S32> layout_range,
                            ffi::ResultBuffer<ffi::S32> recv_k, ffi::ResultBuffer<ffi::S32> own_bits) {
  PeerView view;
  int num_blocks = 0;
  ffi::Error error;
  if (!LowLatencyView(kDispatchRecv, uid, device, &view, &num_blocks, &error)) return error;
  if (ticket.element_count() != 2) return Fail(kDispatchRecv, "ticket must be uint32 [2]");
  LowLatencyDispatchRecvArgs a;
  error = DispatchRecvArgsOf(kDispatchRecv, view.ll, use_fp8, use_ue8m0, out_x, out_scales, count, src_info,
                             layout_range, recv_k, own_bits, &a);
  if (error.failure()) return error;
  a.ticket = ticket.typed_data();
  return Launched(kDispatchRecv, launch_low_latency_dispatch_recv(view, a, num_blocks, stream));
}

// Send and receive of one dispatch in one call; `ticket` is the pair's scratch word.
ffi::Error DispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> topk_idx,
                        int64_t uid, int64_t use_fp8, int64_t round_scale, int64_t use_ue8m0,
                        ffi::ResultBuffer<ffi::U32> ticket, ffi::Result<ffi::AnyBuffer> out_x,
                        ffi::Result<ffi::AnyBuffer> out_scales, ffi::ResultBuffer<ffi::S32> count,
                        ffi::ResultBuffer<ffi::S32> src_info, ffi::ResultBuffer<ffi::S32> layout_range,
                        ffi::ResultBuffer<ffi::S32> recv_k, ffi::ResultBuffer<ffi::S32> own_bits) {
  PeerView view;
  int num_blocks = 0;
  ffi::Error error;
  if (!LowLatencyView(kDispatch, uid, device, &view, &num_blocks, &error)) return error;
  LowLatencyDispatchSendArgs send;
  error = DispatchSendArgsOf(kDispatch, view.ll, x, topk_idx, use_fp8, round_scale, use_ue8m0, &send);
  if (error.failure()) return error;
  LowLatencyDispatchRecvArgs recv;
  error = DispatchRecvArgsOf(kDispatch, view.ll, use_fp8, use_ue8m0, out_x, out_scales, count, src_info, layout_range,
                             recv_k, own_bits, &recv);
  if (error.failure()) return error;
  if (ticket->element_count() != 2) return Fail(kDispatch, "ticket must be uint32 [2]");
  send.ticket = ticket->typed_data();
  recv.ticket = ticket->typed_data();
  error = Launched(kDispatch, launch_low_latency_dispatch_send(view, send, num_blocks, stream));
  if (error.failure()) return error;
  return Launched(kDispatch, launch_low_latency_dispatch_recv(view, recv, num_blocks, stream));
}

ffi::Error CombineSendArgsOf(const char* target, const LowLatencyLayout& l, ffi::AnyBuffer y,
                             ffi::Buffer<ffi::S32> src_info, ffi::Buffer<ffi::S32> layout_range,
                             ffi::Buffer<ffi::S32> recv_k, LowLatencyCombineSendArgs* a) {
  const int64_t E_loc = l.local_experts(), S = int64_t{l.num_ranks} * l.max_tokens;
  if (y.element_type() != ffi::DataType::BF16 || !Dims(y, {E_loc, S, l.hidden})) {
    return Fail(target, "y must be bfloat16 [E_loc, R * T_max, H] of the buffer");
  }
  if (!Dims(src_info, {E_loc, S}) || !Dims(layout_range, {E_loc, l.num_ranks}) || !Dims(recv_k, {E_loc, S})) {
    return Fail(target, "handle shapes do not match the buffer");
  }
  a->y = y.untyped_data();
  a->src_info = src_info.typed_data();
  a->layout_range = layout_range.typed_data();
  a->recv_k = recv_k.typed_data();
  return ffi::Error::Success();
}

ffi::Error CombineRecvArgsOf(const char* target, const LowLatencyLayout& l, ffi::AnyBuffer y,
                             ffi::Buffer<ffi::S32> layout_range, ffi::Buffer<ffi::S32> own_bits,
                             ffi::Buffer<ffi::S32> topk_idx,
                             ffi::Buffer<ffi::F32> topk_weights, ffi::Result<ffi::AnyBuffer> out,
                             LowLatencyCombineRecvArgs* a) {
  const int64_t E_loc = l.local_experts(), S = int64_t{l.num_ranks} * l.max_tokens;
  if (y.element_type() != ffi::DataType::BF16 || !Dims(y, {E_loc, S, l.hidden})) {
    return Fail(target, "y must be bfloat16 [E_loc, R * T_max, H] of the buffer");
  }
  if (!Dims(layout_range, {E_loc, l.num_ranks}) || !Dims(own_bits, {E_loc, l.token_words()})) {
    return Fail(target, "handle shapes do not match the buffer");
  }
  const auto d = topk_idx.dimensions();
  if (d.size() != 2 || d[0] > l.max_tokens || d[1] != l.num_topk || !Dims(topk_weights, {d[0], d[1]})) {
    return Fail(target, "topk_idx / topk_weights must be [T <= T_max, num_topk]");
  }
  if (out->element_type() != ffi::DataType::BF16 || !Dims(*out, {d[0], l.hidden})) {
    return Fail(target, "result shape does not match the buffer");
  }
  a->y = y.untyped_data();
  a->layout_range = layout_range.typed_data();
  a->own_bits = reinterpret_cast<const uint32_t*>(own_bits.typed_data());
  a->topk_idx = topk_idx.typed_data();
  a->topk_weights = topk_weights.typed_data();
  a->num_tokens = static_cast<int>(d[0]);
  a->out = out->untyped_data();
  return ffi::Error::Success();
}

ffi::Error CombineSendImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y, ffi::Buffer<ffi::S32> src_info,
                           ffi::Buffer<ffi::S32> layout_range, ffi::Buffer<ffi::S32> recv_k, int64_t uid,
                           ffi::ResultBuffer<ffi::U32> ticket) {
  PeerView view;
  int num_blocks = 0;
  ffi::Error error;
  if (!LowLatencyView(kCombineSend, uid, device, &view, &num_blocks, &error)) return error;
  LowLatencyCombineSendArgs a;
  error = CombineSendArgsOf(kCombineSend, view.ll, y, src_info, layout_range, recv_k, &a);
  if (error.failure()) return error;
  if (ticket->element_count() != 2) return Fail(kCombineSend, "ticket must be uint32 [2]");
  a.ticket = ticket->typed_data();
  return Launched(kCombineSend, launch_low_latency_combine_send(view, a, num_blocks, stream));
}

ffi::Error CombineRecvImpl(cudaStream_t stream, int32_t device, ffi::Buffer<ffi::U32> ticket, ffi::AnyBuffer y,
                           ffi::Buffer<ffi::S32> layout_range, ffi::Buffer<ffi::S32> own_bits,
                           ffi::Buffer<ffi::S32> topk_idx,
                           ffi::Buffer<ffi::F32> topk_weights, int64_t uid, ffi::Result<ffi::AnyBuffer> out) {
  PeerView view;
  int num_blocks = 0;
  ffi::Error error;
  if (!LowLatencyView(kCombineRecv, uid, device, &view, &num_blocks, &error)) return error;
  if (ticket.element_count() != 2) return Fail(kCombineRecv, "ticket must be uint32 [2]");
  LowLatencyCombineRecvArgs a;
  error = CombineRecvArgsOf(kCombineRecv, view.ll, y, layout_range, own_bits, topk_idx, topk_weights, out, &a);
  if (error.failure()) return error;
  a.ticket = ticket.typed_data();
  return Launched(kCombineRecv, launch_low_latency_combine_recv(view, a, num_blocks, stream));
}

// Send and receive of one combine in one call; `ticket` is the pair's scratch word.
ffi::Error CombineImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y, ffi::Buffer<ffi::S32> src_info,
                       ffi::Buffer<ffi::S32> layout_range, ffi::Buffer<ffi::S32> recv_k,
                       ffi::Buffer<ffi::S32> own_bits, ffi::Buffer<ffi::S32> topk_idx,
                       ffi::Buffer<ffi::F32> topk_weights, int64_t uid,
                       ffi::ResultBuffer<ffi::U32> ticket, ffi::Result<ffi::AnyBuffer> out) {
  PeerView view;
  int num_blocks = 0;
  ffi::Error error;
  if (!LowLatencyView(kCombine, uid, device, &view, &num_blocks, &error)) return error;
  LowLatencyCombineSendArgs send;
  error = CombineSendArgsOf(kCombine, view.ll, y, src_info, layout_range, recv_k, &send);
  if (error.failure()) return error;
  LowLatencyCombineRecvArgs recv;
  error = CombineRecvArgsOf(kCombine, view.ll, y, layout_range, own_bits, topk_idx, topk_weights, out, &recv);
  if (error.failure()) return error;
  if (ticket->element_count() != 2) return Fail(kCombine, "ticket must be uint32 [2]");
  send.ticket = ticket->typed_data();
  recv.ticket = ticket->typed_data();
  error = Launched(kCombine, launch_low_latency_combine_send(view, send, num_blocks, stream));
  if (error.failure()) return error;
  return Launched(kCombine, launch_low_latency_combine_recv(view, recv, num_blocks, stream));
}

}  // namespace
}  // namespace jax_ep

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpLowLatencyDispatchSend, jax_ep::DispatchSendImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()            // x [T, H] bf16
                                  .Arg<ffi::Buffer<ffi::S32>>()     // topk_idx [T, K]
                                  .Attr<int64_t>("uid")
                                  .Attr<int64_t>("use_fp8")
                                  .Attr<int64_t>("round_scale")
                                  .Attr<int64_t>("use_ue8m0")
                                  .Ret<ffi::Buffer<ffi::U32>>(),    // ticket [2]
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpLowLatencyDispatchRecv, jax_ep::DispatchRecvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::Buffer<ffi::U32>>()     // ticket [2]
                                  .Attr<int64_t>("uid")
                                  .Attr<int64_t>("use_fp8")
                                  .Attr<int64_t>("use_ue8m0")
                                  .Ret<ffi::AnyBuffer>()            // x [E_loc, S, H] fp8 / bf16
                                  .Ret<ffi::AnyBuffer>()            // scales [E_loc, S, words] (fp8 only)
                                  .Ret<ffi::Buffer<ffi::S32>>()     // count [E_loc]
                                  .Ret<ffi::Buffer<ffi::S32>>()     // src_info [E_loc, S]
                                  .Ret<ffi::Buffer<ffi::S32>>()     // layout_range [E_loc, R]
                                  .Ret<ffi::Buffer<ffi::S32>>()     // recv_k [E_loc, S]
                                  .Ret<ffi::Buffer<ffi::S32>>(),    // own_bits [E_loc, W]
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpLowLatencyCombineSend, jax_ep::CombineSendImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()            // y [E_loc, S, H] bf16
                                  .Arg<ffi::Buffer<ffi::S32>>()     // src_info [E_loc, S]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // layout_range [E_loc, R]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // recv_k [E_loc, S]
                                  .Attr<int64_t>("uid")
                                  .Ret<ffi::Buffer<ffi::U32>>(),    // ticket [2]
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpLowLatencyCombineRecv, jax_ep::CombineRecvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::Buffer<ffi::U32>>()     // ticket [2]
                                  .Arg<ffi::AnyBuffer>()            // y [E_loc, S, H] bf16 (own tokens' answers)
                                  .Arg<ffi::Buffer<ffi::S32>>()     // layout_range [E_loc, R]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // own_bits [E_loc, W]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // topk_idx [T, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()     // topk_weights [T, K]
                                  .Attr<int64_t>("uid")
                                  .Ret<ffi::AnyBuffer>(),           // out [T, H] bf16
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpLowLatencyDispatch, jax_ep::DispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()            // x [T, H] bf16
                                  .Arg<ffi::Buffer<ffi::S32>>()     // topk_idx [T, K]
                                  .Attr<int64_t>("uid")
                                  .Attr<int64_t>("use_fp8")
                                  .Attr<int64_t>("round_scale")
                                  .Attr<int64_t>("use_ue8m0")
                                  .Ret<ffi::Buffer<ffi::U32>>()     // ticket [2] (scratch)
                                  .Ret<ffi::AnyBuffer>()            // x [E_loc, S, H] fp8 / bf16
                                  .Ret<ffi::AnyBuffer>()            // scales [E_loc, S, words] (fp8 only)
                                  .Ret<ffi::Buffer<ffi::S32>>()     // count [E_loc]
                                  .Ret<ffi::Buffer<ffi::S32>>()     // src_info [E_loc, S]
                                  .Ret<ffi::Buffer<ffi::S32>>()     // layout_range [E_loc, R]
                                  .Ret<ffi::Buffer<ffi::S32>>()     // recv_k [E_loc, S]
                                  .Ret<ffi::Buffer<ffi::S32>>(),    // own_bits [E_loc, W]
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpLowLatencyCombine, jax_ep::CombineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()            // y [E_loc, S, H] bf16
                                  .Arg<ffi::Buffer<ffi::S32>>()     // src_info [E_loc, S]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // layout_range [E_loc, R]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // recv_k [E_loc, S]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // own_bits [E_loc, W]
                                  .Arg<ffi::Buffer<ffi::S32>>()     // topk_idx [T, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()     // topk_weights [T, K]
                                  .Attr<int64_t>("uid")
                                  .Ret<ffi::Buffer<ffi::U32>>()     // ticket [2] (scratch)
                                  .Ret<ffi::AnyBuffer>(),           // out [T, H] bf16
                              {ffi::Traits::kCmdBufferCompatible});
