"""Reference low-latency (decode) dispatch / combine.

Send phase: cast (fp8) and all_gather every rank's tokens and routing; receive phase: each rank picks, per
local expert, the (source rank, token) pairs routed to it, in (source rank, token) order. Combine sends each
(token, k) answer back from the expert's owner and sums ``w * y`` in f32 in ascending k.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .. import fp8 as fp8_lib
from ._common import all_to_all_blocks, from_wire, gather_rows, sanitize_ids, to_wire


@dataclasses.dataclass(frozen=True)
class LowLatencyConfig:
    axis: str
    num_ranks: int
    num_experts: int
    max_tokens_per_rank: int
    use_fp8: bool
    round_scale: bool
    use_ue8m0: bool
    hidden: int = 0
    runtime_uid: int = 0   # the cuda backend's communication memory (0: reference)

    @property
    def num_local_experts(self):
        return self.num_experts // self.num_ranks

    @property
    def slots(self):
        return self.num_ranks * self.max_tokens_per_rank


def dispatch_send(cfg: LowLatencyConfig, x, topk_idx):
    ids, _ = sanitize_ids(topk_idx, cfg.num_experts)
    if cfg.use_fp8:
        data, scales = fp8_lib.per_token_cast_to_fp8(x, round_scale=cfg.round_scale or cfg.use_ue8m0,
                                                     use_ue8m0=cfg.use_ue8m0)
        payload = [data, scales]
    else:
        payload = [x.astype(jnp.bfloat16)]
    gathered = [from_wire(jax.lax.all_gather(to_wire(a), cfg.axis), a.dtype) for a in payload]
    return dict(payload=gathered, ids=jax.lax.all_gather(ids, cfg.axis))   # [R, T, ...]


def dispatch_recv(cfg: LowLatencyConfig, pending):
    ids_all = pending["ids"]                                  # [R, T, K]
    R, T, K = ids_all.shape
    E_loc, S = cfg.num_local_experts, cfg.slots
    me = jax.lax.axis_index(cfg.axis)
    experts = me * E_loc + jnp.arange(E_loc)
    hit = jnp.any(ids_all[..., None] == experts, axis=2)      # [R, T, E_loc]: one row per (token, expert)
    flat_hit = hit.reshape(R * T, E_loc)
    pos = jnp.cumsum(flat_hit, axis=0, dtype=jnp.int32) - 1   # (source rank, token) order
    count = jnp.sum(flat_hit, axis=0, dtype=jnp.int32)
    layout_range = jnp.sum(hit, axis=1, dtype=jnp.int32).T    # [E_loc, R]
    target = jnp.where(flat_hit, jnp.arange(E_loc)[None, :] * S + pos, E_loc * S)
    src = jnp.broadcast_to(jnp.arange(R * T, dtype=jnp.int32)[:, None], (R * T, E_loc))
    row_src = jnp.full((E_loc * S,), -1, jnp.int32).at[target.reshape(-1)].set(src.reshape(-1), mode="drop")
    outs = [gather_rows(a.reshape((R * T,) + a.shape[2:]), row_src).reshape((E_loc, S) + a.shape[2:])
            for a in pending["payload"]]
    src_info = jnp.where(row_src >= 0, row_src % T, -1).reshape(E_loc, S)
    # recv_row[s, t, k]: this rank's row answering (s, t, k), -1 if expert k is not local.
    local = ids_all - me * E_loc
    is_local = (ids_all >= 0) & (local >= 0) & (local < E_loc)
    local_c = jnp.clip(local, 0, E_loc - 1)
    row_of = jnp.take_along_axis(pos.reshape(R, T, E_loc), local_c, axis=2)
    recv_row = jnp.where(is_local, local_c * S + row_of, -1)
    return dict(x=outs[0], x_scales=outs[1] if cfg.use_fp8 else None, count=count, src_info=src_info,
                layout_range=layout_range, arrays=dict(recv_row=recv_row))


def combine_send(cfg: LowLatencyConfig, y, arrays):
    """y [E_loc, S, H] -> the answers for every (source rank, token, k), sent back to the sources."""
    recv_row = arrays["recv_row"]                             # [R, T, K]
    R, T, K = recv_row.shape
    flat_y = y.reshape((-1,) + y.shape[2:])
    answers = gather_rows(flat_y, recv_row.reshape(-1)).reshape((R, T * K) + y.shape[2:])
    return dict(back=all_to_all_blocks(answers, cfg.axis, R).reshape((R, T, K) + y.shape[2:]))


def combine_recv(cfg: LowLatencyConfig, pending, topk_idx, topk_weights):
    back = pending["back"]                                    # [R_owner, T, K, H]
    ids, _ = sanitize_ids(topk_idx, cfg.num_experts)
    T, K = ids.shape
    owner = jnp.where(ids >= 0, ids // cfg.num_local_experts, 0)
    out = jnp.zeros((T,) + back.shape[3:], jnp.float32)
    for k in range(K):   # ascending k, f32: matches the kernels' order
        yk = back[owner[:, k], jnp.arange(T), k].astype(jnp.float32)
        wk = jnp.where(ids[:, k] >= 0, topk_weights[:, k], 0.0)
        out = out + jnp.where((ids[:, k] >= 0)[:, None], yk * wk[:, None], 0.0)
    return out.astype(jnp.bfloat16)


def dispatch(cfg: LowLatencyConfig, x, topk_idx):
    return dispatch_recv(cfg, dispatch_send(cfg, x, topk_idx))


def combine(cfg: LowLatencyConfig, y, arrays, topk_idx, topk_weights):
    return combine_recv(cfg, combine_send(cfg, y, arrays), topk_idx, topk_weights)
