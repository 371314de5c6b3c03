// Internode normal-mode dispatch / combine (docs/internode.md). Host-side declarations.
//
// A node is layout.node_size consecutive ranks that reach each other by load/store; ranks of other nodes
// are reached only by NVSHMEM puts (put-with-signal), so the same code runs over NVLink peers on one
// machine (virtual nodes) and over a network between machines. A token crosses to another node once, to
// the rank with its own local index there (the forwarder), which copies it to every rank of its node that
// needs it. Outputs are exactly the intranode mode's (docs/semantics.md).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/intranode.cuh"

namespace jax_ep {

// The handle's arrays beyond the intranode ones.
struct InternodeHandle {
  int32_t* node_slot = nullptr;  // [T, nodes]: the token's row in its stream to node m, -1 = not sent there
  int32_t* recv_fwd = nullptr;   // [C]: received row's (source node * T_max + network row), -1 = direct
  int32_t* fwd_src = nullptr;    // [nodes * T_max]: token of the forwarded row (this rank as forwarder), -1
  int32_t* fwd_mask = nullptr;   // [nodes * T_max]: bit l = local rank l of this node received that row
};

struct InternodeHandleView {
  const int32_t* node_slot = nullptr;
  const int32_t* recv_fwd = nullptr;
  const int32_t* fwd_src = nullptr;
  const int32_t* fwd_mask = nullptr;
};

cudaError_t launch_internode_dispatch(const PeerView& view, const DispatchArgs& args, const InternodeHandle& handle,
                                      int num_blocks, cudaStream_t stream);

cudaError_t launch_internode_cached_dispatch(const PeerView& view, const CachedDispatchArgs& args,
                                             const InternodeHandleView& handle, int num_blocks, cudaStream_t stream);

// Combine: rows from this node's sources return directly; the others are summed per node by the forwarder
// (f32, ascending rank) and cross the network once as a partial sum; the source adds its node's rows and
// the partial sums in ascending node order (so the f32 order differs from the flat reference's).
cudaError_t launch_internode_combine(const PeerView& view, const CombineArgs& args, const InternodeHandleView& handle,
                                     int num_blocks, cudaStream_t stream);

}  // namespace jax_ep
