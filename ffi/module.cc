// nanobind module jax_ep._C: hands the XLA FFI handlers to Python.
//
//   registrations() -> {target_name: PyCapsule(XLA_FFI_Handler*)}
//   build_info()    -> {str: str} (what this extension was built with)
//
// jax_ep/_cuda.py registers each capsule with
// jax.ffi.register_ffi_target(name, capsule, platform="CUDA").

#include <cuda_runtime_api.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>
#include <type_traits>

#include "cuda/fast_divmod.cuh"
#include "cuda/low_latency.cuh"
#include "ffi/handlers.h"
#include "ffi/nvshmem_transport.h"
#include "ffi/runtime.h"
#include "xla/ffi/api/c_api.h"

#if __has_include("non_abi/nvshmem_version.h")
#include "non_abi/nvshmem_version.h"
#endif

namespace nb = nanobind;

#define JAX_EP_STR_(x) #x
#define JAX_EP_STR(x) JAX_EP_STR_(x)

#ifndef JAX_EP_CUDA_ARCHS
#define JAX_EP_CUDA_ARCHS "unknown"
#endif
#ifndef JAX_EP_BUILD_JAXLIB_VERSION
#define JAX_EP_BUILD_JAXLIB_VERSION "unknown"
#endif
#ifndef JAX_EP_CUDA_COMPILER_VERSION
#define JAX_EP_CUDA_COMPILER_VERSION "unknown"
#endif

namespace {

template <typename Fn>
nb::capsule Capsule(Fn* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, Fn, XLA_FFI_CallFrame*>,
                "not an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

nb::dict Registrations() {
  nb::dict d;
  d[nb::str("jax_ep_get_dispatch_layout")] = Capsule(JaxEpGetDispatchLayout);
  d[nb::str("jax_ep_dispatch")] = Capsule(JaxEpDispatch);
  d[nb::str("jax_ep_cached_dispatch")] = Capsule(JaxEpCachedDispatch);
  d[nb::str("jax_ep_combine")] = Capsule(JaxEpCombine);
  d[nb::str("jax_ep_internode_dispatch")] = Capsule(JaxEpInternodeDispatch);
  d[nb::str("jax_ep_internode_cached_dispatch")] = Capsule(JaxEpInternodeCachedDispatch);
  d[nb::str("jax_ep_internode_combine")] = Capsule(JaxEpInternodeCombine);
  d[nb::str("jax_ep_ll_dispatch_send")] = Capsule(JaxEpLowLatencyDispatchSend);
  d[nb::str("jax_ep_ll_dispatch_recv")] = Capsule(JaxEpLowLatencyDispatchRecv);
  d[nb::str("jax_ep_ll_combine_send")] = Capsule(JaxEpLowLatencyCombineSend);
  d[nb::str("jax_ep_ll_combine_recv")] = Capsule(JaxEpLowLatencyCombineRecv);
  d[nb::str("jax_ep_ll_dispatch")] = Capsule(JaxEpLowLatencyDispatch);
  d[nb::str("jax_ep_ll_combine")] = Capsule(JaxEpLowLatencyCombine);
  return d;
}

nb::dict BuildInfo() {
  nb::dict d;
  auto set = [&d](const char* key, const std::string& value) {
    d[key] = nb::str(value.c_str(), value.size());
  };
  set("cuda_archs", JAX_EP_CUDA_ARCHS);
  set("cuda_runtime_version", std::to_string(CUDART_VERSION / 1000) + "." +
                                  std::to_string((CUDART_VERSION % 1000) / 10));
  set("cuda_compiler_version", JAX_EP_CUDA_COMPILER_VERSION);
#ifdef NVSHMEM_VENDOR_MAJOR_VERSION
  set("nvshmem_version", JAX_EP_STR(NVSHMEM_VENDOR_MAJOR_VERSION) "." JAX_EP_STR(
                             NVSHMEM_VENDOR_MINOR_VERSION) "." JAX_EP_STR(
                             NVSHMEM_VENDOR_PATCH_VERSION));
#else
  set("nvshmem_version", "unknown");
#endif
  set("xla_ffi_api_version",
      JAX_EP_STR(XLA_FFI_API_MAJOR) "." JAX_EP_STR(XLA_FFI_API_MINOR));
  set("jaxlib_version", JAX_EP_BUILD_JAXLIB_VERSION);  // source of the XLA FFI headers
  return d;
}

struct Layouts {
  jax_ep::IntranodeLayout intranode;
  jax_ep::LowLatencyLayout low_latency;
  size_t total() const { return low_latency.enabled ? low_latency.end : intranode.total; }
};

// ll_num_experts = 0: no low-latency area. num_nodes > 1: internode mode (nodes of num_ranks / num_nodes ranks).
Layouts Layout(int num_ranks, int capacity, int max_tokens, int num_topk, int max_row_bytes, int max_scale_bytes,
               int ll_num_experts, int ll_hidden, int num_nodes = 1) {
  if (num_ranks < 1 || num_ranks > jax_ep::kMaxPeers) {
    throw std::invalid_argument("jax_ep: the intranode kernels support 1.." + std::to_string(jax_ep::kMaxPeers) +
                                " ranks, got " + std::to_string(num_ranks));
  }
  if (capacity < 1 || max_tokens < 1 || num_topk < 1 || num_topk > 32 || max_row_bytes < 4 || max_scale_bytes < 0) {
    throw std::invalid_argument("jax_ep: invalid intranode buffer configuration (1 <= K <= 32)");
  }
  // Kernels index with 32-bit ints: slot * K, rank * T_max + t, t * K.
  const int64_t limit = std::numeric_limits<int32_t>::max();
  if (int64_t{capacity} * num_topk >= limit || int64_t{num_ranks} * max_tokens >= limit ||
      int64_t{max_tokens} * num_topk >= limit || int64_t{max_tokens} * num_ranks >= limit) {
    throw std::invalid_argument("jax_ep: buffer too large for 32-bit row indices");
  }
  if (num_nodes < 1 || num_ranks % num_nodes || (num_nodes > 1 && num_ranks / num_nodes > 31)) {
    throw std::invalid_argument("jax_ep: internode mode needs num_ranks divisible by the node count and at most 31 "
                                "ranks per node (got " + std::to_string(num_ranks) + " ranks, " +
                                std::to_string(num_nodes) + " nodes)");
  }
  if (num_nodes > 1 && ll_num_experts > 0) {
    throw std::invalid_argument("jax_ep: a Buffer spanning several nodes has no low-latency mode yet");
  }
  Layouts l;
  l.intranode = jax_ep::make_intranode_layout(num_ranks, capacity, max_tokens, num_topk, max_row_bytes,
                                              max_scale_bytes, num_nodes);
  if (ll_num_experts > 0) {
    if (ll_num_experts % num_ranks || ll_hidden < 8 || ll_hidden % 8) {
      throw std::invalid_argument("jax_ep: low-latency mode needs num_experts % num_ranks == 0 and hidden % 8 == 0");
    }
    if (max_tokens > jax_ep::kLowLatencyMaxTokens) {
      throw std::invalid_argument("jax_ep: low-latency mode needs max_tokens_per_rank <= " +
                                  std::to_string(jax_ep::kLowLatencyMaxTokens) + " (got " +
                                  std::to_string(max_tokens) + "): use fewer tokens per rank for decode");
    }
    if (ll_hidden > jax_ep::kLowLatencyMaxHidden) {
      throw std::invalid_argument("jax_ep: low-latency mode needs hidden <= " +
                                  std::to_string(jax_ep::kLowLatencyMaxHidden) + " (got " + std::to_string(ll_hidden) +
                                  "): the dispatch send stages a token's row in shared memory");
    }
  }
  l.low_latency = jax_ep::make_low_latency_layout(l.intranode.total, num_ranks, ll_num_experts, max_tokens, num_topk,
                                                  ll_hidden);
  return l;
}

std::tuple<uintptr_t, nb::bytes, size_t> IntranodeAlloc(int64_t uid, int device, int num_ranks, int capacity,
                                                        int max_tokens, int num_topk, int max_row_bytes,
                                                        int max_scale_bytes, int ll_num_experts, int ll_hidden,
                                                        bool symmetric, int num_nodes) {
  const Layouts l = Layout(num_ranks, capacity, max_tokens, num_topk, max_row_bytes, max_scale_bytes, ll_num_experts,
                           ll_hidden, num_nodes);
  if (num_nodes > 1 && !symmetric) {
    throw std::invalid_argument("jax_ep: internode mode reaches other nodes through NVSHMEM: the Buffer's memory "
                                "must come from the symmetric heap (JAX_EP_TRANSPORT=nvshmem)");
  }
  auto r = jax_ep::runtime_alloc(uid, device, l.intranode, l.low_latency, l.total(), symmetric);
  return {r.ptr, nb::bytes(r.ipc_handle.data(), r.ipc_handle.size()), r.bytes};
}

void IntranodeOpen(int64_t uid, int device, int rank, const std::vector<uintptr_t>& ptrs,
                   const std::vector<nb::bytes>& handles, const std::vector<int>& peer_devices, double timeout_s,
                   int num_blocks, uint64_t same_gpu) {
  std::vector<std::string> h;
  for (const auto& b : handles) h.emplace_back(b.c_str(), b.size());
  jax_ep::runtime_open(uid, device, rank, ptrs, h, peer_devices, timeout_s, num_blocks, same_gpu);
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "jax_ep CUDA extension: XLA FFI handlers for expert-parallel communication";
  m.def("registrations", &Registrations,
        "Dict {target_name: PyCapsule} of the XLA FFI handlers (platform CUDA).");
  m.def("build_info", &BuildInfo,
        "Dict describing how this extension was built (CUDA archs, versions).");
  m.def("fast_divide",
        [](int divisor, const std::vector<int64_t>& numerators) {
          if (divisor < 1) throw nb::value_error("fast_divide: divisor must be >= 1");
          const jax_ep::FastDivmod d(divisor);
          std::vector<int64_t> quotients;
          quotients.reserve(numerators.size());
          for (int64_t n : numerators) {
            if (n < 0 || n > std::numeric_limits<int32_t>::max()) {
              throw nb::value_error("fast_divide: numerators must be in [0, 2^31)");
            }
            quotients.push_back(d.div(static_cast<int>(n)));
          }
          return quotients;
        },
        nb::arg("divisor"), nb::arg("numerators"),
        "n // divisor for each n by the kernels' host-computed divisor (cuda/fast_divmod.cuh), for tests.");
  m.def("intranode_bytes",
        [](int num_ranks, int capacity, int max_tokens, int num_topk, int max_row_bytes, int max_scale_bytes,
           int ll_num_experts, int ll_hidden, int num_nodes) {
          return Layout(num_ranks, capacity, max_tokens, num_topk, max_row_bytes, max_scale_bytes, ll_num_experts,
                        ll_hidden, num_nodes)
              .total();
        },
        nb::arg("num_ranks"), nb::arg("capacity"), nb::arg("max_tokens"), nb::arg("num_topk"),
        nb::arg("max_row_bytes"), nb::arg("max_scale_bytes"), nb::arg("ll_num_experts") = 0, nb::arg("ll_hidden") = 0,
        nb::arg("num_nodes") = 1,
        "Bytes of one rank's intranode communication memory for this configuration.");
  m.def("intranode_alloc", &IntranodeAlloc, nb::arg("uid"), nb::arg("device"), nb::arg("num_ranks"),
        nb::arg("capacity"), nb::arg("max_tokens"), nb::arg("num_topk"), nb::arg("max_row_bytes"),
        nb::arg("max_scale_bytes"), nb::arg("ll_num_experts") = 0, nb::arg("ll_hidden") = 0,
        nb::arg("symmetric") = false, nb::arg("num_nodes") = 1,
        "Allocate (cudaMalloc, zeroed) this rank's communication memory: (pointer, CUDA IPC handle, bytes).");
  m.def("intranode_open", &IntranodeOpen, nb::arg("uid"), nb::arg("device"), nb::arg("rank"), nb::arg("ptrs"),
        nb::arg("handles"), nb::arg("peer_devices"), nb::arg("timeout_s"), nb::arg("num_blocks"),
        nb::arg("same_gpu") = 0,
        "Build the peer table (in-process pointers or IPC handles) and make the buffer usable by the kernels. "
        "same_gpu: bit r when rank r's memory is on this rank's GPU.");
  m.def("intranode_open_symmetric", &jax_ep::runtime_open_symmetric, nb::arg("uid"), nb::arg("device"),
        nb::arg("rank"), nb::arg("peer_pes"), nb::arg("timeout_s"), nb::arg("num_blocks"), nb::arg("same_gpu") = 0,
        "Peer table of an NVSHMEM-allocated buffer (nvshmem_ptr of every rank's PE).");
  m.def("device_uuid", [](int device) {
          const std::string id = jax_ep::device_uuid(device);
          return nb::bytes(id.data(), id.size());
        },
        nb::arg("device"), "The CUDA device's 16-byte UUID (ranks sharing a GPU have the same).");
  m.def("nvshmem_unique_id", []() {
          const std::string id = jax_ep::nvshmem_unique_id();
          return nb::bytes(id.data(), id.size());
        },
        "A fresh NVSHMEM unique id (make it on one process, hand it to all).");
  m.def("nvshmem_bootstrap", [](int device, int pe, int num_pes, nb::bytes unique_id, size_t heap_bytes) {
          jax_ep::nvshmem_bootstrap(device, pe, num_pes, std::string(unique_id.c_str(), unique_id.size()), heap_bytes);
        },
        nb::arg("device"), nb::arg("pe"), nb::arg("num_pes"), nb::arg("unique_id"), nb::arg("heap_bytes"),
        "Initialise NVSHMEM for this process (once) with a symmetric heap of at least heap_bytes.");
  m.def("nvshmem_ready", &jax_ep::nvshmem_ready, "Whether this process has initialised NVSHMEM.");
  m.def("intranode_unmap", &jax_ep::runtime_unmap, nb::arg("uid"),
        "Close phase 1: wait for this process's work, unmap the peers, mark the buffer dead.");
  m.def("intranode_free", &jax_ep::runtime_free, nb::arg("uid"),
        "Close phase 2 (after every process unmapped): free this process's communication memory.");
  m.def("low_latency_kernel_times", &jax_ep::runtime_low_latency_times, nb::arg("uid"), nb::arg("device"),
        nb::arg("reset") = false,
        "Kernel-side low-latency times: [ns, launches] x (dispatch send, dispatch recv, combine send, combine "
        "recv) since the last reset. Synchronises the device.");
  m.def("intranode_diagnostics", &jax_ep::runtime_diagnostics, nb::arg("uid"),
        "The first device-side timeout recorded for this buffer ('' if none).");
}
