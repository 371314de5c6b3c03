"""GPU: jax_ep.flax.MoE on the CUDA backend equals the same layer on the reference backend (forward and
gradients), and a training step runs under nnx.jit (run this file with XLA command buffers enabled too:
benchmarks/device_run.sh does)."""

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jax_ep.flax import MoE
from tests.gpu.harness import cuda_devices

pytestmark = pytest.mark.gpu


def _layer(mesh, backend):
    n = mesh.shape["ep"]
    return MoE(256, 128, 8 * n, 2, mesh=mesh, rngs=nnx.Rngs(0), router="deepseek_v3", n_group=2, topk_group=1,
               num_shared_experts=1, backend=backend, precision=jax.lax.Precision.HIGHEST)


def _loss(model, x):
    y, aux = model(x)
    return jnp.mean(y * y) + 0.01 * aux["aux_loss"]


@pytest.fixture(scope="module")
def mesh():
    gpus = cuda_devices()
    if not gpus:
        pytest.skip("no GPU")
    return Mesh(np.array(gpus).reshape(1, len(gpus)), ("dp", "ep"))


def test_moe_cuda_matches_reference(mesh):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64 * mesh.shape["ep"], 256)), jnp.float32)
    cuda, ref = _layer(mesh, "cuda"), _layer(mesh, "reference")
    y_c, aux_c = nnx.jit(lambda m, x: m(x))(cuda, x)
    y_r, aux_r = nnx.jit(lambda m, x: m(x))(ref, x)
    np.testing.assert_allclose(np.asarray(y_c), np.asarray(y_r), rtol=1e-4, atol=1e-5)
    assert int(np.sum(aux_c["overflow"])) == int(np.sum(aux_r["overflow"]))
    g_c = nnx.grad(_loss)(cuda, x)
    g_r = nnx.grad(_loss)(ref, x)
    for name in ("router_kernel", "w_gate", "w_up", "w_down"):
        np.testing.assert_allclose(np.asarray(getattr(g_c, name)[...]), np.asarray(getattr(g_r, name)[...]),
                                   rtol=1e-3, atol=1e-6, err_msg=name)


def test_training_step_under_jit(mesh):
    model = _layer(mesh, "cuda")
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((64 * mesh.shape["ep"], 256)), jnp.float32)

    @nnx.jit
    def step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(_loss)(model, x)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, x)) for _ in range(5)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("use_fp8", [False, True])
def test_decode_mode_cuda_matches_reference(mesh, use_fp8):
    """The decode (low-latency) layer on the CUDA kernels equals the reference backend: the kernels leave
    rows past each expert's count unwritten, and the layer must mask them before the experts' output is
    combined (an unmasked garbage row would show up here)."""
    n = mesh.shape["ep"]

    def layer(backend):
        return MoE(256, 128, 8 * n, 2, mesh=mesh, rngs=nnx.Rngs(0), mode="low_latency", max_tokens_per_rank=32,
                   use_fp8=use_fp8, dtype=jnp.bfloat16, num_shared_experts=1, backend=backend)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((32 * n, 256)), jnp.bfloat16)
    y_c, _ = nnx.jit(lambda m, x: m(x))(layer("cuda"), x)
    y_r, _ = nnx.jit(lambda m, x: m(x))(layer("reference"), x)
    y_c, y_r = np.asarray(y_c, np.float32), np.asarray(y_r, np.float32)
    assert np.all(np.isfinite(y_c))
    np.testing.assert_allclose(y_c, y_r, rtol=2e-2, atol=2e-2)
