"""HBM device-to-device copy bandwidth B (bytes read + bytes written per second), measured with XLA on
one GPU: the limit the normal-mode targets are expressed against (DESIGN.md section 6)."""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def measure(gib: float = 4.0, repeats: int = 20) -> float:
    n = int(gib * 2**30) // 4
    a = jax.random.normal(jax.random.key(0), (n,), jnp.float32)  # random, never zeros
    copy = jax.jit(lambda v: v * 1.0000001)
    jax.block_until_ready(copy(a))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(copy(a))
        times.append(time.perf_counter() - t0)
    return 2 * a.nbytes / float(np.median(times))


def measure_memcpy(gib: float = 4.0, repeats: int = 20) -> float | None:
    """cudaMemcpy device-to-device through CuPy when it is installed (timed with CUDA events)."""
    try:
        import cupy
    except ImportError:
        return None
    n = int(gib * 2**30)
    src = cupy.random.random(n // 4, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    dst[...] = src
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        dst[...] = src
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) * 1e-3)
    return 2 * src.nbytes / float(np.median(times))


if __name__ == "__main__":
    xla = measure()
    cp = measure_memcpy()
    B = max(xla, cp or 0.0)  # the limit is the best copy this machine shows
    print(json.dumps({"hbm_copy_bytes_per_s": B, "xla_elementwise_bytes_per_s": xla, "cupy_copy_bytes_per_s": cp,
                      "device": jax.devices()[0].device_kind}))
    sys.exit(0)
