// Cross-rank signalling primitives (device code): system-scope acquire/release flags, a bounded spin
// that reports which rank it waited for, and L1-bypassing loads for memory that peers write.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "cuda/intranode.cuh"

namespace jax_ep {

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Read-only input (never written during the kernel): the non-coherent path.
__device__ __forceinline__ int4 ld_nc(const int4* p) { return __ldg(p); }

// Written by peers during the op: bypass L1 so a line cached earlier is never reused.
template <typename T>
__device__ __forceinline__ T ld_peer_written(const T* p) {
  return __ldcg(p);
}

// Spin until *flag >= target. After timeout_ns, record {phase + 1, rank, peer} in the host-mapped
// diagnostic word (first timeout wins), print it, and trap: the call fails instead of hanging.
__device__ __forceinline__ void wait_flag_geq(const PeerView& v, const uint64_t* flag, uint64_t target,
                                              int peer, int phase) {
  if (ld_acquire_sys(flag) >= target) return;
  const uint64_t start = global_timer_ns();
  while (ld_acquire_sys(flag) < target) {
    if (global_timer_ns() - start > v.timeout_ns) {
      if (v.diag != nullptr && atomicCAS_system(&v.diag[0], 0, phase + 1) == 0) {
        v.diag[1] = v.rank;
        v.diag[2] = peer;
        __threadfence_system();
      }
      printf("jax_ep: rank %d timed out after %.1f s waiting for rank %d (phase %d, epoch %llu)\n", v.rank,
             v.timeout_ns * 1e-9, peer, phase, static_cast<unsigned long long>(target));
      __trap();
    }
  }
}

template <typename T>
__device__ __forceinline__ T* field(uint8_t* base, size_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

}  // namespace jax_ep
