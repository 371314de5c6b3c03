"""GPU: the CUDA normal-mode kernels against the reference backend.

Single process: every local GPU as one rank (R = local GPU count; R=1 on a one-GPU machine).
Multi-process: R ranks as processes through ``jax_ep.launch`` (several per GPU under MPS), running
tests/gpu/mp_normal_check.py, which compares every field with the reference backend on CPU devices.
"""

import os
import shutil
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


def _run(mesh, backend, x, idx, w, T, H, K, E, layout, jit=True):
    buf = jax_ep.Buffer(mesh, num_experts=E, hidden=H, max_tokens_per_rank=T, num_topk=K, backend=backend)

    def fn(x, idx, w):
        out = jax_ep.dispatch(buf, x, idx, w, layout=layout, expert_alignment=4)
        y = (out.x.astype(jnp.float32) * 1.5).astype(x.dtype)
        if layout == "rank_major":
            z = jax_ep.combine(buf, y, out.handle)
        else:
            z = jax_ep.combine(buf, y, out.handle, topk_weights=out.topk_weights)
        return out.x, out.topk_idx, out.topk_weights, out.num_recv[None], z
    f = jax.shard_map(fn, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=(P("ep"),) * 5)
    f = jax.jit(f) if jit else f   # un-jitted: shard_map runs (and compiles) op by op
    return [np.asarray(o) for o in f(x, idx, w)]


@pytest.mark.parametrize("layout", ["rank_major", "expert_major"])
def test_single_process_matches_reference(layout):
    gpus = cuda_devices()
    if not gpus:
        pytest.skip("no GPU")
    R, T, H, K, E = len(gpus), 300, 512, 6, 8 * len(gpus)
    idx, w, x = uniform_inputs(3, R, T, H, K, E)
    got = _run(Mesh(np.array(gpus), ("ep",)), "cuda", x, idx, w, T, H, K, E, layout)
    cpu = jax.devices("cpu")
    if len(cpu) < R:
        pytest.skip("needs as many CPU devices as GPUs for the reference")
    want = _run(Mesh(np.array(cpu[:R]), ("ep",)), "reference", np.asarray(x), idx, w, T, H, K, E, layout)
    for g, wv in zip(got[:4], want[:4]):
        np.testing.assert_array_equal(g, wv)
    np.testing.assert_allclose(got[4].astype(np.float32), want[4].astype(np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("layout", ["rank_major", "expert_major"])
def test_eager_shard_map_matches_jit(layout):
    """Outside jit (shard_map compiling op by op, as nnx.grad or a notebook runs it) on every local GPU: same
    results as under jit. (A zero-sized custom-call operand once crashed XLA's compiler here on 2 GPUs.)"""
    gpus = cuda_devices()
    if not gpus:
        pytest.skip("no GPU")
    R, T, H, K, E = len(gpus), 64, 256, 4, 4 * len(gpus)
    idx, w, x = uniform_inputs(4, R, T, H, K, E)
    mesh = Mesh(np.array(gpus), ("ep",))
    eager = _run(mesh, "cuda", x, idx, w, T, H, K, E, layout, jit=False)
    jitted = _run(mesh, "cuda", x, idx, w, T, H, K, E, layout)
    for g, want in zip(eager, jitted):
        np.testing.assert_array_equal(g, want)


@pytest.mark.parametrize("ranks,transport", [(2, "auto"), (4, "auto"), (8, "auto"), (2, "ipc")])
def test_multi_process_matches_reference(ranks, transport):
    """auto takes NVSHMEM in this harness (one GPU per process); ipc keeps the CUDA IPC mappings covered."""
    run_multi_rank("mp_normal_check.py", ranks, env={"JAX_EP_TRANSPORT": transport})


@pytest.mark.parametrize("ranks,ranks_per_node", [(2, 1), (4, 2), (8, 4), (8, 2)])
def test_internode_virtual_nodes_match_reference(ranks, ranks_per_node):
    """Internode mode with virtual nodes (ranks as processes, NVSHMEM PEs; every cross-node byte goes through
    put-with-signal): every output of the intranode check, plus group-limited routings."""
    run_multi_rank("mp_normal_check.py", ranks, env={"JAX_EP_RANKS_PER_NODE": str(ranks_per_node)})


@pytest.mark.parametrize("ranks_per_node", [None, 1], ids=["intranode", "internode"])
def test_timeout_names_the_missing_rank(ranks_per_node):
    """A peer that never joins: the waiting rank fails within the timeout and says which rank it waited for
    (internode: and at which stage)."""
    if not cuda_devices():
        pytest.skip("no GPU")
    if len(cuda_devices()) < 2 and shutil.which("nvidia-cuda-mps-control") is None:
        pytest.skip("two ranks on one GPU need CUDA MPS")
    cmd = [sys.executable, "-m", "jax_ep.launch", "--nproc", "2", "--timeout", "120", "--",
           sys.executable, os.path.join(ROOT, "tests", "gpu", "mp_timeout_check.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150,
                          env=dict(os.environ, JAX_EP_TIMEOUT_S="3",
                                   **({"JAX_EP_RANKS_PER_NODE": str(ranks_per_node)} if ranks_per_node else {})))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "waiting for rank 1" in proc.stdout
