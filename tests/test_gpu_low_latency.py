"""GPU: the CUDA low-latency kernels against the reference backend.

Single process: every local GPU as one rank (R=1 on a one-GPU machine). Multi-process: R ranks through
``jax_ep.launch`` (several per GPU under MPS) running tests/gpu/mp_low_latency_check.py. A third send with
two results pending, or receives out of send order, fail with a message (tests/gpu/ll_misuse_check.py, in
its own process: the trap ends the CUDA context).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

import jax_ep
from tests.gpu.harness import cuda_devices, run_multi_rank, uniform_inputs

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(mesh, backend, x, idx, w, T, H, K, E, use_fp8, jit=True):
    buf = jax_ep.Buffer(mesh, num_experts=E, hidden=H, max_tokens_per_rank=T, num_topk=K, low_latency=True,
                        backend=backend)

    def fn(x, idx, w):
        out = jax_ep.low_latency_dispatch(buf, x, idx, use_fp8=use_fp8)
        valid = jnp.arange(out.x.shape[1])[None, :] < out.count[:, None]
        xb = out.x if not use_fp8 else jax.lax.bitcast_convert_type(out.x, jnp.uint8)
        xb = jnp.where(valid[..., None], xb, 0)        # rows past count are unspecified on the cuda backend
        y = jnp.where(valid[..., None], out.x.astype(jnp.float32) * 0.5, 0).astype(jnp.bfloat16)
        z = jax_ep.low_latency_combine(buf, y, idx, w, out.handle)
        return xb, out.count, out.handle.src_info, out.handle.layout_range, z
    f = jax.shard_map(fn, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=(P("ep"),) * 5)
    f = jax.jit(f) if jit else f   # un-jitted: shard_map runs (and compiles) op by op
    return [np.asarray(o) for o in f(x, idx, w)]


@pytest.mark.parametrize("use_fp8", [True, False])
def test_single_process_matches_reference(use_fp8):
    gpus = cuda_devices()
    if not gpus:
        pytest.skip("no GPU")
    R, T, H, K, E = len(gpus), 48, 1024, 6, 12 * len(gpus)
    cpu = jax.devices("cpu")
    if len(cpu) < R:
        pytest.skip("needs as many CPU devices as GPUs for the reference")
    idx, w, x = uniform_inputs(5, R, T, H, K, E)
    got = _run(Mesh(np.array(gpus), ("ep",)), "cuda", x, idx, w, T, H, K, E, use_fp8)
    want = _run(Mesh(np.array(cpu[:R]), ("ep",)), "reference", np.asarray(x), idx, w, T, H, K, E, use_fp8)
    for g, wv in zip(got[:4], want[:4]):
        np.testing.assert_array_equal(g, wv)
    np.testing.assert_allclose(got[4].astype(np.float32), want[4].astype(np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("use_fp8", [True, False])
def test_eager_shard_map_matches_jit(use_fp8):
    """Outside jit, op by op on every local GPU: same results as under jit (bf16 has no scales: its
    placeholder result must not be zero-sized, which crashed XLA's compiler on 2 GPUs)."""
    gpus = cuda_devices()
    if not gpus:
        pytest.skip("no GPU")
    R, T, H, K, E = len(gpus), 16, 512, 4, 8 * len(gpus)
    idx, w, x = uniform_inputs(6, R, T, H, K, E)
    mesh = Mesh(np.array(gpus), ("ep",))
    eager = _run(mesh, "cuda", x, idx, w, T, H, K, E, use_fp8, jit=False)
    jitted = _run(mesh, "cuda", x, idx, w, T, H, K, E, use_fp8)
    for g, want in zip(eager, jitted):
        np.testing.assert_array_equal(g, want)


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_multi_process_matches_reference(ranks):
    run_multi_rank("mp_low_latency_check.py", ranks)


@pytest.mark.parametrize("scenario", ["third_send", "out_of_order"])
def test_misuse_fails_with_message(scenario):
    """A third send while two results are pending, or two pending results received in the wrong order, fails
    the call with a message saying so (tests/gpu/ll_misuse_check.py)."""
    if not cuda_devices():
        pytest.skip("no GPU")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu", "ll_misuse_check.py"), scenario],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
