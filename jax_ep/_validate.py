"""Trace-time checks: bad input fails here with a message that names the argument, never in a kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._buffer import Buffer
from ._limits import FP8_GROUP, MAX_TOPK, PAYLOAD_ALIGN_BYTES

FP8_DTYPE = jnp.float8_e4m3fn
PAYLOAD_DTYPES = (jnp.bfloat16, jnp.float32)


def _fail(fn: str, msg: str):
    raise ValueError(f"jax_ep.{fn}: {msg}")


def _shape_dtype(a):
    return tuple(a.shape), jnp.dtype(a.dtype)


def check_buffer(fn: str, buffer):
    if not isinstance(buffer, Buffer):
        raise TypeError(f"jax_ep.{fn}: expected a jax_ep.Buffer as first argument, got {type(buffer).__name__}")
    buffer.check_open()
    # Inside shard_map the EP axis must be bound with the buffer's size: catches a Buffer made for another mesh.
    try:
        size = jax.lax.axis_size(buffer.axis)
    except (NameError, KeyError, ValueError, TypeError):
        raise ValueError(
            f"jax_ep.{fn}: must be called inside jax.shard_map over mesh axis {buffer.axis!r}") from None
    if int(size) != buffer.num_ranks:
        _fail(fn, f"axis {buffer.axis!r} has size {size} here but the buffer was built for {buffer.num_ranks}")


def check_topk(fn: str, buffer: Buffer, topk_idx, topk_weights=None, *, num_tokens=None):
    shape, dtype = _shape_dtype(topk_idx)
    if len(shape) != 2:
        _fail(fn, f"topk_idx must be [T, K], got shape {shape}")
    if dtype != jnp.int32:
        _fail(fn, f"topk_idx must be int32, got {dtype}")
    T, K = shape
    if num_tokens is not None and T != num_tokens:
        _fail(fn, f"topk_idx has {T} rows but x has {num_tokens} tokens")
    if K != buffer.num_topk:
        _fail(fn, f"topk_idx has K={K} columns but the buffer was built for num_topk={buffer.num_topk}")
    if K > MAX_TOPK:
        _fail(fn, f"K={K} exceeds the supported top-k limit {MAX_TOPK}")
    if T > buffer.max_tokens_per_rank:
        _fail(fn, f"{T} tokens exceed the buffer's max_tokens_per_rank={buffer.max_tokens_per_rank}")
    check_expert_ids(fn, topk_idx, buffer.num_experts)
    if topk_weights is not None:
        wshape, wdtype = _shape_dtype(topk_weights)
        if wshape != shape:
            _fail(fn, f"topk_weights shape {wshape} must equal topk_idx shape {shape}")
        if wdtype != jnp.float32:
            _fail(fn, f"topk_weights must be float32, got {wdtype}")


def check_expert_ids(fn: str, topk_idx, num_experts: int):
    """Values are checked only when they are known at trace time; at run time bad ids are counted."""
    if isinstance(topk_idx, jax.core.Tracer):
        return
    try:
        values = np.asarray(topk_idx)
    except Exception:  # noqa: BLE001 - e.g. a non-addressable global array: left to the run-time count
        return
    bad = (values < -1) | (values >= num_experts)
    if bad.any():
        _fail(fn, f"topk_idx holds expert ids outside [-1, {num_experts}): e.g. {int(values[bad][0])}")


def check_payload(fn: str, buffer: Buffer, x):
    """Returns (data, scales_or_None, is_fp8)."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            _fail(fn, "an fp8 payload must be a pair (x_fp8 [T, H] float8_e4m3fn, scales [T, H/128] float32)")
        data, scales = x
        shape, dtype = _shape_dtype(data)
        if dtype != FP8_DTYPE:
            _fail(fn, f"fp8 payload must be float8_e4m3fn, got {dtype}")
        _check_rows(fn, buffer, shape)
        if shape[1] % FP8_GROUP:
            _fail(fn, f"fp8 hidden size {shape[1]} must be a multiple of {FP8_GROUP}")
        sshape, sdtype = _shape_dtype(scales)
        if sshape != (shape[0], shape[1] // FP8_GROUP) or sdtype != jnp.float32:
            _fail(fn, f"fp8 scales must be float32 [{shape[0]}, {shape[1] // FP8_GROUP}], got {sdtype}{list(sshape)}")
        return data, scales, True
    shape, dtype = _shape_dtype(x)
    if dtype not in [jnp.dtype(d) for d in PAYLOAD_DTYPES]:
        _fail(fn, f"x must be bfloat16 or float32 (or an fp8 pair), got {dtype}")
    _check_rows(fn, buffer, shape)
    return x, None, False


def _check_rows(fn, buffer, shape):
    if len(shape) != 2:
        _fail(fn, f"x must be [T, H], got shape {shape}")
    if shape[1] != buffer.hidden:
        _fail(fn, f"x has hidden size {shape[1]} but the buffer was built for hidden={buffer.hidden}")


def check_alignment(fn: str, hidden: int, dtype):
    itemsize = jnp.dtype(dtype).itemsize
    if (hidden * itemsize) % PAYLOAD_ALIGN_BYTES:
        _fail(fn, f"hidden={hidden} rows of {jnp.dtype(dtype)} are not a multiple of "
                  f"{PAYLOAD_ALIGN_BYTES} bytes (need hidden % {PAYLOAD_ALIGN_BYTES // itemsize} == 0)")


def check_int_option(fn: str, name: str, value, minimum: int = 1):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        _fail(fn, f"{name} must be an int >= {minimum}, got {value!r}")
