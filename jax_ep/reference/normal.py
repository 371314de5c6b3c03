"""Reference normal-mode dispatch / combine (rank-major; expert-major is built on it in _expert_major).

Every rank exchanges its per-destination token counts (all_gather), then moves token rows with one
all_to_all of [R, T, ...] blocks: block j of rank s holds, compacted, the tokens s sends to j. Receivers
place rows by (source rank, source token); combine runs the same exchange backwards and sums in f32 in
ascending rank order. Handles hold only integer index arrays, so backward passes never recompute layouts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ._common import (all_to_all_blocks, exclusive_cumsum, from_wire, gather_rows, owner_rank, sanitize_ids,
                      to_wire, token_in_rank)


@dataclasses.dataclass(frozen=True)
class NormalConfig:
    """Static per-call configuration (hashable: used as a nondiff argument of custom_vjp)."""
    axis: str
    num_ranks: int
    num_experts: int
    capacity: int          # output rows: C (rank-major) or Cx (expert-major)
    token_capacity: int    # C: received tokens per rank (the rank-major stage of both layouts)
    expert_alignment: int
    layout: str            # "rank_major" | "expert_major"
    runtime_uid: int = 0   # cuda backend: the Buffer's communication memory
    num_nodes: int = 1     # cuda backend: > 1 = internode kernels (same outputs)
    max_tokens_per_rank: int = 0  # cuda backend, internode: T_max (sizes the forwarder's handle arrays)

    @property
    def num_local_experts(self):
        return self.num_experts // self.num_ranks


# -- token exchange ------------------------------------------------------------------------------------------

def _send_tokens(cfg: NormalConfig, send_pos, arrays):
    """Send row t of each array to every rank r with send_pos[t, r] >= 0, at position send_pos[t, r].

    Returns, per array, the receive table [R*T, ...]: row s*T + i is the i-th row rank s sent here.
    """
    T, R = send_pos.shape
    dest = jnp.where(send_pos >= 0, jnp.arange(R)[None, :] * T + send_pos, R * T)
    tokens = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[:, None], (T, R))
    src_token = jnp.full((R * T,), -1, jnp.int32).at[dest.reshape(-1)].set(tokens.reshape(-1), mode="drop")
    out = []
    for a in arrays:
        block = gather_rows(to_wire(a), src_token).reshape((R, T) + a.shape[1:])
        recv = all_to_all_blocks(block, cfg.axis, R)
        out.append(from_wire(recv.reshape((R * T,) + a.shape[1:]), a.dtype))
    return out


def _return_to_source(cfg: NormalConfig, send_pos, table):
    """Inverse of ``_send_tokens`` with a sum: table [R*T, D] (row s*T+i answers rank s's i-th token)
    -> [T, D] f32, out[t] = sum over ranks r (ascending) with send_pos[t, r] >= 0 of the answer from r."""
    T, R = send_pos.shape
    back = all_to_all_blocks(to_wire(table).reshape((R, T) + table.shape[1:]), cfg.axis, R)
    back = from_wire(back, table.dtype).reshape((R * T,) + table.shape[1:])
    out = jnp.zeros((T,) + table.shape[1:], jnp.float32)
    for r in range(R):  # fixed ascending order: the f32 sum is deterministic and matches the kernels
        index = jnp.where(send_pos[:, r] >= 0, r * T + send_pos[:, r], -1)
        out = out + gather_rows(back, index).astype(jnp.float32)
    return out


def _routing(cfg: NormalConfig, topk_idx):
    """Counts exchange. Returns (ids, invalid, in_rank, pos, counts [R_src, R_dst], me)."""
    R, E_loc = cfg.num_ranks, cfg.num_local_experts
    ids, invalid = sanitize_ids(topk_idx, cfg.num_experts)
    in_rank = token_in_rank(ids, R, E_loc)
    pos = jnp.where(in_rank, jnp.cumsum(in_rank, axis=0, dtype=jnp.int32) - 1, -1)
    counts = jax.lax.all_gather(jnp.sum(in_rank, axis=0, dtype=jnp.int32), cfg.axis)  # [R_src, R_dst]
    me = jax.lax.axis_index(cfg.axis)
    return ids, invalid, in_rank, pos, counts, me


def _local_ids(cfg: NormalConfig, ids, me):
    local = ids - me * cfg.num_local_experts
    return jnp.where((ids >= 0) & (owner_rank(ids, cfg.num_local_experts) == me), local, -1)


def _round_up(x, a):
    return (x + a - 1) // a * a


# -- rank-major ---------------------------------------------------------------------------------------------

def rm_dispatch(cfg: NormalConfig, x, scales, topk_idx, topk_weights):
    T = topk_idx.shape[0]
    C, R = cfg.token_capacity, cfg.num_ranks
    ids, invalid, in_rank, pos, counts, me = _routing(cfg, topk_idx)

    # Sender side: my tokens' slots at each destination; the ones past C are not sent (overflow).
    send_base = exclusive_cumsum(counts, axis=0)[me]                     # [R]
    send_pos = jnp.where(in_rank & (send_base[None, :] + pos < C), pos, -1)

    # Receiver side: slot c holds the i-th token of source s, in (s, i) order.
    from_src = counts[:, me]
    total = jnp.sum(from_src)
    num_recv = jnp.minimum(total, C).astype(jnp.int32)
    slot = jnp.arange(C, dtype=jnp.int32)
    src = jnp.sum(slot[:, None] >= jnp.cumsum(from_src)[None, :], axis=1).astype(jnp.int32)
    src_c = jnp.minimum(src, R - 1)
    recv_src = jnp.where(slot < num_recv, src_c * T + slot - exclusive_cumsum(from_src)[src_c], -1)

    payload = [x, ids, topk_weights] + ([scales] if scales is not None else [])
    tables = _send_tokens(cfg, send_pos, payload)
    recv_x = gather_rows(tables[0], recv_src)
    recv_ids = jnp.where(recv_src[:, None] >= 0, gather_rows(tables[1], recv_src), -1)
    recv_idx = _local_ids(cfg, recv_ids, me)
    recv_w = jnp.where(recv_idx >= 0, gather_rows(tables[2], recv_src), 0.0)
    recv_scales = gather_rows(tables[3], recv_src) if scales is not None else None

    per_expert = jnp.zeros((cfg.num_local_experts,), jnp.int32).at[
        jnp.where(recv_idx >= 0, recv_idx, cfg.num_local_experts).reshape(-1)].add(1, mode="drop")
    arrays = dict(send_pos=send_pos, recv_src=recv_src, is_token_in_rank=in_rank)
    return dict(x=recv_x, x_scales=recv_scales, topk_idx=recv_idx, topk_weights=recv_w, num_recv=num_recv,
                tokens_per_expert=_round_up(per_expert, cfg.expert_alignment),
                overflow=(total - num_recv).astype(jnp.int32), num_invalid_ids=invalid,
                group_sizes=None, handle=arrays)


def rm_combine(cfg: NormalConfig, arrays, y, out_dtype=jnp.float32):
    """y [C, D] -> [T, D]: each received row goes back to its source; sources sum over ranks in f32; the
    sum is rounded once to ``out_dtype``."""
    R = cfg.num_ranks
    T = arrays["send_pos"].shape[0]
    recv_src = arrays["recv_src"]
    table = jnp.zeros((R * T,) + y.shape[1:], y.dtype).at[
        jnp.where(recv_src >= 0, recv_src, R * T)].set(y, mode="drop")
    return _return_to_source(cfg, arrays["send_pos"], table).astype(out_dtype)


def rm_cached_dispatch(cfg: NormalConfig, arrays, x):
    """x [T, D] -> [C, D]: the row each received slot would get, reusing the handle's placement."""
    (table,) = _send_tokens(cfg, arrays["send_pos"], [x])
    return gather_rows(table, arrays["recv_src"])


