#include "ffi/runtime.h"

#include "ffi/nvshmem_transport.h"

#include <cuda_runtime_api.h>

#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <utility>

namespace jax_ep {
namespace {

struct GroupState {
  int device = 0;
  IntranodeLayout layout;
  LowLatencyLayout ll;
  size_t bytes = 0;
  bool symmetric = false;  // NVSHMEM symmetric heap (freed collectively) instead of cudaMalloc + IPC
  uint8_t* local = nullptr;
  uint8_t** peers_dev = nullptr;
  int* pes_dev = nullptr;  // internode: NVSHMEM PE of each rank
  std::vector<void*> ipc_opened;
  int* diag_host = nullptr;
  // 1 while open. Device memory, read by every block of every kernel (a host-mapped word costs a PCIe round
  // trip per block: measured ~1.5 us each, serialised). Never freed: a replayed CUDA graph may read it
  // after close().
  int* alive = nullptr;
  PeerView view;
  int num_blocks = 0;
  bool open = false;
};

std::mutex g_mutex;
std::map<std::pair<int64_t, int>, std::unique_ptr<GroupState>> g_groups;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("jax_ep runtime: ") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

void set_alive(int* flag, int value) {
  check(cudaMemcpy(flag, &value, sizeof(int), cudaMemcpyHostToDevice), "cudaMemcpy (liveness flag)");
}

void unmap(GroupState& g) {
  DeviceGuard guard(g.device);
  if (g.alive) set_alive(g.alive, 0);
  cudaDeviceSynchronize();  // no kernel of ours may still use the peers' memory
  for (void* p : g.ipc_opened) cudaIpcCloseMemHandle(p);
  g.ipc_opened.clear();
  if (g.peers_dev) cudaFree(g.peers_dev);
  g.peers_dev = nullptr;
  if (g.pes_dev) cudaFree(g.pes_dev);
  g.pes_dev = nullptr;
  g.open = false;
}

void free_local(GroupState& g) {
  DeviceGuard guard(g.device);
  if (g.local && g.symmetric) {
    nvshmem_symmetric_free(g.local);
  } else if (g.local) {
    cudaFree(g.local);
  }
  if (g.diag_host) cudaFreeHost(g.diag_host);
  g.local = nullptr;
  g.diag_host = nullptr;
}

// Entries of uid, moved out of the registry (so CUDA calls run outside the lock).
std::vector<std::unique_ptr<GroupState>> take(int64_t uid) {
  std::vector<std::unique_ptr<GroupState>> out;
  std::lock_guard<std::mutex> lock(g_mutex);
  for (auto it = g_groups.begin(); it != g_groups.end();) {
    if (it->first.first == uid) {
      out.push_back(std::move(it->second));
      it = g_groups.erase(it);
    } else {
      ++it;
    }
  }
  return out;
}

// The recorded failure {phase + 1, rank, peer} in words.
std::string describe_failure(volatile int* d) {
  const int phase = d[0] - 1;
  if (phase == kPhaseLowLatencyTooMany || phase == kPhaseLowLatencyOutOfOrder || phase == kPhaseClosed) {
    return "rank " + std::to_string(d[1]) + ": " + wait_phase_name(phase);
  }
  return "rank " + std::to_string(d[1]) + " timed out waiting for rank " + std::to_string(d[2]) + " in " +
         wait_phase_name(phase);
}

// The end of both opens: upload the peer table and make the view usable (g_mutex held).
void finish_open(GroupState& g, const std::vector<uint8_t*>& peers, int rank, double timeout_s, int num_blocks,
                 uint64_t same_gpu) {
  const int R = g.layout.num_ranks;
  const int device = g.device;
  check(cudaMalloc(reinterpret_cast<void**>(&g.peers_dev), R * sizeof(uint8_t*)), "cudaMalloc (peer table)");
  check(cudaMemcpy(g.peers_dev, peers.data(), R * sizeof(uint8_t*), cudaMemcpyHostToDevice), "cudaMemcpy");
  int* diag_dev = nullptr;
  check(cudaHostGetDevicePointer(reinterpret_cast<void**>(&diag_dev), g.diag_host, 0), "cudaHostGetDevicePointer");
  g.view.local = g.local;
  g.view.peers = g.peers_dev;
  g.view.rank = rank;
  g.view.layout = g.layout;
  g.view.ll = g.ll;
  g.view.timeout_ns = static_cast<unsigned long long>(timeout_s * 1e9);
  g.view.diag = diag_dev;
  g.view.alive = g.alive;
  g.view.same_gpu = same_gpu | (1ull << rank);
  set_alive(g.alive, 1);
  if (num_blocks <= 0) {
    int sms = 0;
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    num_blocks = 4 * sms;  // measured on H200 (R=8 under MPS): 4 blocks/SM beat 1 by 12-13% (benchmarks/results)
  }
  g.num_blocks = num_blocks;
  g.open = true;
}

std::mutex g_unmapped_mutex;
std::map<int64_t, std::vector<std::unique_ptr<GroupState>>> g_unmapped;  // between unmap and free

}  // namespace

AllocResult runtime_alloc(int64_t uid, int device, const IntranodeLayout& layout, const LowLatencyLayout& ll,
                          size_t total_bytes, bool symmetric) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto key = std::make_pair(uid, device);
  if (g_groups.count(key)) throw std::runtime_error("jax_ep runtime: buffer already allocated on this device");
  auto g = std::make_unique<GroupState>();
  g->device = device;
  g->layout = layout;
  g->ll = ll;
  g->bytes = total_bytes;
  g->symmetric = symmetric;
  DeviceGuard guard(device);
  void* mem = nullptr;
  if (symmetric) {
    mem = nvshmem_symmetric_alloc(total_bytes);
  } else {
    check(cudaMalloc(&mem, total_bytes), "cudaMalloc of the communication buffer");
  }
  g->local = static_cast<uint8_t*>(mem);
  check(cudaMemset(mem, 0, total_bytes), "cudaMemset");
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  cudaIpcMemHandle_t handle;
  std::memset(&handle, 0, sizeof(handle));
  if (!symmetric) check(cudaIpcGetMemHandle(&handle, mem), "cudaIpcGetMemHandle");
  check(cudaHostAlloc(reinterpret_cast<void**>(&g->diag_host), 4 * sizeof(int), cudaHostAllocMapped),
        "cudaHostAlloc (diagnostics)");
  std::memset(g->diag_host, 0, 4 * sizeof(int));
  check(cudaMalloc(reinterpret_cast<void**>(&g->alive), sizeof(int)), "cudaMalloc (liveness flag)");
  set_alive(g->alive, 0);
  AllocResult result;
  result.ptr = reinterpret_cast<uintptr_t>(mem);
  if (!symmetric) result.ipc_handle.assign(reinterpret_cast<const char*>(&handle), sizeof(handle));
  result.bytes = total_bytes;
  g_groups[key] = std::move(g);
  return result;
}

void runtime_open(int64_t uid, int device, int rank, const std::vector<uintptr_t>& peer_ptrs,
                  const std::vector<std::string>& peer_handles, const std::vector<int>& peer_devices,
                  double timeout_s, int num_blocks, uint64_t same_gpu) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_groups.find(std::make_pair(uid, device));
  if (it == g_groups.end()) throw std::runtime_error("jax_ep runtime: open before alloc");
  GroupState& g = *it->second;
  const int R = g.layout.num_ranks;
  if (static_cast<int>(peer_ptrs.size()) != R || static_cast<int>(peer_handles.size()) != R ||
      static_cast<int>(peer_devices.size()) != R || rank < 0 || rank >= R) {
    throw std::runtime_error("jax_ep runtime: peer table does not match num_ranks");
  }
  DeviceGuard guard(device);
  std::vector<uint8_t*> peers(R, nullptr);
  for (int r = 0; r < R; ++r) {
    if (r == rank) {
      peers[r] = g.local;
    } else if (peer_devices[r] >= 0) {  // same process
      if (peer_devices[r] != device) {
        int can = 0;
        check(cudaDeviceCanAccessPeer(&can, device, peer_devices[r]), "cudaDeviceCanAccessPeer");
        if (!can) {
          throw std::runtime_error("jax_ep runtime: device " + std::to_string(device) + " cannot access peer device " +
                                   std::to_string(peer_devices[r]) + " (no P2P/NVLink path)");
        }
        const cudaError_t err = cudaDeviceEnablePeerAccess(peer_devices[r], 0);
        if (err == cudaErrorPeerAccessAlreadyEnabled) {
          cudaGetLastError();
        } else {
          check(err, "cudaDeviceEnablePeerAccess");
        }
      }
      peers[r] = reinterpret_cast<uint8_t*>(peer_ptrs[r]);
    } else {
      if (peer_handles[r].size() != sizeof(cudaIpcMemHandle_t)) {
        throw std::runtime_error("jax_ep runtime: malformed IPC handle for rank " + std::to_string(r));
      }
      cudaIpcMemHandle_t handle;
      std::memcpy(&handle, peer_handles[r].data(), sizeof(handle));
      void* p = nullptr;
      check(cudaIpcOpenMemHandle(&p, handle, cudaIpcMemLazyEnablePeerAccess),
            ("cudaIpcOpenMemHandle for rank " + std::to_string(r)).c_str());
      g.ipc_opened.push_back(p);
      peers[r] = static_cast<uint8_t*>(p);
    }
  }
  finish_open(g, peers, rank, timeout_s, num_blocks, same_gpu);
}

void runtime_open_symmetric(int64_t uid, int device, int rank, const std::vector<int>& peer_pes, double timeout_s,
                            int num_blocks, uint64_t same_gpu) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_groups.find(std::make_pair(uid, device));
  if (it == g_groups.end()) throw std::runtime_error("jax_ep runtime: open before alloc");
  GroupState& g = *it->second;
  const int R = g.layout.num_ranks;
  if (!g.symmetric || static_cast<int>(peer_pes.size()) != R || rank < 0 || rank >= R) {
    throw std::runtime_error("jax_ep runtime: symmetric peer table does not match the buffer");
  }
  DeviceGuard guard(device);
  std::vector<uint8_t*> peers(R, nullptr);
  // Internode buffers (layout.num_nodes > 1) store only into their own node; other nodes get puts.
  const int node_size = g.layout.node_size > 0 ? g.layout.node_size : R;
  for (int r = 0; r < R; ++r) {
    peers[r] = static_cast<uint8_t*>(nvshmem_peer(g.local, peer_pes[r]));
    const bool same_node = r / node_size == rank / node_size;
    if (peers[r] == nullptr && same_node) {
      throw std::runtime_error("jax_ep runtime: rank " + std::to_string(r) + " (PE " + std::to_string(peer_pes[r]) +
                               ") has no load/store path from this GPU" +
                               (g.layout.num_nodes > 1 ? std::string(" but is declared in this rank's node")
                                                       : std::string("; declare nodes (Buffer(ranks_per_node=...))")));
    }
  }
  if (g.layout.num_nodes > 1) {
    check(cudaMalloc(reinterpret_cast<void**>(&g.pes_dev), R * sizeof(int)), "cudaMalloc (PE table)");
    check(cudaMemcpy(g.pes_dev, peer_pes.data(), R * sizeof(int), cudaMemcpyHostToDevice), "cudaMemcpy (PE table)");
  }
  finish_open(g, peers, rank, timeout_s, num_blocks, same_gpu);
  g.view.pes = g.pes_dev;
}

std::string device_uuid(int device) {
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  return std::string(prop.uuid.bytes, sizeof(prop.uuid.bytes));
}


void runtime_unmap(int64_t uid) {
  auto groups = take(uid);
  for (auto& g : groups) unmap(*g);
  std::lock_guard<std::mutex> lock(g_unmapped_mutex);
  auto& parked = g_unmapped[uid];
  for (auto& g : groups) parked.push_back(std::move(g));
}

void runtime_free(int64_t uid) {
  std::vector<std::unique_ptr<GroupState>> groups;
  {
    std::lock_guard<std::mutex> lock(g_unmapped_mutex);
    auto it = g_unmapped.find(uid);
    if (it == g_unmapped.end()) return;
    groups = std::move(it->second);
    g_unmapped.erase(it);
  }
  for (auto& g : groups) free_local(*g);
}

std::vector<uint64_t> runtime_low_latency_times(int64_t uid, int device, bool reset) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_groups.find(std::make_pair(uid, device));
  if (it == g_groups.end() || !it->second->ll.enabled) {
    throw std::runtime_error("jax_ep runtime: no low-latency buffer " + std::to_string(uid) + " on device " +
                             std::to_string(device));
  }
  GroupState& g = *it->second;
  DeviceGuard guard(g.device);
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  uint64_t* timing = reinterpret_cast<uint64_t*>(g.local + g.ll.timing);
  // The whole timing area (cuda/low_latency_layout.cuh): start stamps, per-kernel {ns, launches}, the receive
  // kernels' latest wait ends (0 between ops) and {ns waited, launches}, the timeline. A reset zeroes the sums.
  std::vector<uint64_t> out(kLowLatencyTimingWords);
  check(cudaMemcpy(out.data(), timing, out.size() * sizeof(uint64_t), cudaMemcpyDeviceToHost),
        "cudaMemcpy (kernel times)");
  if (reset) {
    check(cudaMemset(timing + kLowLatencyKernels, 0, (kLowLatencyTimelineWord - kLowLatencyKernels) * sizeof(uint64_t)),
          "cudaMemset");
  }
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  return out;
}

std::string runtime_diagnostics(int64_t uid) {
  std::lock_guard<std::mutex> lock(g_mutex);
  for (auto& [key, g] : g_groups) {
    if (key.first != uid || g->diag_host == nullptr) continue;
    volatile int* d = g->diag_host;
    if (d[0] != 0) {
      return describe_failure(d);
    }
  }
  return "";
}

bool runtime_view(int64_t uid, int device, PeerView* view, int* num_blocks, std::string* error) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_groups.find(std::make_pair(uid, device));
  if (it == g_groups.end() || !it->second->open) {
    *error = "no jax_ep communication buffer " + std::to_string(uid) + " on device " + std::to_string(device) +
             " (was the Buffer closed, or built for another mesh?)";
    return false;
  }
  volatile int* d = it->second->diag_host;
  if (d[0] != 0) {
    *error = "an earlier call failed: " + describe_failure(d);
    return false;
  }
  *num_blocks = it->second->num_blocks;
  *view = it->second->view;
  return true;
}

}  // namespace jax_ep
