"""The CUDA backend's bridge to JAX: loads the compiled extension ``jax_ep._C`` lazily,
registers its XLA FFI handlers, and wraps each custom call with ``jax.ffi.ffi_call``.

Nothing here touches the extension at import time, so ``import jax_ep`` works on
machines without the extension (no nvcc at build time) or without a GPU.

- :func:`available` -- the extension imports *and* JAX has a CUDA backend.
- :func:`extension_error` -- why the extension is unusable (``None`` if it loaded): not
  built, a library missing, or built against newer XLA FFI headers than the running jaxlib.
- :func:`register` -- idempotent ``jax.ffi.register_ffi_target(..., platform="CUDA")``.
- one function per custom call (e.g. :func:`get_dispatch_layout`); each is traceable
  (``jit``, ``shard_map``: call it on the per-rank view) and registers on first use.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import re
import threading
from typing import Any

import numpy as np

import jax
import jax.numpy as jnp

# Ops that have a CUDA kernel (read by jax_ep._backend to pick the backend per op).
SUPPORTED_OPS = frozenset({"get_dispatch_layout", "dispatch", "low_latency_dispatch", "low_latency_combine"})

# XLA FFI target names (must match ffi/module.cc's registrations()).
TARGET_GET_DISPATCH_LAYOUT = "jax_ep_get_dispatch_layout"

_lock = threading.RLock()
_ext: Any = None
_ext_error: str | None = None
_ext_tried = False
_registered = False
_gpu: bool | None = None


def _preload_nvshmem() -> None:
    """Load libnvshmem_host.so.3 from the nvidia-nvshmem-cu13 wheel, RTLD_GLOBAL.

    The extension's RPATH ($ORIGIN/../nvidia/nvshmem/lib) covers a normal install into
    site-packages; this covers the rest (``pip install --target``, PYTHONPATH layouts,
    the wheel installed in another site directory)."""
    try:
        spec = importlib.util.find_spec("nvidia.nvshmem")
    except (ImportError, ValueError):
        return
    if spec is None:
        return
    for d in spec.submodule_search_locations or ():
        path = os.path.join(d, "lib", "libnvshmem_host.so.3")
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                pass  # the import below reports the real failure, if any
            return


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as '0.10.2' or '0.12.0.1'."""
    parts = []
    for piece in str(version).split(".")[:3]:
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def _runtime_jaxlib_version() -> str:
    try:
        import jaxlib.version
        return jaxlib.version.__version__
    except Exception:  # noqa: BLE001
        return getattr(jax.lib, "__version__", "unknown")


def _ffi_headers_error(ext) -> str | None:
    """XLA refuses a handler built against a newer FFI API than the running jaxlib's, and it
    does so when the backend starts, taking the whole backend down. Refuse to register such
    an extension (the reference backend stays usable) and say how to rebuild."""
    built = dict(ext.build_info()).get("jaxlib_version", "unknown")
    running = _runtime_jaxlib_version()
    b, r = _release(built), _release(running)
    if b and r and b > r:
        return (f"jax_ep._C was built against the XLA FFI headers of jaxlib {built} "
                f"(FFI API {dict(ext.build_info()).get('xla_ffi_api_version')}) but jaxlib {running} "
                "is running; XLA would reject its handlers. Rebuild it in this environment "
                "(pip install --no-build-isolation ...) or with the default build requirements "
                "(headers of the oldest supported jax). See docs/build.md.")
    return None


def _load():
    """The extension module, or None (then :func:`extension_error` says why)."""
    global _ext, _ext_error, _ext_tried
    with _lock:
        if not _ext_tried:
            _ext_tried = True
            try:
                _preload_nvshmem()
                ext = importlib.import_module("jax_ep._C")
            except ImportError as e:  # not built (no nvcc), or a library missing
                _ext_error = f"jax_ep._C could not be imported: {type(e).__name__}: {e}"
            else:
                _ext_error = _ffi_headers_error(ext)
                _ext = ext if _ext_error is None else None
        return _ext


def extension_error() -> str | None:
    """Why the CUDA extension is unusable (``None`` when it imported)."""
    _load()
    return _ext_error


def extension():
    """The ``jax_ep._C`` module; raises RuntimeError when it is unavailable."""
    ext = _load()
    if ext is None:
        raise RuntimeError(f"jax_ep: CUDA extension unavailable: {_ext_error}")
    return ext


def build_info() -> dict[str, str] | None:
    """How the extension was built (CUDA archs, CUDA/NVSHMEM/XLA FFI versions), or None when
    it does not import."""
    _load()
    try:
        return dict(importlib.import_module("jax_ep._C").build_info())
    except ImportError:
        return None


def _has_cuda_backend() -> bool:
    global _gpu
    if _gpu is None:
        try:
            _gpu = len(jax.devices("cuda")) > 0
        except Exception:  # RuntimeError: unknown / uninitialisable backend
            _gpu = False
    return _gpu


def available() -> bool:
    """True when the extension imports and JAX has a CUDA backend with >= 1 device."""
    return _load() is not None and _has_cuda_backend()


def register() -> None:
    """Register every FFI target of the extension for platform CUDA (idempotent).

    Works without a GPU too (JAX keeps the registration for when a CUDA plugin loads);
    raises RuntimeError when the extension is unavailable."""
    global _registered
    with _lock:
        if _registered:
            return
        ext = extension()
        for name, capsule in ext.registrations().items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA", api_version=1)
        _registered = True


def _varying_axes(x) -> tuple:
    """Mesh axes over which ``x`` varies (shard_map's check_vma typing); () outside shard_map."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # jax >= 0.10: ManualAxisType
    axes = mat.varying if mat is not None else getattr(aval, "vma", ())
    return tuple(sorted(axes, key=str))


def _vary_like(outs, like):
    """Type the custom call's per-rank results as varying wherever its input varies.

    ffi_call returns results typed invariant under shard_map's check_vma; left so, a
    later psum would be treated as a sum of identical values."""
    axes = _varying_axes(like)
    if not axes:
        return outs
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(outs, axes, to="varying")
    return jax.lax.pvary(outs, axes)  # jax < 0.8.2


def get_dispatch_layout(topk_idx, num_ranks: int, num_experts: int):
    """CUDA ``get_dispatch_layout`` of one rank's routing (docs/semantics.md).

    Args:
      topk_idx: ``[T, K] int32`` global expert ids; -1 = none; ids outside [0, E) are ignored.
      num_ranks: R (static). num_experts: E (static), a multiple of R.

    Returns:
      ``(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32,
      is_token_in_rank [T, R] bool)``.
    """
    num_ranks = int(num_ranks)
    num_experts = int(num_experts)
    if num_ranks <= 0 or num_experts <= 0 or num_experts % num_ranks:
        raise ValueError(f"jax_ep.get_dispatch_layout: need num_experts ({num_experts}) > 0 divisible by "
                         f"num_ranks ({num_ranks}) > 0")
    if num_ranks > 32768:
        raise ValueError(f"jax_ep.get_dispatch_layout: the CUDA kernel supports num_ranks <= 32768, "
                         f"got {num_ranks}")
    shape = tuple(np.shape(topk_idx))
    if len(shape) != 2 or jnp.dtype(topk_idx.dtype) != jnp.dtype(jnp.int32):
        raise ValueError(f"jax_ep.get_dispatch_layout: topk_idx must be int32 [T, K], got "
                         f"{jnp.dtype(topk_idx.dtype)}{list(shape)}")
    register()
    num_tokens = shape[0]
    call = jax.ffi.ffi_call(
        TARGET_GET_DISPATCH_LAYOUT,
        (
            jax.ShapeDtypeStruct((num_ranks,), jnp.int32),
            jax.ShapeDtypeStruct((num_experts,), jnp.int32),
            jax.ShapeDtypeStruct((num_tokens, num_ranks), jnp.bool_),
        ),
        vmap_method="sequential",
    )
    outs = call(topk_idx, num_ranks=np.int64(num_ranks), num_experts=np.int64(num_experts))
    per_rank, per_expert, in_rank = _vary_like(tuple(outs), topk_idx)
    return per_rank, per_expert, in_rank
