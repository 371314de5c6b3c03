#include "ffi/nvshmem_transport.h"

#include <cuda_runtime_api.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>

namespace jax_ep {
namespace {

std::mutex g_mutex;
bool g_ready = false;
int g_pe = -1, g_num_pes = 0;

}  // namespace

std::string nvshmem_unique_id() {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  if (nvshmemx_get_uniqueid(&id) != 0) throw std::runtime_error("jax_ep: nvshmemx_get_uniqueid failed");
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

void nvshmem_bootstrap(int device, int pe, int num_pes, const std::string& unique_id, size_t heap_bytes) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_ready) {
    if (pe != g_pe || num_pes != g_num_pes) {
      throw std::runtime_error("jax_ep: NVSHMEM is already initialised as PE " + std::to_string(g_pe) + " of " +
                               std::to_string(g_num_pes));
    }
    return;
  }
  if (unique_id.size() != sizeof(nvshmemx_uniqueid_t)) throw std::runtime_error("jax_ep: malformed NVSHMEM unique id");
  if (cudaSetDevice(device) != cudaSuccess) throw std::runtime_error("jax_ep: cudaSetDevice before NVSHMEM init");
  // The symmetric heap is sized at init; respect a larger size the user set.
  const char* set = std::getenv("NVSHMEM_SYMMETRIC_SIZE");
  if (set == nullptr || std::strtoull(set, nullptr, 10) < heap_bytes) {
    setenv("NVSHMEM_SYMMETRIC_SIZE", std::to_string(heap_bytes).c_str(), 1);
  }
  nvshmemx_uniqueid_t id;
  std::memcpy(&id, unique_id.data(), sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  if (nvshmemx_set_attr_uniqueid_args(pe, num_pes, &id, &attr) != 0) {
    throw std::runtime_error("jax_ep: nvshmemx_set_attr_uniqueid_args failed");
  }
  // nvshmemx_init_attr() exits the process on failure; call the initialiser it wraps and report instead.
  nvshmemx_init_init_attr_ver_only(attr);
  nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                NVSHMEM_VENDOR_PATCH_VERSION};
  int provided = 0;
  const int status = nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID, &attr,
                                          version);
  if (status != 0) throw std::runtime_error("jax_ep: NVSHMEM initialisation failed (status " + std::to_string(status) + ")");
  if (nvshmem_my_pe() != pe || nvshmem_n_pes() != num_pes) {
    throw std::runtime_error("jax_ep: NVSHMEM came up as PE " + std::to_string(nvshmem_my_pe()) + " of " +
                             std::to_string(nvshmem_n_pes()) + ", expected " + std::to_string(pe) + " of " +
                             std::to_string(num_pes));
  }
  g_ready = true;
  g_pe = pe;
  g_num_pes = num_pes;
}

bool nvshmem_ready() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_ready;
}

void* nvshmem_symmetric_alloc(size_t bytes) {
  if (!nvshmem_ready()) throw std::runtime_error("jax_ep: NVSHMEM is not initialised");
  void* p = nvshmem_malloc(bytes);
  if (p == nullptr) {
    throw std::runtime_error("jax_ep: nvshmem_malloc(" + std::to_string(bytes) +
                             ") failed: the symmetric heap is too small (set NVSHMEM_SYMMETRIC_SIZE or "
                             "JAX_EP_NVSHMEM_HEAP_BYTES before the first Buffer)");
  }
  return p;
}

void nvshmem_symmetric_free(void* ptr) {
  if (ptr != nullptr) nvshmem_free(ptr);
}

void* nvshmem_peer(void* local, int pe) { return nvshmem_ptr(local, pe); }

}  // namespace jax_ep
