// Communication runtime of the load/store (intranode) modes: per (buffer uid, device) state holding the
// communication memory, the peers' pointers and the host-mapped diagnostics word. Python creates it
// once per jax_ep.Buffer (ffi/module.cc); handlers look it up by (uid attribute, device ordinal).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/intranode.cuh"

namespace jax_ep {

struct AllocResult {
  uintptr_t ptr = 0;
  std::string ipc_handle;  // cudaIpcMemHandle_t bytes
  size_t bytes = 0;
};

// Allocate and zero this rank's communication memory on `device`: the intranode area, then (when
// enabled) the low-latency area, `total_bytes` in all.
// symmetric: from NVSHMEM's symmetric heap (collective over every PE; no IPC handle) instead of cudaMalloc.
AllocResult runtime_alloc(int64_t uid, int device, const IntranodeLayout& layout, const LowLatencyLayout& ll,
                          size_t total_bytes, bool symmetric = false);

// Make the peer table. For each rank r: peer_devices[r] >= 0 means an in-process allocation on that
// device (peer_ptrs[r]); otherwise peer_handles[r] is a CUDA IPC handle from another process.
// same_gpu: bit r when rank r's memory is on this rank's GPU (PeerView::same_gpu; this rank's bit is added).
void runtime_open(int64_t uid, int device, int rank, const std::vector<uintptr_t>& peer_ptrs,
                  const std::vector<std::string>& peer_handles, const std::vector<int>& peer_devices,
                  double timeout_s, int num_blocks, uint64_t same_gpu = 0);

// Closing is two-phase so that no process frees memory a peer still maps: unmap (wait for this device's
// work, close the peers' IPC mappings, mark the buffer dead for graph replays), then -- after every
// process of the group has unmapped -- free.
// The peer table of a symmetric buffer: rank r's block is nvshmem_ptr(local, peer_pes[r]).
void runtime_open_symmetric(int64_t uid, int device, int rank, const std::vector<int>& peer_pes, double timeout_s,
                            int num_blocks, uint64_t same_gpu = 0);

// The 16-byte UUID of a CUDA device: processes compare them to find the ranks that share a GPU.
std::string device_uuid(int device);

void runtime_unmap(int64_t uid);
void runtime_free(int64_t uid);

// Low-latency kernel-side times of (uid, device): per kernel (dispatch send, dispatch recv, combine send,
// combine recv) {total ns, launches} since the last reset. Synchronises the device (benchmarks only).
std::vector<uint64_t> runtime_low_latency_times(int64_t uid, int device, bool reset);

// First recorded device-side timeout of this uid on this process: "" if none.
std::string runtime_diagnostics(int64_t uid);

// For handlers: a copy of the peer view of (uid, device) (taken under the lock, so a concurrent close
// cannot pull it away); false with `error` set when unknown or closed. num_blocks receives the grid budget.
bool runtime_view(int64_t uid, int device, PeerView* view, int* num_blocks, std::string* error);

}  // namespace jax_ep
