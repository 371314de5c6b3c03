"""CUDA low-latency (decode) dispatch / combine as FFI calls: one per phase, and one per whole op.

Same signatures and semantics as ``jax_ep.reference.low_latency``, except that the cuda backend leaves
payload rows past ``count[e]`` untouched (writing the R*T_max-row tail would cost more than the transfer;
``src_info`` marks them -1). A send returns a device-side ticket (the op's epoch) that its receive reads,
so XLA may place independent work between the two while the transfer proceeds. The handle's private
arrays are ``recv_k [E_loc, S]`` (the first k of the source token naming the expert: the source's combine
slot), ``own_bits [E_loc, ceil(T_max / 32)]`` (bit t set when this rank's token t was received for the expert:
where the combine finds its own tokens' answers in y) plus ``src_info`` / ``layout_range`` for the combine
send. A combine's pending token carries ``y``, ``layout_range`` and ``own_bits`` too: a rank's answers to its
own tokens are read from y by the receive, never staged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import fp8 as fp8_lib
from .._cuda import _vary_like as vary_like

_SIDE_EFFECT = dict(has_side_effect=True)  # every rank must run every phase: never CSE'd or removed
_TICKET = jax.ShapeDtypeStruct((2,), jnp.uint32)


def _call(name, results, *args, **attrs):
    fn = jax.ffi.ffi_call(name, results, **_SIDE_EFFECT)
    return fn(*args, **{k: np.int64(v) for k, v in attrs.items()})


def dispatch_send(cfg, x, topk_idx):
    (ticket,) = _call("jax_ep_ll_dispatch_send", (_TICKET,), x, topk_idx, uid=cfg.runtime_uid,
                      use_fp8=cfg.use_fp8, round_scale=cfg.round_scale, use_ue8m0=cfg.use_ue8m0)
    return dict(ticket=vary_like(ticket, topk_idx))


def _dispatch_results(cfg):
    E_loc, S, R = cfg.num_local_experts, cfg.slots, cfg.num_ranks
    sds = jax.ShapeDtypeStruct
    H = cfg.hidden
    if cfg.use_fp8:
        x_sds = sds((E_loc, S, H), fp8_lib.FP8_DTYPE)
        groups = fp8_lib.num_scale_groups(H)
        scale_sds = (sds((E_loc, S, fp8_lib.num_ue8m0_words(groups)), jnp.int32) if cfg.use_ue8m0
                     else sds((E_loc, S, groups), jnp.float32))
    else:
        x_sds = sds((E_loc, S, H), jnp.bfloat16)
        scale_sds = sds((1,), jnp.float32)  # unused by bf16; never zero-sized (see normal.rm_dispatch)
    i32 = jnp.int32
    token_words = (cfg.max_tokens_per_rank + 31) // 32
    return (x_sds, scale_sds, sds((E_loc,), i32), sds((E_loc, S), i32), sds((E_loc, R), i32), sds((E_loc, S), i32),
            sds((E_loc, token_words), i32))


def _dispatch_output(cfg, out):
    x, scales, count, src_info, layout_range, recv_k, own_bits = out
    return dict(x=x, x_scales=scales if cfg.use_fp8 else None, count=count, src_info=src_info,
                layout_range=layout_range,
                arrays=dict(recv_k=recv_k, src_info=src_info, layout_range=layout_range, own_bits=own_bits))


def dispatch_recv(cfg, pending):
    ticket = pending["ticket"]
    out = _call("jax_ep_ll_dispatch_recv", _dispatch_results(cfg), ticket, uid=cfg.runtime_uid, use_fp8=cfg.use_fp8,
                use_ue8m0=cfg.use_ue8m0)
    return _dispatch_output(cfg, vary_like(out, ticket))


def dispatch(cfg, x, topk_idx):
    """Both phases in one call: XLA orders custom calls only by data, and could otherwise schedule several
    independent dispatches' sends ahead of their receives (more results in flight than the buffer holds)."""
    _, *out = _call("jax_ep_ll_dispatch", (_TICKET,) + _dispatch_results(cfg), x, topk_idx, uid=cfg.runtime_uid,
                    use_fp8=cfg.use_fp8, round_scale=cfg.round_scale, use_ue8m0=cfg.use_ue8m0)
    return _dispatch_output(cfg, vary_like(tuple(out), topk_idx))


def combine_send(cfg, y, arrays):
    (ticket,) = _call("jax_ep_ll_combine_send", (_TICKET,), y, arrays["src_info"], arrays["layout_range"],
                      arrays["recv_k"], uid=cfg.runtime_uid)
    # The receive reads a rank's answers to its own tokens from y (the send does not stage them).
    return dict(ticket=vary_like(ticket, y), y=y, layout_range=arrays["layout_range"], own_bits=arrays["own_bits"])


def combine_recv(cfg, pending, topk_idx, topk_weights):
    T = topk_idx.shape[0]
    H = cfg.hidden
    (out,) = _call("jax_ep_ll_combine_recv", (jax.ShapeDtypeStruct((T, H), jnp.bfloat16),), pending["ticket"],
                   pending["y"], pending["layout_range"], pending["own_bits"], topk_idx, topk_weights.astype(jnp.float32),
                   uid=cfg.runtime_uid)
    return vary_like(out, topk_idx)


def combine(cfg, y, arrays, topk_idx, topk_weights):
    """Both phases in one call (see ``dispatch``)."""
    T = topk_idx.shape[0]
    _, out = _call("jax_ep_ll_combine", (_TICKET, jax.ShapeDtypeStruct((T, cfg.hidden), jnp.bfloat16)), y,
                   arrays["src_info"], arrays["layout_range"], arrays["recv_k"], arrays["own_bits"], topk_idx,
                   topk_weights.astype(jnp.float32), uid=cfg.runtime_uid)
    return vary_like(out, topk_idx)
