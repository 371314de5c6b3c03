"""jax_ep: expert-parallel dispatch / combine for JAX (DeepEP-class kernels as XLA FFI calls).

Public API (all per-rank, inside ``jax.shard_map`` over the EP mesh axis); exact semantics in
``docs/semantics.md``.
"""

from . import fp8
from ._buffer import Buffer
from ._overflow import CapacityOverflowError, check_overflow, set_raise_on_overflow
from ._types import (DispatchHandle, DispatchLayout, DispatchOutput, InternodeDispatchLayout, LowLatencyDispatchOutput, LowLatencyHandle,
                     LowLatencyPending)
from .fp8 import pack_ue8m0, per_token_cast_back, per_token_cast_to_fp8, unpack_ue8m0
from .layout import get_dispatch_layout
from .low_latency import (low_latency_combine, low_latency_combine_recv, low_latency_combine_send,
                          low_latency_dispatch, low_latency_dispatch_recv, low_latency_dispatch_send)
from .normal import cached_dispatch, combine, dispatch

__version__ = "0.1.0"

__all__ = [
    "Buffer", "get_dispatch_layout", "dispatch", "combine", "cached_dispatch",
    "low_latency_dispatch", "low_latency_combine", "low_latency_dispatch_send", "low_latency_dispatch_recv",
    "low_latency_combine_send", "low_latency_combine_recv",
    "DispatchLayout", "InternodeDispatchLayout", "DispatchOutput", "DispatchHandle", "LowLatencyDispatchOutput", "LowLatencyHandle",
    "LowLatencyPending", "CapacityOverflowError", "check_overflow", "set_raise_on_overflow",
    "fp8", "per_token_cast_to_fp8", "per_token_cast_back", "pack_ue8m0", "unpack_ue8m0",
]
