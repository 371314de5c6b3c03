"""``get_dispatch_layout``: how many tokens go to each rank and expert."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _backend, _validate
from ._types import DispatchLayout, InternodeDispatchLayout


def get_dispatch_layout(topk_idx, num_experts: int, *, num_ranks: int | None = None, axis: str = "ep",
                        backend: str | None = None, ranks_per_node: int | None = None):
    """Routing summary of this rank's tokens.

    Args:
      topk_idx: ``[T, K] int32`` global expert ids, -1 = none (ids outside [-1, E) are ignored).
      num_experts: E; must be a multiple of the number of ranks.
      num_ranks: R; defaults to the size of mesh axis ``axis`` (then call inside shard_map).
      backend: ``"cuda"`` / ``"reference"`` / None (auto, ``JAX_EP_BACKEND``).
      ranks_per_node: N, ranks per node (consecutive ranks of the axis; N divides R): also report what
        crosses between nodes (docs/internode.md).

    Returns:
      ``DispatchLayout(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32,
      is_token_in_rank [T, R] bool)``; with ``ranks_per_node``, ``InternodeDispatchLayout`` with
      ``num_tokens_per_node [R/N] int32`` and ``is_token_in_node [T, R/N] bool`` as well.
    """
    fn = "get_dispatch_layout"
    if num_ranks is None:
        try:
            num_ranks = int(jax.lax.axis_size(axis))
        except (NameError, KeyError, ValueError, TypeError):
            raise ValueError(f"jax_ep.{fn}: pass num_ranks=, or call inside shard_map over axis {axis!r}") from None
    _validate.check_int_option(fn, "num_experts", num_experts)
    _validate.check_int_option(fn, "num_ranks", num_ranks)
    if num_experts % num_ranks:
        raise ValueError(f"jax_ep.{fn}: num_experts={num_experts} is not divisible by num_ranks={num_ranks}")
    if topk_idx.ndim != 2 or jnp.dtype(topk_idx.dtype) != jnp.dtype(jnp.int32):
        raise ValueError(f"jax_ep.{fn}: topk_idx must be int32 [T, K], got {topk_idx.dtype}{list(topk_idx.shape)}")
    _validate.check_expert_ids(fn, topk_idx, num_experts)
    if ranks_per_node is not None:
        _validate.check_int_option(fn, "ranks_per_node", ranks_per_node)
        if num_ranks % ranks_per_node:
            raise ValueError(f"jax_ep.{fn}: ranks_per_node={ranks_per_node} does not divide num_ranks={num_ranks}")
    if _backend.resolve("get_dispatch_layout", backend) == "cuda":
        from . import _cuda
        layout = DispatchLayout(*_cuda.get_dispatch_layout(topk_idx, num_ranks, num_experts))
    else:
        from .reference.layout import get_dispatch_layout as reference
        layout = reference(topk_idx, num_ranks, num_experts)
    if ranks_per_node is None:
        return layout
    # A node's ranks are consecutive: a token goes to a node when it goes to any of its ranks.
    T = layout.is_token_in_rank.shape[0]
    in_node = jnp.any(layout.is_token_in_rank.reshape(T, num_ranks // ranks_per_node, ranks_per_node), axis=2)
    return InternodeDispatchLayout(*layout, num_tokens_per_node=jnp.sum(in_node, axis=0, dtype=jnp.int32),
                                   is_token_in_node=in_node)
