// XLA FFI handler for target "jax_ep_get_dispatch_layout".
//
//   topk_idx [T, K] s32  ->  num_tokens_per_rank [R] s32,
//                            num_tokens_per_expert [E] s32,
//                            is_token_in_rank [T, R] pred
//   attrs: num_ranks (i64) = R, num_experts (i64) = E.
//
// The handler only validates shapes/attributes and launches; the kernel
// (cuda/layout.cu) computes. No allocation, no host synchronisation: the
// handler is command-buffer (CUDA graph) compatible.

#include <cuda_runtime_api.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>

#include "cuda/layout.cuh"
#include "ffi/handlers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_ep {
namespace {

constexpr const char* kTarget = "jax_ep_get_dispatch_layout";

std::string Dims(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

ffi::Error Invalid(const std::string& what) {
  return ffi::Error::InvalidArgument(std::string(kTarget) + ": " + what);
}

ffi::Error CheckShape(const char* name, ffi::Span<const int64_t> got,
                      std::initializer_list<int64_t> want) {
  bool ok = got.size() == want.size();
  size_t i = 0;
  for (int64_t w : want) {
    if (!ok) break;
    ok = got[i++] == w;
  }
  if (ok) return ffi::Error::Success();
  std::string w = "[";
  i = 0;
  for (int64_t d : want) w += (i++ ? ", " : "") + std::to_string(d);
  return Invalid(std::string(name) + " has shape " + Dims(got) +
                 ", expected " + w + "]");
}

ffi::Error GetDispatchLayoutImpl(
    cudaStream_t stream, ffi::Buffer<ffi::S32> topk_idx, int64_t num_ranks,
    int64_t num_experts, ffi::ResultBuffer<ffi::S32> num_tokens_per_rank,
    ffi::ResultBuffer<ffi::S32> num_tokens_per_expert,
    ffi::ResultBuffer<ffi::PRED> is_token_in_rank) {
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  const auto dims = topk_idx.dimensions();
  if (dims.size() != 2) {
    return Invalid("topk_idx must have rank 2 [num_tokens, num_topk], got shape " +
                   Dims(dims));
  }
  const int64_t num_tokens = dims[0];
  const int64_t num_topk = dims[1];
  if (num_tokens > kIntMax || num_topk > kIntMax) {
    return Invalid("topk_idx shape " + Dims(dims) + " is too large");
  }
  if (num_ranks <= 0 || num_ranks > kLayoutMaxRanks) {
    return Invalid("num_ranks must be in [1, " +
                   std::to_string(kLayoutMaxRanks) + "], got " +
                   std::to_string(num_ranks));
  }
  if (num_experts <= 0 || num_experts > kIntMax) {
    return Invalid("num_experts must be positive (and < 2^31), got " +
                   std::to_string(num_experts));
  }
  if (num_experts % num_ranks != 0) {
    return Invalid("num_experts (" + std::to_string(num_experts) +
                   ") must be divisible by num_ranks (" +
                   std::to_string(num_ranks) + ")");
  }
  if (auto e = CheckShape("num_tokens_per_rank",
                          num_tokens_per_rank->dimensions(), {num_ranks});
      e.failure()) {
    return e;
  }
  if (auto e = CheckShape("num_tokens_per_expert",
                          num_tokens_per_expert->dimensions(), {num_experts});
      e.failure()) {
    return e;
  }
  if (auto e = CheckShape("is_token_in_rank", is_token_in_rank->dimensions(),
                          {num_tokens, num_ranks});
      e.failure()) {
    return e;
  }

  launch_get_dispatch_layout(
      topk_idx.typed_data(), static_cast<int>(num_tokens),
      static_cast<int>(num_topk), static_cast<int>(num_ranks),
      static_cast<int>(num_experts), num_tokens_per_rank->typed_data(),
      num_tokens_per_expert->typed_data(), is_token_in_rank->typed_data(),
      stream);
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) {
    return ffi::Error::Internal(std::string(kTarget) + ": kernel launch failed: " +
                                cudaGetErrorName(err) + ": " +
                                cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_ep

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpGetDispatchLayout, jax_ep::GetDispatchLayoutImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<ffi::Buffer<ffi::S32>>()  // topk_idx [T, K]
        .Attr<int64_t>("num_ranks")
        .Attr<int64_t>("num_experts")
        .Ret<ffi::Buffer<ffi::S32>>()    // num_tokens_per_rank [R]
        .Ret<ffi::Buffer<ffi::S32>>()    // num_tokens_per_expert [E]
        .Ret<ffi::Buffer<ffi::PRED>>(),  // is_token_in_rank [T, R]
    {ffi::Traits::kCmdBufferCompatible});
