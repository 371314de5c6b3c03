"""Result containers. All are pytrees, so they pass through jit, shard_map and custom_vjp."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax


class DispatchLayout(NamedTuple):
    """Routing summary of one rank's tokens (``get_dispatch_layout``).

    Attributes:
      num_tokens_per_rank: ``[R] int32`` tokens this rank sends to each rank (a token counts once per rank).
      num_tokens_per_expert: ``[E] int32`` valid (token, k) entries per global expert.
      is_token_in_rank: ``[T, R] bool`` token t has at least one expert on rank r.
    """
    num_tokens_per_rank: jax.Array
    num_tokens_per_expert: jax.Array
    is_token_in_rank: jax.Array


class InternodeDispatchLayout(NamedTuple):
    """``get_dispatch_layout(..., ranks_per_node=N)``: the same summary plus what crosses between nodes.

    Attributes (as ``DispatchLayout``, and):
      num_tokens_per_node: ``[R / N] int32`` tokens this rank sends to each node (a token counts once per
        node, however many of its ranks it goes to): the rows that cross the network in the hierarchical
        design (docs/internode.md), this rank's own node included.
      is_token_in_node: ``[T, R / N] bool``.
    """
    num_tokens_per_rank: jax.Array
    num_tokens_per_expert: jax.Array
    is_token_in_rank: jax.Array
    num_tokens_per_node: jax.Array
    is_token_in_node: jax.Array


class DispatchOutput(NamedTuple):
    """What one rank receives from ``dispatch`` (C = receive capacity, see ``docs/semantics.md``).

    Attributes:
      x: ``[C, H]`` received rows (payload dtype: bf16, f32 or float8_e4m3fn); rows past ``num_recv`` zero.
        Rank-major: ordered by source rank, then source token. Expert-major: ``[Cx, H]`` one row per
        (token, local expert) entry, grouped by local expert, groups padded to ``expert_alignment``.
      x_scales: ``[C, H/128] float32`` fp8 scales (fp8 payload only, else None).
      topk_idx: rank-major ``[C, K] int32`` local expert ids, -1 for other ranks' experts and padding;
        expert-major ``[Cx] int32`` the row's local expert, -1 on padding.
      topk_weights: rank-major ``[C, K] float32`` (0 where idx is -1); expert-major ``[Cx] float32``.
      num_recv: ``[] int32`` valid rows (tokens for rank-major, (token, expert) rows for expert-major).
      tokens_per_expert: ``[E_loc] int32`` received entries per local expert, rounded up to the alignment.
      overflow: ``[] int32`` received items that did not fit the capacity (dropped, never silently).
      num_invalid_ids: ``[] int32`` entries of this rank's input topk_idx outside [-1, E) (treated as -1).
      group_sizes: expert-major ``[E_loc] int32`` padded group sizes for ``jax.lax.ragged_dot``; else None.
      handle: backend pytree consumed by ``combine`` (and the backward passes).
    """
    x: jax.Array
    x_scales: Optional[jax.Array]
    topk_idx: jax.Array
    topk_weights: jax.Array
    num_recv: jax.Array
    tokens_per_expert: jax.Array
    overflow: jax.Array
    num_invalid_ids: jax.Array
    group_sizes: Optional[jax.Array]
    handle: Any


class LowLatencyDispatchOutput(NamedTuple):
    """What one rank receives from ``low_latency_dispatch`` (S = R * T_max slots per local expert).

    Attributes:
      x: ``[E_loc, S, H]`` float8_e4m3fn (use_fp8) or bf16; expert e's rows ordered by source rank, then
        source token; rows past ``count[e]`` zero.
      x_scales: ``[E_loc, S, H/128] float32``, or ``[E_loc, S, ceil(H/512)] int32`` packed UE8M0, or None.
      count: ``[E_loc] int32`` valid rows per local expert.
      handle: ``LowLatencyHandle`` for ``low_latency_combine``.
      cumulative_stats: ``[E_loc] int32`` running per-expert receive counts if requested, else None.
    """
    x: jax.Array
    x_scales: Optional[jax.Array]
    count: jax.Array
    handle: Any
    cumulative_stats: Optional[jax.Array]


def _pytree_dataclass(cls, meta: tuple[str, ...] = ()):
    """Register a frozen dataclass as a pytree; fields in ``meta`` are static (hashable) metadata."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    data = tuple(f.name for f in dataclasses.fields(cls) if f.name not in meta)
    return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))


@lambda c: _pytree_dataclass(c, meta=("backend", "config"))
class DispatchHandle:
    """Everything combine, cached dispatch and the backward passes need; produced by ``dispatch``.

    ``backend`` and ``config`` (a hashable per-call configuration) are static; ``arrays`` is the backend's
    own pytree of integer index arrays.
    """
    arrays: Any
    backend: str
    config: Any

    @property
    def layout(self) -> str:
        return self.config.layout


@lambda c: _pytree_dataclass(c, meta=("backend", "use_fp8", "use_ue8m0"))
class LowLatencyHandle:
    """Low-latency dispatch handle.

    Attributes:
      src_info: ``[E_loc, S] int32`` source token index of each received row (-1 on padding).
      layout_range: ``[E_loc, R] int32`` rows each source rank contributed to each local expert; the rows of
        source rank s start at the exclusive prefix sum over s (deterministic order).
      arrays: backend-private pytree.
    """
    src_info: jax.Array
    layout_range: jax.Array
    arrays: Any
    backend: str
    use_fp8: bool
    use_ue8m0: bool


@lambda c: _pytree_dataclass(c, meta=("backend", "kind"))
class LowLatencyPending:
    """Token returned by a ``*_send`` phase; pass it to the matching ``*_recv``."""
    arrays: Any
    backend: str
    kind: str
