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

// Release / acquire at GPU scope: orders this thread's memory operations for every thread of its GPU.
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

// Releasing additions to a counter another thread acquires (no value returned: no round trip).
__device__ __forceinline__ void red_release_gpu_add(uint64_t* p, uint64_t v) {
  asm volatile("red.release.gpu.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void red_release_sys_add(uint64_t* p, uint64_t v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// A GPU-coherent load (never a stale L1 line) and an addition that returns nothing, neither ordering anything else.
__device__ __forceinline__ uint64_t ld_relaxed_gpu(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void red_relaxed_gpu_add(uint64_t* p, uint64_t v) {
  asm volatile("red.relaxed.gpu.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Read-only input (never written during the kernel) that the op reads once: the non-coherent path, no L1 line kept,
// 256 B L2 fetches, and the line marked first to go from L2. The combine send's reads of y are these: its stores of
// the staged rows (read back by the peer's receive soon after) then keep their L2 lines, the y rows' go first.
// Measured on one H200, R=2 under MPS (twenty-fourth session, medians per run; 13 runs before, 15 after, side by side
// in two of the calls, where the send's median of runs went 10.18 -> 9.73 and 10.53 -> 9.98):
// combine send 9.84-10.69 -> 9.54-10.30 us (median of runs 10.42 -> 9.92), the combine 21.22-22.45 -> 20.94-21.36,
// its span 23.82-24.45 -> 23.33-23.50; without the evict-first policy (no_allocate and 256 B only, 8 runs) the combine
// was as short but the send only ~0.2 us shorter by median (9.66-10.62, median 10.02).
__device__ __forceinline__ int4 ld_read_once(const int4* p) {
  uint64_t policy;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.L2::256B.v4.s32 {%0, %1, %2, %3}, [%4], %5;"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p), "l"(policy));
  return v;
}

// Written by peers during the op: bypass L1 so a line cached earlier is never reused.
template <typename T>
__device__ __forceinline__ T ld_peer_written(const T* p) {
  return __ldcg(p);
}

// Record the first failure in the host-mapped diagnostic word and print it once. Plain volatile stores:
// system-scope atomics on host memory are not available on every host.
__device__ __forceinline__ void report_failure(const PeerView& v, int peer, int phase) {
  volatile int* d = v.diag;
  if (d != nullptr && d[0] == 0) {
    d[1] = v.rank;
    d[2] = peer;
    __threadfence_system();
    d[0] = phase + 1;
    __threadfence_system();
  }
  if (blockIdx.x == 0) {
    printf("jax_ep: rank %d failed waiting for rank %d (phase %d; timeout %.1f s)\n", v.rank, peer, phase,
           v.timeout_ns * 1e-9);
  }
}

// Spin until *flag >= target. After timeout_ns, report {phase, rank, peer} and trap: the call fails
// instead of hanging, and later calls on the buffer fail with the same message.
__device__ __forceinline__ void wait_flag_geq(const PeerView& v, const uint64_t* flag, uint64_t target,
                                              int peer, int phase) {
  if (ld_acquire_sys(flag) >= target) return;
  const uint64_t start = global_timer_ns();
  while (ld_acquire_sys(flag) < target) {
    if (global_timer_ns() - start > v.timeout_ns) {
      report_failure(v, peer, phase);
      __trap();
    }
  }
}

// Before an op writes anything: a graph captured while the buffer was open must not touch freed memory. One thread
// checks (`checker`; its warp waits for the load, so kernels whose thread 0 is on the critical path name another).
__device__ __forceinline__ void trap_if_closed(const PeerView& v, unsigned checker = 0) {
  if (threadIdx.x == checker && v.alive != nullptr && *reinterpret_cast<const volatile int*>(v.alive) == 0) {
    printf("jax_ep: rank %d: op on a closed Buffer (a compiled step replayed after close())\n", v.rank);
    __trap();
  }
}

template <typename T>
__device__ __forceinline__ T* field(uint8_t* base, size_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

}  // namespace jax_ep
