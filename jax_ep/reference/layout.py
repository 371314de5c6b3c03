"""Reference ``get_dispatch_layout``."""

from __future__ import annotations

import jax.numpy as jnp

from .._types import DispatchLayout
from ._common import sanitize_ids, token_in_rank


def get_dispatch_layout(topk_idx, num_ranks: int, num_experts: int) -> DispatchLayout:
    ids, _ = sanitize_ids(topk_idx, num_experts)
    in_rank = token_in_rank(ids, num_ranks, num_experts // num_ranks)
    # -1 entries index one past the end and are dropped (a negative index would wrap).
    slots = jnp.where(ids >= 0, ids, num_experts).reshape(-1)
    per_expert = jnp.zeros((num_experts,), jnp.int32).at[slots].add(1, mode="drop")
    return DispatchLayout(
        num_tokens_per_rank=jnp.sum(in_rank, axis=0, dtype=jnp.int32),
        num_tokens_per_expert=per_expert,
        is_token_in_rank=in_rank,
    )
