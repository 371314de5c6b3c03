"""`Buffer`: the static description (and, on GPUs, the owner) of one EP group's communication memory."""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from typing import Any

import jax

from ._limits import MAX_TOPK

# Mutable run-time state hangs off each Buffer object (not keyed by id(): ids are reused after garbage
# collection, which would hand a new Buffer a dead one's memory); equality and hash use the config only.
_STATE_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True, eq=False)
class Buffer:
    """Communication buffer of the EP group along ``mesh`` axis ``axis``.

    Static and hashable: pass it (closed over or as a static argument) to ``jit``-ed functions.

    Args:
      mesh: the device mesh; the EP group is the devices along ``axis``; other axes give independent groups.
      axis: name of the EP mesh axis (default ``"ep"``).
      num_experts: E, global expert count; must be a multiple of the axis size R.
      hidden: H, row width of the dispatched activations.
      max_tokens_per_rank: T_max, the largest per-rank token count passed to dispatch.
      num_topk: K, experts per token (1..32 and <= E).
      max_recv_tokens: C, rank-major receive capacity per rank (default R*T_max: never overflows).
      max_recv_rows: expert-major receive capacity in (token, expert) rows (default: worst case).
      low_latency: enable the low-latency (decode) calls on this buffer.
      backend: ``"cuda"``, ``"reference"`` or None (auto: cuda on GPUs when the extension has the op;
        the ``JAX_EP_BACKEND`` environment variable overrides auto).
      num_sms: the kernels' grid budget in blocks, both modes (DeepEP's name; None: four blocks per SM this process
        sees, which under MPS is its share). The low-latency kernels built for five blocks per SM (the dispatch
        send, the combine receive) take 5/4 of it.
      ranks_per_node: ranks that reach each other by load/store (a node); fewer than the axis size selects
        the internode normal mode (nodes of consecutive ranks, NVSHMEM between nodes; same outputs).
      timeout_s: device-side wait limit before a kernel fails the call naming the rank it waited for.
    """

    mesh: jax.sharding.Mesh
    axis: str = "ep"
    _: dataclasses.KW_ONLY
    num_experts: int
    hidden: int
    max_tokens_per_rank: int
    num_topk: int
    max_recv_tokens: int | None = None
    max_recv_rows: int | None = None
    low_latency: bool = False
    backend: str | None = None
    num_sms: int | None = None
    ranks_per_node: int | None = None
    timeout_s: float = float(os.environ.get("JAX_EP_TIMEOUT_S", "100"))

    def __post_init__(self):
        object.__setattr__(self, "_runtime_state", {"closed": False})
        if not isinstance(self.mesh, jax.sharding.Mesh):
            raise TypeError(f"jax_ep.Buffer: mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}")
        if self.axis not in self.mesh.axis_names:
            raise ValueError(f"jax_ep.Buffer: axis {self.axis!r} is not a mesh axis {self.mesh.axis_names}")
        for name in ("num_experts", "hidden", "max_tokens_per_rank", "num_topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"jax_ep.Buffer: {name} must be a positive int, got {value!r}")
        R = self.num_ranks
        if self.num_experts % R:
            raise ValueError(
                f"jax_ep.Buffer: num_experts={self.num_experts} is not divisible by the {R} ranks of axis "
                f"{self.axis!r}")
        if self.num_topk > min(MAX_TOPK, self.num_experts):
            raise ValueError(
                f"jax_ep.Buffer: num_topk={self.num_topk} too large (at most min({MAX_TOPK}, num_experts))")
        for name in ("max_recv_tokens", "max_recv_rows", "num_sms"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"jax_ep.Buffer: {name} must be None or a positive int, got {value!r}")
        if self.ranks_per_node is not None:
            n = self.ranks_per_node
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0 or R % n:
                raise ValueError(f"jax_ep.Buffer: ranks_per_node={n!r} must be a positive divisor of the {R} ranks")
            if n < R and n > 31:
                raise ValueError(f"jax_ep.Buffer: at most 31 ranks per node in internode mode, got {n}")
            if n < R and self.low_latency:
                raise ValueError("jax_ep.Buffer: low-latency mode over several nodes is not built yet "
                                 "(ranks_per_node < num_ranks with low_latency=True)")
        if self.backend not in (None, "cuda", "reference"):
            raise ValueError(f"jax_ep.Buffer: backend must be None, 'cuda' or 'reference', got {self.backend!r}")
        if not self.timeout_s > 0:
            raise ValueError("jax_ep.Buffer: timeout_s must be positive")

    # -- identity: the config, not the object (jit caches key on it) ---------------------------------------
    def _key(self):
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "_")

    def __eq__(self, other):
        return isinstance(other, Buffer) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    # -- derived sizes --------------------------------------------------------------------------------------
    @property
    def num_ranks(self) -> int:
        """R: devices along the EP axis."""
        return int(self.mesh.shape[self.axis])

    @property
    def num_nodes(self) -> int:
        """Nodes of the EP group: 1 (intranode) unless ranks_per_node splits it (internode mode)."""
        return self.num_ranks // (self.ranks_per_node or self.num_ranks)

    @property
    def num_local_experts(self) -> int:
        """E_loc = E / R: experts owned by each rank."""
        return self.num_experts // self.num_ranks

    @property
    def recv_capacity(self) -> int:
        """C: rank-major receive rows per rank."""
        return self.max_recv_tokens or self.num_ranks * self.max_tokens_per_rank

    def expert_major_capacity(self, expert_alignment: int = 1) -> int:
        """Cx: expert-major receive rows per rank for the given group alignment."""
        if self.max_recv_rows:
            return self.max_recv_rows
        return self.recv_capacity * self.num_topk + self.num_local_experts * (expert_alignment - 1)

    @property
    def low_latency_slots(self) -> int:
        """Rows per local expert in the low-latency receive buffer: R * T_max."""
        return self.num_ranks * self.max_tokens_per_rank

    @property
    def size_hint(self) -> int:
        """Bytes of communication memory one rank's CUDA runtime allocates for this config (mirrors
        cuda/intranode.cu and cuda/low_latency.cu): flags, count matrix, a T_max-row stage of this rank's tokens
        (receivers pull from it), per-slot metadata and a C-row combine stage (rows sized for f32 payloads);
        over several nodes, C staging rows and an R x T_max combine area instead of the stages, network send / receive rows, the
        forwarder's per-node reduce rows and partial sums (cuda/internode.cuh); with ``low_latency``, a
        double-buffered
        staging area of ``2 x R x T_max`` rows (one per source token and owner rank) of ``h + 2H`` bytes, ``h`` =
        ``4 (1 + K)`` rounded up to 16 (the header), its presence bits (``4 x E x ceil(T_max / 32)`` words) and a
        ``2 x T_max x K`` bf16 combine area.
        The reference backend allocates nothing."""
        def area(nbytes):
            return (nbytes + 255) // 256 * 256
        R, C, T, K, H = self.num_ranks, self.recv_capacity, self.max_tokens_per_rank, self.num_topk, self.hidden
        row = (4 * max(H, K) + 15) // 16 * 16
        scales = (4 * math.ceil(H / 128) + 15) // 16 * 16
        # Intranode dispatch pulls rows from each sender's T_max-row stage; internode pushes into C staging rows.
        # Combine likewise: intranode, each rank keeps its C answers for the sources to read; internode pushes
        # them into an R x T_max area at each source.
        staged, stage = (C, 0) if self.num_nodes > 1 else (0, T)
        comb, stage_comb = (R * T, 0) if self.num_nodes > 1 else (0, C)
        sizes = [8, 8, 8 * R, 8 * R, 4 * 2 * R * R, staged * row, staged * scales, 4 * C * K, 4 * C * K, 4 * C,
                 comb * row, stage * row, stage * scales, stage_comb * row]
        if self.num_nodes > 1:  # internode: network rows in and out, the forwarder's reduce rows, partial sums
            M, N = self.num_nodes, R // self.num_nodes
            net = (16 + 4 * N + 8 * K + 15) // 16 * 16 + row + scales
            sizes += [4 * M, 8 * M, 8 * M, 4 * C, M * T * net, M * T * net, M * T * N * row, M * T * row,
                      M * T * row]
        if self.low_latency:
            E = self.num_experts
            stride = ((4 * (1 + K) + 15) // 16 * 16 + 2 * H + 15) // 16 * 16  # header {t, ids[K]}, bf16 payload
            # timing: kLowLatencyTimingWords = 18 + 32 * 4 * 4 u64 (cuda/low_latency_layout.cuh)
            # dispatch presence bits: u32[4][E_loc][R][ceil(T_max / 32)]
            sizes += [8, 8, 16, 8 * (18 + 32 * 4 * 4), 8 * R, 4 * 4 * E * ((T + 31) // 32), 8 * R, 8 * R, 8 * R,
                      2 * R * T * stride, 2 * T * K * 2 * H]
        return int(sum(area(n) for n in sizes))

    # -- lifetime -------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return self._runtime_state

    @property
    def closed(self) -> bool:
        return self._state()["closed"]

    def check_open(self):
        if self.closed:
            raise RuntimeError("jax_ep: this Buffer was closed; create a new one")

    def close(self):
        """Release the communication memory (GPU backends); the buffer can no longer be used."""
        with _STATE_LOCK:
            state = self._state()
            runtime = state.pop("runtime", None)
        if runtime is not None:
            runtime.close()
        state["closed"] = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        return (f"Buffer(axis={self.axis!r}, R={self.num_ranks}, E={self.num_experts}, H={self.hidden}, "
                f"T_max={self.max_tokens_per_rank}, K={self.num_topk}, C={self.recv_capacity}, "
                f"low_latency={self.low_latency}, backend={self.backend})")
