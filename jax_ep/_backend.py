"""Backend choice: the CUDA kernels where they exist for the op and the platform, else the reference."""

from __future__ import annotations

import os
import warnings

_BACKENDS = ("cuda", "reference")
_warned = set()


def _cuda():
    from . import _cuda as module  # imported late: it loads the compiled extension
    return module


def _cuda_ops() -> frozenset:
    return frozenset(getattr(_cuda(), "SUPPORTED_OPS", ()))


def resolve(op: str, requested: str | None = None, platform: str | None = None) -> str:
    """Backend name for ``op``. ``requested`` (the Buffer's) wins over ``JAX_EP_BACKEND``, which wins over auto."""
    choice = requested or os.environ.get("JAX_EP_BACKEND") or "auto"
    if choice not in _BACKENDS + ("auto",):
        raise ValueError(f"jax_ep: unknown backend {choice!r} (JAX_EP_BACKEND must be cuda, reference or auto)")
    if choice == "reference":
        return "reference"
    on_gpu = (platform or _default_platform()) in ("gpu", "cuda")
    if choice == "cuda":
        if not _cuda().available():
            raise RuntimeError(f"jax_ep: backend 'cuda' requested but unavailable: {_cuda().extension_error()}")
        if op not in _cuda_ops():
            raise NotImplementedError(f"jax_ep: the cuda backend has no kernel for {op} yet; use 'reference'")
        return "cuda"
    if on_gpu and op in _cuda_ops():
        if _cuda().available():
            return "cuda"
        if "ext" not in _warned:
            _warned.add("ext")
            warnings.warn(f"jax_ep: GPU found but the CUDA extension is unavailable ({_cuda().extension_error()}); "
                          "using the reference backend", RuntimeWarning, stacklevel=3)
    return "reference"


def _default_platform() -> str:
    import jax
    return jax.default_backend()


def platform_of(buffer) -> str:
    return buffer.mesh.devices.flat[0].platform
