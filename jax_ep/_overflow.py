"""Opt-in run-time errors for overflow / invalid routing ids (a debug aid: it adds a host callback)."""

from __future__ import annotations

import os

import jax
import numpy as np

_raise_on_overflow = os.environ.get("JAX_EP_RAISE_ON_OVERFLOW", "") not in ("", "0")


class CapacityOverflowError(RuntimeError):
    """Tokens did not fit the receive capacity (see Buffer.max_recv_tokens / max_recv_rows)."""


def set_raise_on_overflow(enabled: bool = True):
    """When enabled, every dispatch traced afterwards raises CapacityOverflowError at run time if any rank
    dropped tokens (or saw expert ids outside [-1, E)). Also set by JAX_EP_RAISE_ON_OVERFLOW=1."""
    global _raise_on_overflow
    if bool(enabled) != _raise_on_overflow:
        jax.clear_caches()  # the flag is read at trace time: drop traces made under the old value
    _raise_on_overflow = bool(enabled)


def raise_on_overflow_enabled() -> bool:
    return _raise_on_overflow


def _check(op, overflow, invalid):
    overflow, invalid = int(np.asarray(overflow)), int(np.asarray(invalid))
    if overflow:
        raise CapacityOverflowError(f"jax_ep.{op}: {overflow} received items did not fit the capacity on a rank; "
                                    "raise Buffer.max_recv_tokens / max_recv_rows")
    if invalid:
        raise CapacityOverflowError(f"jax_ep.{op}: {invalid} routing ids outside [-1, num_experts) were ignored")


def maybe_raise_on_overflow(op, overflow, invalid):
    if _raise_on_overflow:
        jax.debug.callback(lambda o, i: _check(op, o, i), overflow, invalid)


def check_overflow(output):
    """Host-side check of a concrete DispatchOutput (or a stacked one from shard_map): raises
    CapacityOverflowError if any rank overflowed or saw invalid ids."""
    _check("dispatch", np.sum(np.asarray(output.overflow)), np.sum(np.asarray(output.num_invalid_ids)))
