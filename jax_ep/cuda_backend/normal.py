"""CUDA rank-major dispatch / combine / cached dispatch (the intranode kernels) as FFI calls.

Same signatures and semantics as ``jax_ep.reference.normal``; ``cfg.runtime_uid`` names the Buffer's
communication memory. The handle holds ``is_token_in_rank``, ``send_slot`` (slot of each token at each
rank, -1 = not sent), ``recv_src`` (source rank * T_max + token per slot) and ``stats``; a Buffer over
several nodes (``cfg.num_nodes > 1``) uses the internode calls, whose handle adds ``node_slot``, ``recv_fwd``,
``fwd_src`` and ``fwd_mask`` (cuda/internode.cuh).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._cuda import _vary_like as vary_like

_SIDE_EFFECT = dict(has_side_effect=True)  # every rank must run every call: never CSE'd or removed


# Internode handle arrays, in the order the internode custom calls take them (cuda/internode.cuh).
_INTERNODE_HANDLE = ("node_slot", "recv_fwd", "fwd_src", "fwd_mask")


def _call(name, results, *args, **attrs):
    fn = jax.ffi.ffi_call(name, results, **_SIDE_EFFECT)
    return fn(*args, **{k: np.int64(v) for k, v in attrs.items()})


def rm_dispatch(cfg, x, scales, topk_idx, topk_weights):
    T, K = topk_idx.shape
    C, R, E_loc = cfg.token_capacity, cfg.num_ranks, cfg.num_experts // cfg.num_ranks
    H = x.shape[1]
    # Without scales: a [T, 1] placeholder in and a [C, 1] result the kernel leaves alone (never zero-sized: XLA's
    # GPU compiler crashes on a zero-sized custom-call buffer in an eager shard_map over several devices).
    scales_in = jnp.zeros((T, 1), jnp.float32) if scales is None else scales
    S = scales_in.shape[1]
    sds = jax.ShapeDtypeStruct
    results = (sds((C, H), x.dtype), sds((C, S), jnp.float32), sds((C, K), jnp.int32), sds((C, K), jnp.float32),
               sds((E_loc,), jnp.int32), sds((4,), jnp.int32), sds((T, R), jnp.bool_), sds((T, R), jnp.int32),
               sds((C,), jnp.int32))
    if cfg.num_nodes > 1:  # internode: the handle also carries the network streams and the forwarder's rows
        M, T_max = cfg.num_nodes, cfg.max_tokens_per_rank
        results += (sds((T, M), jnp.int32), sds((C,), jnp.int32), sds((M * T_max,), jnp.int32),
                    sds((M * T_max,), jnp.int32))
        target = "jax_ep_internode_dispatch"
    else:
        target = "jax_ep_dispatch"
    out = vary_like(_call(target, results, x, scales_in, topk_idx, topk_weights, uid=cfg.runtime_uid,
                          num_experts=cfg.num_experts, expert_alignment=cfg.expert_alignment), topk_idx)
    rx, rs, ridx, rw, tpe, stats, in_rank, send_slot, recv_src = out[:9]
    handle = dict(is_token_in_rank=in_rank, send_slot=send_slot, recv_src=recv_src, stats=stats)
    if cfg.num_nodes > 1:
        handle.update(zip(_INTERNODE_HANDLE, out[9:]))
    return dict(x=rx, x_scales=None if scales is None else rs, topk_idx=ridx, topk_weights=rw,
                num_recv=stats[0], tokens_per_expert=tpe, overflow=stats[1], num_invalid_ids=stats[2],
                group_sizes=None, handle=handle)


def rm_combine(cfg, arrays, y, out_dtype=jnp.float32):
    T = arrays["send_slot"].shape[0]
    y = y if y.dtype in (jnp.bfloat16, jnp.float32) else y.astype(jnp.float32)
    out_dtype = jnp.bfloat16 if jnp.dtype(out_dtype) == jnp.dtype(jnp.bfloat16) else jnp.float32
    operands = (y, arrays["send_slot"], arrays["recv_src"], arrays["stats"])
    target = "jax_ep_combine"
    if cfg.num_nodes > 1:
        operands += tuple(arrays[k] for k in _INTERNODE_HANDLE)
        target = "jax_ep_internode_combine"
    (out,) = _call(target, (jax.ShapeDtypeStruct((T, y.shape[1]), out_dtype),), *operands, uid=cfg.runtime_uid)
    return vary_like(out, y)


def rm_cached_dispatch(cfg, arrays, x):
    C = cfg.token_capacity
    operands = (x, arrays["send_slot"], arrays["recv_src"], arrays["stats"])
    target = "jax_ep_cached_dispatch"
    if cfg.num_nodes > 1:
        operands += (arrays["node_slot"],)
        target = "jax_ep_internode_cached_dispatch"
    (out,) = _call(target, (jax.ShapeDtypeStruct((C, x.shape[1]), x.dtype),), *operands, uid=cfg.runtime_uid)
    return vary_like(out, x)
