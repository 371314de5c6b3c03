"""Normal (training / prefill) mode: ``dispatch``, ``combine`` and ``cached_dispatch``, differentiable.

The custom_vjp rules live here, once for every backend: d(dispatch) is a combine of the cotangents through
the handle, d(combine) a cached dispatch. A backend module provides rank-major ``rm_dispatch``,
``rm_combine`` and ``rm_cached_dispatch`` with the signatures of ``jax_ep.reference.normal`` (its handle
dict holds at least ``is_token_in_rank [T, R]``); the expert-major layout is built on them by
``_expert_major`` with local ops only.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp

from . import _backend, _expert_major as em, _validate
from ._buffer import Buffer
from ._overflow import maybe_raise_on_overflow
from ._types import DispatchHandle, DispatchOutput
from .reference.normal import NormalConfig

LAYOUTS = ("rank_major", "expert_major")


def _impl(backend: str):
    return importlib.import_module(
        "jax_ep.reference.normal" if backend == "reference" else "jax_ep.cuda_backend.normal")


# -- dispatch -----------------------------------------------------------------------------------------------

def dispatch(buffer: Buffer, x, topk_idx, topk_weights, *, expert_alignment: int = 1,
             layout: str = "rank_major") -> DispatchOutput:
    """Send each token to the ranks that own its experts (per-rank view, inside ``shard_map``).

    Args:
      buffer: the EP group's ``Buffer``.
      x: ``[T, H]`` bf16 / f32 tokens, or ``(x_fp8 [T, H] float8_e4m3fn, scales [T, H/128] f32)``.
      topk_idx: ``[T, K] int32`` global expert ids, -1 = none.
      topk_weights: ``[T, K] float32`` routing weights.
      expert_alignment: round per-expert counts (and expert-major groups) up to this multiple.
      layout: ``"rank_major"`` (rows by source rank then token; DeepEP's) or ``"expert_major"``
        (one row per (token, local expert), grouped for ``jax.lax.ragged_dot``).

    Returns:
      ``DispatchOutput``; semantics in ``docs/semantics.md``. Differentiable w.r.t. x (bf16/f32) and
      topk_weights.
    """
    fn = "dispatch"
    _validate.check_buffer(fn, buffer)
    data, scales, _ = _validate.check_payload(fn, buffer, x)
    _validate.check_alignment(fn, buffer.hidden, data.dtype)
    _validate.check_topk(fn, buffer, topk_idx, topk_weights, num_tokens=data.shape[0])
    _validate.check_int_option(fn, "expert_alignment", expert_alignment)
    if layout not in LAYOUTS:
        raise ValueError(f"jax_ep.dispatch: layout must be one of {LAYOUTS}, got {layout!r}")
    capacity = buffer.recv_capacity if layout == "rank_major" else buffer.expert_major_capacity(expert_alignment)
    cfg = NormalConfig(axis=buffer.axis, num_ranks=buffer.num_ranks, num_experts=buffer.num_experts,
                       capacity=int(capacity), token_capacity=buffer.recv_capacity,
                       expert_alignment=int(expert_alignment), layout=layout)
    backend = _backend.resolve("dispatch", buffer.backend, _backend.platform_of(buffer))
    if backend == "cuda":
        from .cuda_backend import runtime
        cfg = dataclasses.replace(cfg, runtime_uid=runtime.ensure(buffer).uid, num_nodes=buffer.num_nodes,
                                  max_tokens_per_rank=buffer.max_tokens_per_rank)
    out = _dispatch(cfg, backend, data, scales, topk_idx, topk_weights)
    out["handle"] = DispatchHandle(arrays=out["handle"], backend=backend, config=cfg)
    result = DispatchOutput(**out)
    maybe_raise_on_overflow("dispatch", result.overflow, result.num_invalid_ids)
    return result


def _rm_arrays(cfg, arrays):
    return arrays if cfg.layout == "rank_major" else arrays["rm"]


def _num_tokens(cfg, arrays) -> int:
    return _rm_arrays(cfg, arrays)["is_token_in_rank"].shape[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dispatch(cfg, backend, x, scales, topk_idx, topk_weights):
    rm = _impl(backend).rm_dispatch(cfg, x, scales, topk_idx, topk_weights)
    return rm if cfg.layout == "rank_major" else em.expand(cfg, rm)


def _dispatch_fwd(cfg, backend, x, scales, topk_idx, topk_weights):
    out = _dispatch(cfg, backend, x, scales, topk_idx, topk_weights)
    return out, (out["handle"], out["topk_idx"])


def _dispatch_bwd(cfg, backend, res, ct):
    arrays, recv_idx = res
    impl = _impl(backend)
    rm_arrays = _rm_arrays(cfg, arrays)
    ct_x, ct_w = ct["x"], jnp.where(recv_idx >= 0, ct["topk_weights"], 0.0)
    fp8 = ct_x.dtype == jnp.float8_e4m3fn
    if cfg.layout == "rank_major":
        slot_x, slot_w = ct_x, ct_w
    else:
        slot_x = None if fp8 else em.reduce_rows(arrays, ct_x, jnp.ones(ct_x.shape[:1], jnp.float32))
        slot_w = em.slot_weights(arrays, ct_w)
    dw = impl.rm_combine(cfg, rm_arrays, slot_w)
    if fp8:  # fp8 payloads are forward-only (DeepEP's convention): symbolic zero cotangents (None), which
        # JAX instantiates with the primal's type, shard_map's varying axes included
        return None, None, None, dw
    # Two ops on one buffer must run in the same order on every rank: make the second depend on the first.
    dw, slot_x = jax.lax.optimization_barrier((dw, slot_x))
    dx = impl.rm_combine(cfg, rm_arrays, slot_x).astype(ct_x.dtype)
    return dx, None, None, dw


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


# -- combine ------------------------------------------------------------------------------------------------

def combine(buffer: Buffer, y, handle: DispatchHandle, *, topk_weights=None, bias=None):
    """Return expert outputs to the tokens' source ranks and reduce them (per-rank view).

    Rank-major: ``out[t] = sum over ranks r holding t of y_r[slot(t, r)]`` (unweighted), f32 accumulation,
    output ``[T, H]`` in y's dtype. With ``topk_weights [C, K]`` it returns ``(out, combined_topk_weights
    [T, K])``. Expert-major: ``out[t] = sum_k w[t, k] * y_k`` with ``w = topk_weights [Cx]`` if given (then
    differentiable), else the weights recorded at dispatch. ``bias``: ``[T, H]`` (or a tuple of them)
    added in f32 before the cast.
    """
    fn = "combine"
    _validate.check_buffer(fn, buffer)
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"jax_ep.combine: handle must be a DispatchOutput.handle, got {type(handle).__name__}")
    cfg, arrays = handle.config, handle.arrays
    capacity = cfg.capacity
    if y.ndim != 2 or y.shape != (capacity, buffer.hidden):
        raise ValueError(f"jax_ep.combine: y must be [{capacity}, {buffer.hidden}] (the dispatched rows), "
                         f"got {tuple(y.shape)}")
    if jnp.dtype(y.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f"jax_ep.combine: y must be bfloat16 or float32, got {y.dtype}")
    _validate.check_alignment(fn, buffer.hidden, y.dtype)
    T = _num_tokens(cfg, arrays)
    combined_w = None
    biases = bias if isinstance(bias, (tuple, list)) else () if bias is None else (bias,)
    if cfg.layout == "rank_major":
        # Without a bias the sum is rounded straight to y's dtype by the op (the cuda kernel writes bf16
        # directly: no f32 [T, H] round trip through memory); a bias is added to the f32 sum first.
        out = _combine_rm(cfg, handle.backend, jnp.float32 if biases else y.dtype, y, arrays)
        if topk_weights is not None:
            if topk_weights.ndim != 2 or topk_weights.shape[0] != capacity or topk_weights.dtype != jnp.float32:
                raise ValueError(f"jax_ep.combine: topk_weights must be float32 [{capacity}, K], got "
                                 f"{topk_weights.dtype}{list(topk_weights.shape)}")
            out, topk_weights = jax.lax.optimization_barrier((out, topk_weights))  # same op order on every rank
            combined_w = _combine_rm(cfg, handle.backend, jnp.float32, topk_weights, arrays)
    else:
        if topk_weights is None:
            w = jax.lax.stop_gradient(arrays["row_weights"])
        else:
            if topk_weights.shape != (capacity,) or topk_weights.dtype != jnp.float32:
                raise ValueError(f"jax_ep.combine: expert-major topk_weights must be float32 [{capacity}], "
                                 f"got {topk_weights.dtype}{list(topk_weights.shape)}")
            w = topk_weights
        out = _combine_em(cfg, handle.backend, y, w, arrays)
    for b in biases:
        if tuple(b.shape) != (T, buffer.hidden):
            raise ValueError(f"jax_ep.combine: bias must be [{T}, {buffer.hidden}], got {tuple(b.shape)}")
        out = out + b.astype(jnp.float32)
    out = out.astype(y.dtype)
    return out if combined_w is None else (out, combined_w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _combine_rm(cfg, backend, out_dtype, y, arrays):
    return _impl(backend).rm_combine(cfg, arrays, y, out_dtype)


def _combine_rm_fwd(cfg, backend, out_dtype, y, arrays):
    return _combine_rm(cfg, backend, out_dtype, y, arrays), (arrays, jnp.zeros((0,), y.dtype))


def _combine_rm_bwd(cfg, backend, out_dtype, res, ct):
    arrays, dtype_marker = res
    dy = _impl(backend).rm_cached_dispatch(cfg, arrays, ct)
    return dy.astype(dtype_marker.dtype), None


_combine_rm.defvjp(_combine_rm_fwd, _combine_rm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _combine_em(cfg, backend, y, w, arrays):
    return _impl(backend).rm_combine(cfg, arrays["rm"], em.reduce_rows(arrays, y, w))


def _combine_em_fwd(cfg, backend, y, w, arrays):
    return _combine_em(cfg, backend, y, w, arrays), (y, w, arrays)


def _combine_em_bwd(cfg, backend, res, ct):
    y, w, arrays = res
    g = em.rows_of_slots(arrays, _impl(backend).rm_cached_dispatch(cfg, arrays["rm"], ct)).astype(jnp.float32)
    dy = (g * w[:, None]).astype(y.dtype)
    dw = jnp.sum(y.astype(jnp.float32) * g, axis=1)
    return dy, dw, None


_combine_em.defvjp(_combine_em_fwd, _combine_em_bwd)


# -- cached dispatch ----------------------------------------------------------------------------------------

def cached_dispatch(buffer: Buffer, x, handle: DispatchHandle):
    """Dispatch new ``[T, H]`` rows along a previous dispatch's routing (no layout work): returns the rows
    that dispatch would have produced (``[C, H]`` rank-major, ``[Cx, H]`` expert-major). Differentiable."""
    fn = "cached_dispatch"
    _validate.check_buffer(fn, buffer)
    if not isinstance(handle, DispatchHandle):
        raise TypeError("jax_ep.cached_dispatch: handle must be a DispatchOutput.handle")
    T = _num_tokens(handle.config, handle.arrays)
    if x.ndim != 2 or x.shape[0] != T or jnp.dtype(x.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f"jax_ep.cached_dispatch: x must be bf16/f32 [{T}, H], got {x.dtype}{list(x.shape)}")
    return _cached(handle.config, handle.backend, x, handle.arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _cached(cfg, backend, x, arrays):
    slots = _impl(backend).rm_cached_dispatch(cfg, _rm_arrays(cfg, arrays), x)
    return slots if cfg.layout == "rank_major" else em.rows_of_slots(arrays, slots)


def _cached_fwd(cfg, backend, x, arrays):
    return _cached(cfg, backend, x, arrays), (arrays, jnp.zeros((0,), x.dtype))


def _cached_bwd(cfg, backend, res, ct):
    arrays, marker = res
    if cfg.layout != "rank_major":
        ct = em.reduce_rows(arrays, ct, jnp.ones(ct.shape[:1], jnp.float32))
    dx = _impl(backend).rm_combine(cfg, _rm_arrays(cfg, arrays), ct)
    return dx.astype(marker.dtype), None


_cached.defvjp(_cached_fwd, _cached_bwd)
