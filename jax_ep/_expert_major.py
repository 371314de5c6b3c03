"""Expert-major layout on top of any backend's rank-major dispatch / combine.

The received tokens (rank-major slots, in (source rank, token) order) are expanded locally into one row per
(slot, k) whose expert is local, grouped by expert, groups padded to the alignment. Only local XLA ops
(a stable sort and gathers) run here, so every backend shares this code and its exact row order; combine
first reduces a token's rows (f32, ascending k) and then uses the backend's rank-major combine.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .reference._common import exclusive_cumsum, gather_rows


def _round_up(x, a):
    return (x + a - 1) // a * a


def expand(cfg, rm: dict) -> dict:
    """rank-major dispatch result (capacity C) -> expert-major result (capacity cfg.capacity rows)."""
    idx = rm["topk_idx"]                                     # [C, K] local ids, -1 elsewhere
    C, K = idx.shape
    E_loc, Cx, A = cfg.num_local_experts, cfg.capacity, cfg.expert_alignment
    key = jnp.where(idx >= 0, idx, E_loc).reshape(-1)        # entries in (slot, k) order
    order = jnp.argsort(key, stable=True)                    # -> (expert, slot, k) order
    n_e = jnp.zeros((E_loc + 1,), jnp.int32).at[key].add(1)[:E_loc]
    padded = _round_up(n_e, A)
    group_start = exclusive_cumsum(padded)
    sorted_key = key[order]
    e_c = jnp.minimum(sorted_key, E_loc - 1)
    rank_in_group = jnp.arange(key.shape[0], dtype=jnp.int32) - exclusive_cumsum(n_e)[e_c]
    dest = jnp.where(sorted_key < E_loc, group_start[e_c] + rank_in_group, -1)
    dest = jnp.where(dest < Cx, dest, -1)
    entry_row = jnp.zeros_like(key).at[order].set(dest)      # row of each (slot, k), -1 if none / dropped

    target = jnp.where(entry_row >= 0, entry_row, Cx)
    entry = jnp.arange(key.shape[0], dtype=jnp.int32)
    row_slot = jnp.full((Cx,), -1, jnp.int32).at[target].set(entry // K, mode="drop")
    row_e = jnp.full((Cx,), -1, jnp.int32).at[target].set(key, mode="drop")
    row_w = jnp.zeros((Cx,), jnp.float32).at[target].set(rm["topk_weights"].reshape(-1), mode="drop")
    num_rows = jnp.sum(entry_row >= 0, dtype=jnp.int32)
    group_sizes = jnp.clip(Cx - group_start, 0, padded).astype(jnp.int32)
    scales = rm["x_scales"]
    arrays = dict(rm=rm["handle"], row_slot=row_slot, slot_rows=entry_row.reshape(C, K), row_weights=row_w)
    return dict(x=gather_rows(rm["x"], row_slot), x_scales=None if scales is None else gather_rows(scales, row_slot),
                topk_idx=row_e, topk_weights=row_w, num_recv=num_rows, tokens_per_expert=group_sizes,
                overflow=(rm["overflow"] + jnp.sum(n_e) - num_rows).astype(jnp.int32),
                num_invalid_ids=rm["num_invalid_ids"], group_sizes=group_sizes, handle=arrays)


def rank_major_config(cfg, rm_capacity: int):
    return dataclasses.replace(cfg, capacity=rm_capacity, layout="rank_major", expert_alignment=1)


def reduce_rows(arrays, y, w):
    """[Cx, D] rows, [Cx] weights -> [C, D] f32 per received slot: sum over its rows in ascending k."""
    slot_rows = arrays["slot_rows"]
    out = jnp.zeros((slot_rows.shape[0],) + y.shape[1:], jnp.float32)
    for k in range(slot_rows.shape[1]):
        rows = slot_rows[:, k]
        wk = jnp.where(rows >= 0, w[jnp.maximum(rows, 0)], 0.0)
        out = out + gather_rows(y, rows).astype(jnp.float32) * wk.reshape((-1,) + (1,) * (y.ndim - 1))
    return out


def rows_of_slots(arrays, slot_values):
    """[C, D] per-slot values -> [Cx, D] per-row values (zero on padding)."""
    return gather_rows(slot_values, arrays["row_slot"])


def slot_weights(arrays, row_values):
    """[Cx] per-row values -> [C, K] per-(slot, k) values (zero where no row)."""
    slot_rows = arrays["slot_rows"]
    return jnp.where(slot_rows >= 0, row_values[jnp.maximum(slot_rows, 0)], 0.0).astype(jnp.float32)
