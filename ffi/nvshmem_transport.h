// NVSHMEM as the memory provider of the load/store runtime: one PE per process, bootstrapped with a unique
// id that Python passes around through JAX's distributed key-value store. Buffers come from the symmetric
// heap (nvshmem_malloc, collective over all PEs) and peers are reached through nvshmem_ptr; the kernels are
// the same as with CUDA IPC. Peers without a load/store path (other nodes) need put-with-signal kernels:
// not built yet, so such a peer is an error here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace jax_ep {

std::string nvshmem_unique_id();  // call on one process; the bytes travel to every other
// Initialise NVSHMEM for this process (PE `pe` of `num_pes`, on CUDA device `device`) with a symmetric heap
// of at least `heap_bytes`. Once per process; a second call with the same job is a no-op.
void nvshmem_bootstrap(int device, int pe, int num_pes, const std::string& unique_id, size_t heap_bytes);
bool nvshmem_ready();
void* nvshmem_symmetric_alloc(size_t bytes);  // collective: every PE, same order, same size
void nvshmem_symmetric_free(void* ptr);       // collective
void* nvshmem_peer(void* local, int pe);      // nullptr when pe has no load/store path

}  // namespace jax_ep
