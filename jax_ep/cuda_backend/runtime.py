"""Communication memory of a ``Buffer`` for the load/store (intranode) kernels.

Created on first use of the cuda backend (at trace time), once per Buffer: every local device of the
mesh gets a block of memory outside XLA's allocator; peers learn each other's blocks through in-process
pointers (one process driving several GPUs) or CUDA IPC handles exchanged through JAX's distributed
key-value store (one process per GPU, or several processes sharing one GPU under MPS).
"""

from __future__ import annotations

import itertools
import math
import os
import threading

import jax
import numpy as np

from .. import _cuda

_lock = threading.Lock()
_uids = itertools.count(1)   # same order on every process (SPMD): the uid names the exchange
_KV_TIMEOUT_MS = int(float(os.environ.get("JAX_EP_EXCHANGE_TIMEOUT_S", "300")) * 1000)


def layout_args(buffer) -> dict:
    H, K = buffer.hidden, buffer.num_topk
    return dict(num_ranks=buffer.num_ranks, capacity=buffer.recv_capacity, max_tokens=buffer.max_tokens_per_rank,
                num_topk=K, max_row_bytes=4 * max(H, K), max_scale_bytes=4 * math.ceil(H / 128))


class IntranodeRuntime:
    """Owns one Buffer's communication memory on this process's devices."""

    def __init__(self, buffer):
        ext = _cuda.extension()
        _cuda.register()
        self.uid = next(_uids)
        self._ext = ext
        mesh, axis = buffer.mesh, buffer.axis
        devices = np.asarray(mesh.devices)
        ax = mesh.axis_names.index(axis)
        me = jax.process_index()
        local = [d for d in devices.flat if d.process_index == me]
        args = layout_args(buffer)
        allocs = {}
        for d in local:
            allocs[d.id] = ext.intranode_alloc(self.uid, d.local_hardware_id, **args)
        multi_process = any(d.process_index != me for d in devices.flat)
        client = None
        if multi_process:
            from jax._src.distributed import global_state
            client = global_state.client
            if client is None:
                raise RuntimeError("jax_ep: a mesh spanning several processes needs jax.distributed.initialize()")
            for d in local:
                client.key_value_set_bytes(self._key(d.id), allocs[d.id][1])
        for d in local:
            coords = tuple(int(c) for c in np.argwhere(devices == d)[0])
            group = np.moveaxis(devices, ax, 0)[(slice(None),) + coords[:ax] + coords[ax + 1:]]
            ptrs, handles, peer_devs = [], [], []
            for peer in group:
                if peer.process_index == me:
                    ptrs.append(allocs[peer.id][0])
                    handles.append(b"")
                    peer_devs.append(peer.local_hardware_id)
                else:
                    ptrs.append(0)
                    handles.append(client.blocking_key_value_get_bytes(self._key(peer.id), _KV_TIMEOUT_MS))
                    peer_devs.append(-1)
            ext.intranode_open(self.uid, d.local_hardware_id, coords[ax], ptrs, handles, peer_devs,
                               float(buffer.timeout_s), int(buffer.num_sms or 0))
        self.bytes_per_rank = allocs[local[0].id][2] if local else 0
        if multi_process:
            # Nobody frees memory a peer may still open: wait until every process has opened its peers.
            client.key_value_set(f"jax_ep/{self.uid}/opened/{me}", "1")
            for p in range(jax.process_count()):
                client.blocking_key_value_get(f"jax_ep/{self.uid}/opened/{p}", _KV_TIMEOUT_MS)

    def _key(self, device_id):
        return f"jax_ep/{self.uid}/ipc/{device_id}"

    def diagnostics(self) -> str:
        return self._ext.intranode_diagnostics(self.uid)

    def close(self):
        self._ext.intranode_close(self.uid)


def ensure(buffer) -> IntranodeRuntime:
    """The Buffer's runtime, created on first use."""
    state = buffer._state()
    with _lock:
        runtime = state.get("runtime")
        if runtime is None:
            runtime = IntranodeRuntime(buffer)
            state["runtime"] = runtime
        return runtime


def bytes_per_rank(buffer) -> int:
    """Bytes one rank's communication memory takes (what ``ensure`` allocates)."""
    return int(_cuda.extension().intranode_bytes(**layout_args(buffer)))
