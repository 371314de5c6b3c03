"""FP8 (e4m3) per-token, per-128-channel quantisation helpers.

This is the fp8 payload format of ``jax_ep`` dispatch (DeepEP convention):

* every token (last axis of ``x``, ``H`` channels) is split into ``H / 128`` groups of
  :data:`GROUP` = 128 consecutive channels;
* per group, ``amax = max(|x|)`` (computed in float32) is clamped from below at
  :data:`AMAX_FLOOR` = 1e-4 (so all-zero / tiny groups never divide by zero) and
  ``scale_inv = amax / 448`` (:data:`FP8_MAX` is the largest finite float8_e4m3fn value),
  computed exactly as ``amax * float32(1/448)`` in float32 (DeepEP's ``amax * kFP8AmaxInv``; can
  be one ulp off a correctly rounded division — kernels must use the same multiply to be
  bit-exact);
* optionally (``round_scale``) ``scale_inv`` is rounded *up* to a power of two,
  ``2 ** ceil(log2(scale_inv))``, so that dequantisation is an exponent add and the scale fits
  in a UE8M0 byte;
* ``x_fp8 = clip(x / scale_inv, -448, 448)`` cast to ``float8_e4m3fn`` (round to nearest even),
  and ``x ~= x_fp8 * scale_inv``. Bit-exactly, ``x / scale_inv`` is ``x * (1 / scale_inv)`` with
  the f32 reciprocal rounded once per group (what XLA compiles a division by a broadcast into; the
  same as a true division for power-of-two scales).

UE8M0 (``use_ue8m0``): a power-of-two float32 scale is stored as its biased exponent byte
(bits 23..30 of the float32, i.e. ``log2(scale) + 127``); four bytes are packed per int32,
little-endian along the group axis (group ``g`` -> byte ``g % 4`` of word ``g // 4``). When
``H / 128`` is not a multiple of 4, the last word is padded with byte 127 (the exponent of 1.0),
so an unpacked padded scale is a harmless 1.0.

Everything is pure JAX (works on CPU/GPU/TPU, inside ``jit`` / ``shard_map`` / ``vmap``) and
accepts arbitrary leading batch dimensions ``[..., H]``. Shape/dtype errors are raised as
``ValueError`` at trace time. The casts are not differentiable (they are quantisation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FP8_MAX",
    "GROUP",
    "AMAX_FLOOR",
    "FP8_DTYPE",
    "per_token_cast_to_fp8",
    "per_token_cast_back",
    "pack_ue8m0",
    "unpack_ue8m0",
    "fp8_payload_bytes",
    "num_scale_groups",
    "num_ue8m0_words",
]

#: Largest finite float8_e4m3fn value.
FP8_MAX = 448.0
#: Channels per scale group.
GROUP = 128
#: Lower clamp of the per-group amax (avoids a zero / denormal scale for all-zero groups).
AMAX_FLOOR = 1e-4
#: The fp8 payload dtype.
FP8_DTYPE = jnp.float8_e4m3fn

# Exponent byte of 1.0f (used to pad the last packed UE8M0 word).
_UE8M0_ONE = 127
# float32(1 / 448): scale_inv = amax * _FP8_MAX_INV (see _cast_to_fp8_impl).
_FP8_MAX_INV = float(np.float32(1.0 / FP8_MAX))
_F32_MANTISSA_MASK = 0x007FFFFF
_F32_EXP_MASK = 0x7F800000


# --------------------------------------------------------------------------------------------
# shape helpers / validation
# --------------------------------------------------------------------------------------------

def num_scale_groups(hidden: int) -> int:
    """Number of 128-channel scale groups of a token with ``hidden`` channels (``hidden / 128``)."""
    _check_hidden(hidden, "hidden")
    return hidden // GROUP


def num_ue8m0_words(num_groups: int) -> int:
    """Number of int32 words holding ``num_groups`` packed UE8M0 bytes (``ceil(num_groups / 4)``)."""
    num_groups = int(num_groups)
    if num_groups < 0:
        raise ValueError(f"num_groups must be >= 0, got {num_groups}")
    return -(-num_groups // 4)


def _check_hidden(hidden: int, what: str) -> None:
    if hidden <= 0 or hidden % GROUP != 0:
        raise ValueError(
            f"{what} must be a positive multiple of {GROUP} (fp8 scales are per {GROUP} channels), "
            f"got {hidden}"
        )


def _check_float_input(x, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension [..., H], got a scalar")
    _check_hidden(x.shape[-1], f"{name}.shape[-1] (hidden)")
    return x


# --------------------------------------------------------------------------------------------
# UE8M0 packing
# --------------------------------------------------------------------------------------------

def _ceil_pow2(s: jax.Array) -> jax.Array:
    """Exact ``2 ** ceil(log2(s))`` for positive normal float32 ``s``, done on the bits.

    Going through exponent bits (not ``exp2(ceil(log2(s)))``) guarantees that an exact power of
    two is never bumped to the next one by rounding error in ``log2``.
    """
    bits = jax.lax.bitcast_convert_type(s, jnp.int32)
    has_mantissa = (bits & _F32_MANTISSA_MASK) != 0
    exp_bits = bits & _F32_EXP_MASK
    # Bump the exponent when any mantissa bit is set; the mantissa is then cleared.
    rounded = jax.lax.bitcast_convert_type(
        exp_bits + jnp.where(has_mantissa, jnp.int32(1 << 23), jnp.int32(0)), jnp.float32
    )
    # inf / nan (non-finite inputs) pass through unchanged instead of wrapping into the sign bit.
    return jnp.where(jnp.isfinite(s), rounded, s)


@jax.jit
def _pack_ue8m0_impl(scales: jax.Array) -> jax.Array:
    g = scales.shape[-1]
    words = num_ue8m0_words(g)
    bits = jax.lax.bitcast_convert_type(scales.astype(jnp.float32), jnp.uint32)
    exp_byte = (bits >> 23) & 0xFF  # sign bit dropped: UE8M0 is unsigned
    pad = words * 4 - g
    if pad:
        pad_width = [(0, 0)] * (exp_byte.ndim - 1) + [(0, pad)]
        exp_byte = jnp.pad(exp_byte, pad_width, constant_values=_UE8M0_ONE)
    exp_byte = exp_byte.reshape(*exp_byte.shape[:-1], words, 4)
    shifts = jnp.arange(4, dtype=jnp.uint32) * 8  # little-endian: byte k at bits 8k..8k+7
    packed = jnp.sum(exp_byte << shifts, axis=-1, dtype=jnp.uint32)  # disjoint bits: sum == or
    return jax.lax.bitcast_convert_type(packed, jnp.int32)


def pack_ue8m0(scales_f32) -> jax.Array:
    """Pack power-of-two float32 scales into UE8M0 bytes, four per int32.

    Args:
      scales_f32: ``[..., G]`` floating array of positive power-of-two scales (e.g. the f32 scales
        of :func:`per_token_cast_to_fp8` with ``round_scale=True``).

    Returns:
      ``[..., ceil(G / 4)]`` int32. Byte ``g % 4`` (little-endian) of word ``g // 4`` holds the
      float32 exponent byte (bits 23..30) of ``scales_f32[..., g]``; missing groups of the last
      word are filled with 127 (= 1.0).

    Only the exponent is kept: a non-power-of-two scale is silently truncated to the power of two
    below it (and the sign is dropped), so round scales first. Not checked, because values are not
    known at trace time.
    """
    scales = jnp.asarray(scales_f32)
    if not jnp.issubdtype(scales.dtype, jnp.floating):
        raise ValueError(f"scales_f32 must have a floating dtype, got {scales.dtype}")
    if scales.ndim < 1:
        raise ValueError("scales_f32 must have at least one dimension [..., G]")
    return _pack_ue8m0_impl(scales)


@functools.partial(jax.jit, static_argnames=("num_groups",))
def _unpack_ue8m0_impl(packed: jax.Array, num_groups: int) -> jax.Array:
    words = jax.lax.bitcast_convert_type(packed, jnp.uint32)
    shifts = jnp.arange(4, dtype=jnp.uint32) * 8
    exp_byte = (words[..., None] >> shifts) & 0xFF  # [..., W, 4]
    # explicit sizes (no -1): the leading dims may be empty (0 tokens)
    exp_byte = exp_byte.reshape(*exp_byte.shape[:-2], words.shape[-1] * 4)[..., :num_groups]
    return jax.lax.bitcast_convert_type(exp_byte << 23, jnp.float32)


def unpack_ue8m0(packed, num_groups: int) -> jax.Array:
    """Inverse of :func:`pack_ue8m0`.

    Args:
      packed: ``[..., ceil(num_groups / 4)]`` int32 (or uint32) packed UE8M0 scales.
      num_groups: number of scale groups ``G`` (static Python int).

    Returns:
      ``[..., G]`` float32 scales ``2 ** (byte - 127)``. (Byte 0 decodes to 0.0 and byte 255 to
      inf; :func:`per_token_cast_to_fp8` never produces them for finite inputs.)
    """
    packed = jnp.asarray(packed)
    if packed.dtype not in (jnp.dtype(jnp.int32), jnp.dtype(jnp.uint32)):
        raise ValueError(f"packed UE8M0 scales must be int32 (or uint32), got {packed.dtype}")
    if packed.ndim < 1:
        raise ValueError("packed UE8M0 scales must have at least one dimension [..., W]")
    num_groups = int(num_groups)
    words = num_ue8m0_words(num_groups)
    if packed.shape[-1] != words:
        raise ValueError(
            f"packed UE8M0 scales for {num_groups} groups need {words} int32 words on the last "
            f"axis, got shape {packed.shape}"
        )
    return _unpack_ue8m0_impl(packed, num_groups)


# --------------------------------------------------------------------------------------------
# quantise / dequantise
# --------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("round_scale", "use_ue8m0"))
def _cast_to_fp8_impl(x: jax.Array, round_scale: bool, use_ue8m0: bool):
    h = x.shape[-1]
    g = h // GROUP
    xg = x.astype(jnp.float32).reshape(*x.shape[:-1], g, GROUP)
    amax = jnp.maximum(jnp.max(jnp.abs(xg), axis=-1), jnp.float32(AMAX_FLOOR))
    # Multiply by the f32 reciprocal rather than divide: XLA rewrites division by a constant into
    # exactly this multiply anyway (so `amax / 448` would not be correctly rounded either), and
    # spelling it out makes the result the same on every backend and equal to DeepEP's kernels
    # (`amax * kFP8AmaxInv`). It may differ from a correctly rounded amax / 448 by one ulp.
    scale_inv = amax * _FP8_MAX_INV
    if round_scale:
        scale_inv = _ceil_pow2(scale_inv)
    # x / scale_inv, spelled as a multiply by the per-group f32 reciprocal: XLA rewrites
    # `x / broadcast(s)` into exactly this, so writing it out pins the rounding on every backend
    # (kernels: one correctly rounded 1/scale_inv per group, then multiplies). Identical to the
    # division when scale_inv is a power of two (round_scale). The clip guards the values at amax,
    # which may land a rounding error above 448 (e4m3fn has no inf: they would become NaN).
    scale = jnp.float32(1.0) / scale_inv
    q = jnp.clip(xg * scale[..., None], -FP8_MAX, FP8_MAX)
    x_fp8 = q.astype(FP8_DTYPE).reshape(x.shape)
    if use_ue8m0:
        return x_fp8, _pack_ue8m0_impl(scale_inv)
    return x_fp8, scale_inv


def per_token_cast_to_fp8(x, *, round_scale: bool = False, use_ue8m0: bool = False):
    """Quantise ``x`` to float8_e4m3fn with one scale per token and 128-channel group.

    Args:
      x: ``[..., H]`` floating array (bf16 / f16 / f32 ...); ``H`` a positive multiple of 128.
        Any leading dims are batch dims (tokens, ``[E, T]`` ...).
      round_scale: round each ``scale_inv`` up to a power of two (``2 ** ceil(log2(.))``).
      use_ue8m0: return the scales packed as UE8M0 (see module docstring). **Implies**
        ``round_scale=True`` (a UE8M0 byte can only hold a power of two), matching
        ``low_latency_dispatch(..., use_ue8m0=True)``.

    Returns:
      ``(x_fp8, scales)``:

      * ``x_fp8``: ``[..., H]`` float8_e4m3fn, ``clip(x * f32(1 / scale_inv), -448, 448)``
        rounded to nearest even;
      * ``scales``: ``[..., H / 128]`` float32 ``scale_inv`` (= ``max(amax, 1e-4) * f32(1/448)``, rounded
        up to a power of two if ``round_scale``), or with ``use_ue8m0`` ``[..., ceil(H / 512)]``
        int32 packed exponent bytes (last word padded with 127 = 1.0 when ``H / 128 % 4 != 0``).

    ``x ~= x_fp8.astype(f32) * scale_inv`` (per group); see :func:`per_token_cast_back`.
    Non-finite inputs give non-finite / NaN outputs for their group.
    """
    x = _check_float_input(x, "x")
    round_scale = bool(round_scale) or bool(use_ue8m0)
    return _cast_to_fp8_impl(x, round_scale, bool(use_ue8m0))


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def _cast_back_impl(x_fp8: jax.Array, scale_inv: jax.Array, out_dtype):
    h = x_fp8.shape[-1]
    g = h // GROUP
    xg = x_fp8.astype(jnp.float32).reshape(*x_fp8.shape[:-1], g, GROUP)
    return (xg * scale_inv[..., None]).reshape(x_fp8.shape).astype(out_dtype)


def per_token_cast_back(x_fp8, scales, *, out_dtype=jnp.bfloat16) -> jax.Array:
    """Dequantise the output of :func:`per_token_cast_to_fp8`.

    Args:
      x_fp8: ``[..., H]`` float8_e4m3fn (any floating dtype is accepted), ``H % 128 == 0``.
      scales: either ``[..., H / 128]`` floating ``scale_inv`` (float32), or packed UE8M0
        ``[..., ceil(H / 512)]`` int32 / uint32 — chosen by dtype. Leading dims must equal those of
        ``x_fp8``.
      out_dtype: output dtype (default bfloat16).

    Returns:
      ``[..., H]`` ``out_dtype``: ``x_fp8.astype(f32) * scale_inv`` broadcast over each group of 128
      channels, computed in float32 then cast. With power-of-two scales the f32 and the packed
      forms give bit-identical results.
    """
    x_fp8 = _check_float_input(x_fp8, "x_fp8")
    scales = jnp.asarray(scales)
    out_dtype = jnp.dtype(out_dtype)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        raise ValueError(f"out_dtype must be a floating dtype, got {out_dtype}")
    lead = x_fp8.shape[:-1]
    g = x_fp8.shape[-1] // GROUP
    if scales.ndim != x_fp8.ndim or scales.shape[:-1] != lead:
        raise ValueError(
            f"scales must have the leading dims of x_fp8 {lead} plus one group axis, "
            f"got scales shape {scales.shape} for x_fp8 shape {x_fp8.shape}"
        )
    if scales.dtype in (jnp.dtype(jnp.int32), jnp.dtype(jnp.uint32)):
        # Packed UE8M0: unpack_ue8m0 checks the word count.
        scale_inv = unpack_ue8m0(scales, g)
    elif jnp.issubdtype(scales.dtype, jnp.floating):
        if scales.shape[-1] != g:
            raise ValueError(
                f"float scales must have H/128 = {g} groups on the last axis, got shape "
                f"{scales.shape} for x_fp8 shape {x_fp8.shape}"
            )
        scale_inv = scales.astype(jnp.float32)
    else:
        raise ValueError(
            f"scales must be float (f32 scale_inv) or int32 (packed UE8M0), got {scales.dtype}"
        )
    return _cast_back_impl(x_fp8, scale_inv, out_dtype)


# --------------------------------------------------------------------------------------------
# byte accounting
# --------------------------------------------------------------------------------------------

def fp8_payload_bytes(hidden: int, use_ue8m0: bool = False) -> int:
    """Bytes one fp8 token occupies on the wire: payload plus its scales (DeepEP's convention).

    ``hidden`` bytes of e4m3 plus ``4 * hidden / 128`` bytes of float32 scales, or with UE8M0
    ``4 * ceil(hidden / 512)`` bytes (int32 words of packed exponent bytes). For example
    ``hidden=7168``: 7392 bytes (f32 scales) or 7224 bytes (UE8M0). No per-token metadata (source
    index, top-k) is included: bandwidth figures count the token data only.
    """
    hidden = int(hidden)
    g = num_scale_groups(hidden)
    scale_bytes = 4 * num_ue8m0_words(g) if use_ue8m0 else 4 * g
    return hidden + scale_bytes
