"""Communication memory of a ``Buffer`` for the load/store (intranode) kernels.

Transport (``JAX_EP_TRANSPORT``): ``nvshmem`` allocates from NVSHMEM's symmetric heap (one PE per
process, bootstrapped with a unique id through the key-value store) and reaches peers with nvshmem_ptr;
``ipc`` allocates with cudaMalloc and maps peers through CUDA IPC handles or in-process pointers. The
kernels are the same either way. ``auto`` (the default) takes NVSHMEM when every process of the mesh drives
one GPU and the Buffer fits the heap, else IPC / in-process peers: with several processes on one H200 under
MPS, loads and stores through CUDA IPC mappings ran at about half the speed of the same kernels through
NVSHMEM's mappings (normal mode at R=8: dispatch 730 vs 1187 GB/s, 2026-11-29 on nvidia-h200-x2).

Created on first use of the cuda backend (at trace time), once per Buffer: every local device of the
mesh gets a block of memory outside XLA's allocator; peers learn each other's blocks through in-process
pointers (one process driving several GPUs) or CUDA IPC handles exchanged through JAX's distributed
key-value store (one process per GPU, or several processes sharing one GPU under MPS).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import threading
import warnings

import jax
import numpy as np

from .. import _cuda
from ..launch import default_sm_percent

_lock = threading.Lock()
_uids = itertools.count(1)   # same order on every process (SPMD): the uid names the exchange
_KV_TIMEOUT_MS = int(float(os.environ.get("JAX_EP_EXCHANGE_TIMEOUT_S", "300")) * 1000)
TRANSPORTS = ("auto", "ipc", "nvshmem")
_HEAP_SLACK = 32 << 20          # NVSHMEM's own allocations and alignment inside the symmetric heap
_heap = {"bytes": 0, "used": 0}  # this process's symmetric heap (sized once, at NVSHMEM's bootstrap)


def transport() -> str:
    value = os.environ.get("JAX_EP_TRANSPORT", "auto")
    if value not in TRANSPORTS:
        raise ValueError(f"jax_ep: JAX_EP_TRANSPORT must be one of {TRANSPORTS}, got {value!r}")
    return value


def use_symmetric(choice: str, num_nodes: int, devices_per_process: list[int], processes_in_mesh: int,
                  process_count: int, nbytes: int, heap_free: int | None) -> bool:
    """Whether a Buffer's memory comes from NVSHMEM's symmetric heap. Every input is the same on every process
    (the mesh, the Buffer, the heap's history), so every process decides alike: the allocation is collective.
    ``heap_free`` is None before NVSHMEM's bootstrap (the heap is then sized for this Buffer)."""
    if num_nodes > 1 or choice == "nvshmem":   # internode mode reaches other nodes through NVSHMEM puts
        return True
    if choice == "ipc":
        return False
    return (processes_in_mesh > 1 and processes_in_mesh == process_count
            and all(n == 1 for n in devices_per_process)
            and (heap_free is None or nbytes + _HEAP_SLACK <= heap_free))


def same_gpu_mask(uuids: list[bytes], rank: int) -> int:
    """Bit r set when rank r's device (``uuids[r]``, its CUDA UUID) is rank ``rank``'s: the ranks whose memory this
    rank's GPU holds, which the low-latency dispatch reads from instead of writing into (docs/low_latency.md)."""
    return sum(1 << r for r, uuid in enumerate(uuids) if uuid == uuids[rank])


def mps_share_warning(ranks_on_gpu: int, share: str | None) -> str | None:
    """Why a low-latency Buffer whose ranks share a GPU may stall until its timeout, or None. Under MPS a rank's
    kernels may use the SMs of its share (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, ``share``; 100 when unset), and the
    low-latency receive kernels spin in every block until the peers' signals arrive. Measured on an H200 (driver
    580.159.04, 2026-11-30): with a rank at 100 % (R=2: both ranks, 5 runs of 5; one at 50 % and one at 100 %, and
    R=8 at 13 % to 100 %, 2 runs of 2) and with 8 ranks at 25 % or at 99 % each (2 runs each: the multi-rank check
    and the benchmark), the ops stalled until the device-side timeout; 2 ranks at 55 % (1 benchmark) and at 99 %
    (3 multi-rank checks, 9 benchmarks) did not. Why some shares stall is not known. Warned of: a rank at 100 %, and
    more than two ranks whose shares add up to more than the GPU (which covers shares never measured). jax_ep.launch's
    default_sm_percent is never warned of."""
    if ranks_on_gpu < 2:
        return None
    try:
        percent = 100.0 if share is None or not share.strip() else float(share)
    except ValueError:
        return None   # MPS itself rejects what it cannot parse
    over_gpu = percent * ranks_on_gpu > 100 + ranks_on_gpu   # an equal split rounded up to whole % is not "over"
    if percent < 100 and (ranks_on_gpu == 2 or not over_gpu):
        return None
    given = f"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={share}" if share and share.strip() else \
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE unset: 100 % each"
    return (f"jax_ep: {ranks_on_gpu} ranks of this low-latency Buffer share one GPU at {percent:g} % of its SMs each "
            f"({given}). The low-latency ops stalled until timeout_s and failed naming a rank in every run measured "
            f"with a rank at 100 %, and with 8 ranks at 25 % or 99 % each. Give each rank at most "
            f"{default_sm_percent(ranks_on_gpu)} % (jax_ep.launch does, unless JAX_EP_MPS_SM_PERCENT says otherwise).")


def _kv_client():
    from jax._src.distributed import global_state
    return global_state.client


def _nvshmem_bootstrap(ext, device: int, buffer_bytes: int):
    """Initialise NVSHMEM once per process: PE = process index, the unique id made by process 0 and passed
    through the key-value store. The symmetric heap is sized at init (JAX_EP_NVSHMEM_HEAP_BYTES, else room
    for twice the first Buffer and at least 1 GiB): later Buffers must fit in it."""
    if ext.nvshmem_ready():
        return
    n, me = jax.process_count(), jax.process_index()
    client = _kv_client()
    if n > 1 and client is None:
        raise RuntimeError("jax_ep: JAX_EP_TRANSPORT=nvshmem with several processes needs jax.distributed.initialize()")
    key = "jax_ep/nvshmem/unique_id"
    if me == 0:
        unique_id = ext.nvshmem_unique_id()
        if n > 1:
            client.key_value_set_bytes(key, unique_id)
    else:
        unique_id = client.blocking_key_value_get_bytes(key, _KV_TIMEOUT_MS)
    heap = int(os.environ.get("JAX_EP_NVSHMEM_HEAP_BYTES", "0")) or max(2 * buffer_bytes + (64 << 20), 1 << 30)
    ext.nvshmem_bootstrap(device, me, n, unique_id, heap)
    # The bootstrap keeps a larger NVSHMEM_SYMMETRIC_SIZE the user set (a plain byte count).
    given = os.environ.get("NVSHMEM_SYMMETRIC_SIZE", "")
    _heap["bytes"] = max(heap, int(given) if given.isdigit() else 0)


def layout_args(buffer) -> dict:
    H, K = buffer.hidden, buffer.num_topk
    return dict(num_ranks=buffer.num_ranks, capacity=buffer.recv_capacity, max_tokens=buffer.max_tokens_per_rank,
                num_topk=K, max_row_bytes=4 * max(H, K), max_scale_bytes=4 * math.ceil(H / 128),
                ll_num_experts=buffer.num_experts if buffer.low_latency else 0, ll_hidden=H if buffer.low_latency else 0,
                num_nodes=buffer.num_nodes)


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
        self._me = jax.process_index()
        local = [d for d in devices.flat if d.process_index == self._me]
        self._devices = [d.local_hardware_id for d in local]
        args = layout_args(buffer)
        # Keys carry the mesh and layout, so processes that disagree on which Buffer a uid names fail the
        # exchange (a timeout that says so) instead of mapping each other's memory with different layouts.
        tag = hashlib.sha1(repr((sorted(d.id for d in devices.flat), axis, sorted(args.items()))).encode())
        self._prefix = f"jax_ep/{self.uid}/{tag.hexdigest()[:12]}"
        self._procs = sorted({d.process_index for d in devices.flat})
        self._client = None
        nbytes = int(ext.intranode_bytes(**args))
        per_process = {}
        for dev in devices.flat:
            per_process[dev.process_index] = per_process.get(dev.process_index, 0) + 1
        self._symmetric = use_symmetric(transport(), buffer.num_nodes, list(per_process.values()), len(self._procs),
                                        jax.process_count(), nbytes,
                                        _heap["bytes"] - _heap["used"] if ext.nvshmem_ready() else None)
        self.transport = "nvshmem" if self._symmetric else ("ipc" if len(self._procs) > 1 else "in-process")
        if (not self._symmetric and transport() == "auto" and ext.nvshmem_ready()
                and use_symmetric("auto", 1, list(per_process.values()), len(self._procs), jax.process_count(), 0, None)):
            warnings.warn(f"jax_ep: this Buffer ({nbytes / 2**30:.2f} GiB) does not fit what is left of the NVSHMEM "
                          f"heap ({(_heap['bytes'] - _heap['used']) / 2**30:.2f} of {_heap['bytes'] / 2**30:.2f} GiB), "
                          "so it uses CUDA IPC, which runs at about half the speed with several processes per GPU; "
                          "size the heap for every Buffer with JAX_EP_NVSHMEM_HEAP_BYTES", stacklevel=2)
        self._heap_bytes = 0
        if self._symmetric:
            if len(local) != 1:
                why = "a Buffer over several nodes" if buffer.num_nodes > 1 else "JAX_EP_TRANSPORT=nvshmem"
                raise RuntimeError(f"jax_ep: {why} uses NVSHMEM, which needs one device per process (one PE each); "
                                   f"this process drives {len(local)} (start one process per GPU: jax_ep.launch)")
            if len(self._procs) != jax.process_count():
                raise RuntimeError("jax_ep: JAX_EP_TRANSPORT=nvshmem allocates collectively over every process: the "
                                   "mesh must span all of them")
            _nvshmem_bootstrap(ext, local[0].local_hardware_id, nbytes)
        try:
            allocs = {d.id: ext.intranode_alloc(self.uid, d.local_hardware_id, **args, symmetric=self._symmetric)
                      for d in local}
            if self._symmetric:
                self._heap_bytes = nbytes
                _heap["used"] += nbytes
            if len(self._procs) > 1:
                self._client = _kv_client()
                if self._client is None:
                    raise RuntimeError("jax_ep: a mesh spanning several processes needs jax.distributed.initialize()")
                for d in local:
                    self._client.key_value_set_bytes(f"{self._prefix}/uuid/{d.id}", ext.device_uuid(d.local_hardware_id))
                    if not self._symmetric:
                        self._client.key_value_set_bytes(f"{self._prefix}/ipc/{d.id}", allocs[d.id][1])
            for d in local:
                self._open(ext, buffer, devices, ax, d, allocs)
            self.bytes_per_rank = allocs[local[0].id][2] if local else 0
            # Nobody frees memory a peer may still open: wait until every process has opened its peers.
            self._barrier("opened")
        except Exception:
            ext.intranode_unmap(self.uid)
            ext.intranode_free(self.uid)
            self._release_heap()
            raise

    def _release_heap(self):
        _heap["used"] -= self._heap_bytes
        self._heap_bytes = 0

    def _open(self, ext, buffer, devices, ax, d, allocs):
        coords = tuple(int(c) for c in np.argwhere(devices == d)[0])
        group = np.moveaxis(devices, ax, 0)[(slice(None),) + coords[:ax] + coords[ax + 1:]]
        uuids = [ext.device_uuid(p.local_hardware_id) if p.process_index == self._me else
                 self._client.blocking_key_value_get_bytes(f"{self._prefix}/uuid/{p.id}", _KV_TIMEOUT_MS) for p in group]
        same_gpu = same_gpu_mask(uuids, coords[ax])
        if buffer.low_latency:
            why = mps_share_warning(bin(same_gpu).count("1"), os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"))
            if why:
                warnings.warn(why, stacklevel=2)
        if self._symmetric:   # PE = process index (one device per process)
            ext.intranode_open_symmetric(self.uid, d.local_hardware_id, coords[ax], [p.process_index for p in group],
                                         float(buffer.timeout_s), int(buffer.num_sms or 0), same_gpu)
            return
        ptrs, handles, peer_devs = [], [], []
        for peer in group:
            if peer.process_index == self._me:
                ptrs.append(allocs[peer.id][0])
                handles.append(b"")
                peer_devs.append(peer.local_hardware_id)
            else:
                ptrs.append(0)
                handles.append(self._client.blocking_key_value_get_bytes(f"{self._prefix}/ipc/{peer.id}",
                                                                         _KV_TIMEOUT_MS))
                peer_devs.append(-1)
        ext.intranode_open(self.uid, d.local_hardware_id, coords[ax], ptrs, handles, peer_devs,
                           float(buffer.timeout_s), int(buffer.num_sms or 0), same_gpu)

    def _barrier(self, name):
        if self._client is None:
            return
        self._client.key_value_set(f"{self._prefix}/{name}/{self._me}", "1")
        for p in self._procs:
            self._client.blocking_key_value_get(f"{self._prefix}/{name}/{p}", _KV_TIMEOUT_MS)

    _LL_KERNELS = ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv")
    _LL_TIMELINE_WORD, _LL_TIMELINE_SLOTS = 18, 32   # cuda/low_latency_layout.cuh

    def low_latency_kernel_times(self, reset: bool = False) -> dict:
        """Kernel-side seconds per launch of each low-latency kernel on this process's first device (measured on
        the device: first block's start to last block's end), averaged since the last reset."""
        raw = self._ext.low_latency_kernel_times(self.uid, self._devices[0], reset)
        # raw: 4 start stamps, {ns, launches} per kernel, two words of in-flight state, {ns, launches} of the two
        # receive kernels' waits (kernel start until the last block's signals had all arrived), the timeline.
        pairs = {"dispatch_send": 4, "dispatch_recv": 6, "combine_send": 8, "combine_recv": 10,
                 "dispatch_recv_wait": 14, "combine_recv_wait": 16}
        return {n: (raw[i] / raw[i + 1] * 1e-9 if raw[i + 1] else None) for n, i in pairs.items()}

    def low_latency_timeline(self) -> dict:
        """Each low-latency kernel's last ops (up to 32, oldest first) on this process's first device:
        {kernel: [(start, last_block_start, mid, end), ...]} in the GPU's %globaltimer ns: block 0's start,
        the latest start of any block, mid (a receive: when its last block had its peers' signals; a send:
        when its last block reached the finish, before the fence and signals) and the last block's end.
        Every process on one GPU reads the same clock, so the ranks' timelines line up; across GPUs the
        clocks are only roughly aligned."""
        return self.timeline_from_words(self._ext.low_latency_kernel_times(self.uid, self._devices[0], False))

    @classmethod
    def timeline_from_words(cls, raw) -> dict:
        """``low_latency_timeline`` from the timing area's words: each kernel's complete ops, oldest first (a
        slot whose op is still running, or never ran, has no end at or after its start)."""
        base, slots, n, w = cls._LL_TIMELINE_WORD, cls._LL_TIMELINE_SLOTS, len(cls._LL_KERNELS), 4
        out = {}
        for k, name in enumerate(cls._LL_KERNELS):
            ops = [tuple(int(x) for x in raw[base + (s * n + k) * w: base + (s * n + k) * w + w]) for s in range(slots)]
            out[name] = sorted((op for op in ops if op[0] and op[3] >= op[0]), key=lambda op: op[0])
        return out

    def diagnostics(self) -> str:
        return self._ext.intranode_diagnostics(self.uid)

    def close(self):
        """Two phases: unmap the peers here, wait until every process of the mesh has done the same (so no
        mapping of our memory remains), then free. Call it on every process, like every other op."""
        self._ext.intranode_unmap(self.uid)
        self._barrier("unmapped")
        self._ext.intranode_free(self.uid)
        self._release_heap()


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
