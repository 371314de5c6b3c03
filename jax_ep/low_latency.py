"""Low-latency (decode) mode: expert-major fixed-size receive buffers, fp8 or bf16, split send/recv.

``low_latency_dispatch`` computes ``low_latency_dispatch_recv(low_latency_dispatch_send(...))`` (same for
combine) as one call; calling the phases separately lets XLA schedule independent compute between them.
XLA orders calls only by data: with split phases, a send that must follow another op's receive has to
depend on it (as the next layer's tokens do), or XLA may start it early; a third result in flight fails
the call with a clear error.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax.numpy as jnp

from . import _backend, _validate
from ._buffer import Buffer
from ._limits import FP8_GROUP
from ._types import LowLatencyDispatchOutput, LowLatencyHandle, LowLatencyPending
from .reference.low_latency import LowLatencyConfig


def _impl(backend: str):
    return importlib.import_module(
        "jax_ep.reference.low_latency" if backend == "reference" else "jax_ep.cuda_backend.low_latency")


def _with_runtime(cfg: LowLatencyConfig, buffer: Buffer, backend: str) -> LowLatencyConfig:
    """The cuda backend names the Buffer's communication memory (allocated on first use) in the config."""
    if backend != "cuda":
        return cfg
    from .cuda_backend import runtime
    return dataclasses.replace(cfg, runtime_uid=runtime.ensure(buffer).uid)


def _config(fn, buffer: Buffer, x, topk_idx, use_fp8, round_scale, use_ue8m0):
    _validate.check_buffer(fn, buffer)
    if not buffer.low_latency:
        raise ValueError(f"jax_ep.{fn}: the buffer was built without low_latency=True")
    if x.ndim != 2 or x.shape[1] != buffer.hidden:
        raise ValueError(f"jax_ep.{fn}: x must be [T, {buffer.hidden}], got {tuple(x.shape)}")
    if jnp.dtype(x.dtype) != jnp.dtype(jnp.bfloat16):
        raise ValueError(f"jax_ep.{fn}: x must be bfloat16, got {x.dtype}")
    _validate.check_alignment(fn, buffer.hidden, jnp.bfloat16)
    if use_fp8 and buffer.hidden % FP8_GROUP:
        raise ValueError(f"jax_ep.{fn}: fp8 needs hidden % {FP8_GROUP} == 0, got hidden={buffer.hidden}")
    if use_ue8m0 and not use_fp8:
        raise ValueError(f"jax_ep.{fn}: use_ue8m0 needs use_fp8=True")
    _validate.check_topk(fn, buffer, topk_idx, num_tokens=x.shape[0])
    return LowLatencyConfig(axis=buffer.axis, num_ranks=buffer.num_ranks, num_experts=buffer.num_experts,
                            max_tokens_per_rank=buffer.max_tokens_per_rank, use_fp8=bool(use_fp8),
                            round_scale=bool(round_scale or use_ue8m0), use_ue8m0=bool(use_ue8m0),
                            hidden=buffer.hidden)


def _dispatch_config(fn, buffer, x, topk_idx, use_fp8, round_scale, use_ue8m0):
    cfg = _config(fn, buffer, x, topk_idx, use_fp8, round_scale, use_ue8m0)
    backend = _backend.resolve(fn, buffer.backend, _backend.platform_of(buffer))
    return _with_runtime(cfg, buffer, backend), backend


def low_latency_dispatch_send(buffer: Buffer, x, topk_idx, *, use_fp8: bool = True, round_scale: bool = False,
                              use_ue8m0: bool = False) -> LowLatencyPending:
    """Start a low-latency dispatch; returns a pending token for ``low_latency_dispatch_recv``."""
    cfg, backend = _dispatch_config("low_latency_dispatch", buffer, x, topk_idx, use_fp8, round_scale, use_ue8m0)
    arrays = _impl(backend).dispatch_send(cfg, x, topk_idx)
    return LowLatencyPending(arrays=arrays, backend=backend, kind=_kind("dispatch", cfg))


def low_latency_dispatch_recv(buffer: Buffer, pending: LowLatencyPending, *,
                              cumulative_stats=None) -> LowLatencyDispatchOutput:
    """Complete a low-latency dispatch.

    Returns ``LowLatencyDispatchOutput``: ``x [E_loc, R*T_max, H]`` (fp8 or bf16), ``x_scales``, ``count
    [E_loc]``, ``handle`` (``src_info [E_loc, R*T_max]``, ``layout_range [E_loc, R]``) and, when
    ``cumulative_stats [E_loc] int32`` is given, ``cumulative_stats + count`` (expert-load statistics).
    """
    _validate.check_buffer("low_latency_dispatch", buffer)
    cfg = _pending_config(pending, "dispatch")
    out = _impl(pending.backend).dispatch_recv(cfg, pending.arrays)
    return _dispatch_output(buffer, cfg, pending.backend, out, cumulative_stats)


def _dispatch_output(buffer, cfg, backend, out, cumulative_stats) -> LowLatencyDispatchOutput:
    stats = None
    if cumulative_stats is not None:
        if cumulative_stats.shape != (buffer.num_local_experts,) or cumulative_stats.dtype != jnp.int32:
            raise ValueError(f"jax_ep.low_latency_dispatch: cumulative_stats must be int32 "
                             f"[{buffer.num_local_experts}], got {cumulative_stats.dtype}{list(cumulative_stats.shape)}")
        stats = cumulative_stats + out["count"]
    handle = LowLatencyHandle(src_info=out["src_info"], layout_range=out["layout_range"], arrays=out["arrays"],
                              backend=backend, use_fp8=cfg.use_fp8, use_ue8m0=cfg.use_ue8m0)
    return LowLatencyDispatchOutput(x=out["x"], x_scales=out["x_scales"], count=out["count"], handle=handle,
                                    cumulative_stats=stats)


def low_latency_dispatch(buffer: Buffer, x, topk_idx, *, use_fp8: bool = True, round_scale: bool = False,
                         use_ue8m0: bool = False, cumulative_stats=None) -> LowLatencyDispatchOutput:
    """Decode-mode dispatch of ``x [T, H] bf16`` (T <= T_max) to ``[E_loc, R*T_max, H]`` expert buffers.

    fp8 (default): per-token, per-128-channel e4m3 with f32 scales (``round_scale``: power-of-two scales;
    ``use_ue8m0``: scales packed as UE8M0 bytes in int32). Semantics in ``docs/semantics.md``.
    """
    cfg, backend = _dispatch_config("low_latency_dispatch", buffer, x, topk_idx, use_fp8, round_scale, use_ue8m0)
    out = _impl(backend).dispatch(cfg, x, topk_idx)   # one call: its two phases cannot be scheduled apart
    return _dispatch_output(buffer, cfg, backend, out, cumulative_stats)


def _combine_config(buffer: Buffer, y, handle: LowLatencyHandle) -> LowLatencyConfig:
    fn = "low_latency_combine"
    _validate.check_buffer(fn, buffer)
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError(f"jax_ep.{fn}: handle must be a LowLatencyDispatchOutput.handle")
    shape = (buffer.num_local_experts, buffer.low_latency_slots, buffer.hidden)
    if tuple(y.shape) != shape or jnp.dtype(y.dtype) != jnp.dtype(jnp.bfloat16):
        raise ValueError(f"jax_ep.{fn}: y must be bfloat16 {list(shape)}, got {y.dtype}{list(y.shape)}")
    cfg = LowLatencyConfig(axis=buffer.axis, num_ranks=buffer.num_ranks, num_experts=buffer.num_experts,
                           max_tokens_per_rank=buffer.max_tokens_per_rank, use_fp8=handle.use_fp8,
                           round_scale=False, use_ue8m0=handle.use_ue8m0, hidden=buffer.hidden)
    return _with_runtime(cfg, buffer, handle.backend)


def low_latency_combine_send(buffer: Buffer, y, handle: LowLatencyHandle) -> LowLatencyPending:
    """Start a low-latency combine of expert outputs ``y [E_loc, R*T_max, H] bf16``."""
    cfg = _combine_config(buffer, y, handle)
    arrays = _impl(handle.backend).combine_send(cfg, y, handle.arrays)
    return LowLatencyPending(arrays=arrays, backend=handle.backend, kind=_kind("combine", cfg))


def low_latency_combine_recv(buffer: Buffer, pending: LowLatencyPending, topk_idx, topk_weights):
    """Complete a low-latency combine: ``[T, H] bf16``, ``sum_k w[t, k] * y[expert k][row(t)]`` in f32."""
    fn = "low_latency_combine"
    _validate.check_buffer(fn, buffer)
    _validate.check_topk(fn, buffer, topk_idx, topk_weights)
    cfg = _pending_config(pending, "combine")
    return _impl(pending.backend).combine_recv(cfg, pending.arrays, topk_idx, topk_weights)


def low_latency_combine(buffer: Buffer, y, topk_idx, topk_weights, handle: LowLatencyHandle):
    """Decode-mode combine: weighted (f32) sum of each token's expert outputs, ``[T, H] bf16``."""
    cfg = _combine_config(buffer, y, handle)
    _validate.check_topk("low_latency_combine", buffer, topk_idx, topk_weights)
    return _impl(handle.backend).combine(cfg, y, handle.arrays, topk_idx, topk_weights)


# The pending token's static ``kind`` carries the phase and its config, so recv needs no other state.
def _kind(phase, cfg):
    return (phase, cfg)


def _pending_config(pending, phase):
    if not isinstance(pending, LowLatencyPending) or pending.kind[0] != phase:
        raise TypeError(f"jax_ep.low_latency_{phase}_recv: expects the token returned by "
                        f"low_latency_{phase}_send")
    return pending.kind[1]
