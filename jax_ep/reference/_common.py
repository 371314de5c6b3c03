"""Routing arithmetic shared by the reference modes."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sanitize_ids(topk_idx, num_experts: int):
    """(ids with out-of-range entries replaced by -1, count of out-of-range entries)."""
    in_range = (topk_idx >= 0) & (topk_idx < num_experts)
    invalid = jnp.sum((topk_idx != -1) & ~in_range, dtype=jnp.int32)
    return jnp.where(in_range, topk_idx, -1), invalid


def owner_rank(ids, num_local_experts: int):
    """Rank that owns each (sanitized) global expert id; -1 where the id is -1."""
    return jnp.where(ids >= 0, ids // num_local_experts, -1)


def token_in_rank(ids, num_ranks: int, num_local_experts: int):
    """[T, R] bool: token has at least one expert on rank r."""
    owner = owner_rank(ids, num_local_experts)
    return jnp.any(owner[:, :, None] == jnp.arange(num_ranks, dtype=ids.dtype), axis=1)


def exclusive_cumsum(x, axis=0):
    return jnp.cumsum(x, axis=axis) - x


def to_wire(a):
    """Collectives move fp8 as bytes (not every backend's all_to_all knows fp8 types)."""
    if a.dtype == jnp.float8_e4m3fn:
        return jax.lax.bitcast_convert_type(a, jnp.uint8)
    return a


def from_wire(a, dtype):
    if jnp.dtype(dtype) == jnp.float8_e4m3fn:
        return jax.lax.bitcast_convert_type(a, dtype)
    return a


def all_to_all_blocks(a, axis: str, num_ranks: int):
    """a: [R, N, ...] with block j meant for rank j -> [R, N, ...] with block s received from rank s."""
    shape = a.shape
    flat = a.reshape((shape[0] * shape[1],) + shape[2:])
    out = jax.lax.all_to_all(flat, axis, 0, 0, tiled=True)
    return out.reshape(shape)


def gather_rows(table, index):
    """table[index] with index -1 giving zero rows (never an out-of-bounds read)."""
    safe = jnp.clip(index, 0, table.shape[0] - 1)
    rows = table[safe]
    mask = (index >= 0).reshape(index.shape + (1,) * (rows.ndim - index.ndim))
    return jnp.where(mask, rows, jnp.zeros((), rows.dtype))
