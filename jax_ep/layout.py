"""``get_dispatch_layout``: how many tokens go to each rank and expert."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _backend, _validate
from ._types import DispatchLayout


def get_dispatch_layout(topk_idx, num_experts: int, *, num_ranks: int | None = None, axis: str = "ep",
                        backend: str | None = None) -> DispatchLayout:
    """Routing summary of this rank's tokens.

    Args:
      topk_idx: ``[T, K] int32`` global expert ids, -1 = none (ids outside [-1, E) are ignored).
      num_experts: E; must be a multiple of the number of ranks.
      num_ranks: R; defaults to the size of mesh axis ``axis`` (then call inside shard_map).
      backend: ``"cuda"`` / ``"reference"`` / None (auto, ``JAX_EP_BACKEND``).

    Returns:
      ``DispatchLayout(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32,
      is_token_in_rank [T, R] bool)``.
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
    if _backend.resolve("get_dispatch_layout", backend) == "cuda":
        from . import _cuda
        return DispatchLayout(*_cuda.get_dispatch_layout(topk_idx, num_ranks, num_experts))
    from .reference.layout import get_dispatch_layout as reference
    return reference(topk_idx, num_ranks, num_experts)
