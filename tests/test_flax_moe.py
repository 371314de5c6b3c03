"""CPU tests of jax_ep.flax.MoE against the dense f32 reference and numpy oracles (8 virtual devices,
reference backend)."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

nnx = pytest.importorskip("flax.nnx")

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from jax_ep.flax import MoE, dense_moe  # noqa: E402

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices "
                                "(XLA_FLAGS=--xla_force_host_platform_device_count=8 on CPU)")

H, F = 32, 48
DSV3 = dict(router="deepseek_v3", n_group=4, topk_group=2, routed_scaling_factor=2.5)


def make_mesh(ep: int, dp: int | None = None) -> Mesh:
    dp = dp or len(jax.devices()) // ep
    return Mesh(np.array(jax.devices()[: dp * ep]).reshape(dp, ep), ("dp", "ep"))


def make_moe(ep, *, router="softmax", E=16, K=4, dtype=jnp.float32, seed=0, dp=None, hidden=H, **kw):
    extra = DSV3 if router == "deepseek_v3" else dict(router="softmax")
    m = MoE(hidden, F, E, K, mesh=make_mesh(ep, dp), rngs=nnx.Rngs(seed), dtype=dtype, **extra, **kw)
    if m.score_bias is not None:  # a non-zero bias, so selection and weights use different scores
        m.score_bias[...] = jax.random.uniform(jax.random.key(seed + 7), (E,), minval=-0.2, maxval=0.2)
    return m


def tokens(n, seed=1, hidden=H):
    return jax.random.normal(jax.random.key(seed), (n, hidden), jnp.float32)


@nnx.jit
def run(model, x):
    return model(x)


def relerr(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# -- numpy oracles -----------------------------------------------------------------------------------------

def np_route(m: MoE, x):
    """Independent numpy router: (idx [N, K], weights [N, K], probs [N, E]) in float64."""
    c = m.config.router
    logits = np.asarray(x, np.float64) @ np.asarray(m.router_kernel[...], np.float64)
    if c.kind == "softmax":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        scores = e / e.sum(-1, keepdims=True)
        choice, probs = scores, scores
    else:
        scores = 1.0 / (1.0 + np.exp(-logits))
        probs = scores / scores.sum(-1, keepdims=True)
        choice = scores + np.asarray(m.score_bias[...], np.float64)
        N, E = choice.shape
        g = choice.reshape(N, c.n_group, E // c.n_group)
        gscore = np.sort(g, axis=-1)[..., -2:].sum(-1)
        keep = np.argsort(-gscore, axis=-1, kind="stable")[:, : c.topk_group]
        mask = np.zeros((N, c.n_group), bool)
        np.put_along_axis(mask, keep, True, axis=1)
        choice = np.where(mask[:, :, None], g, -np.inf).reshape(N, E)
    idx = np.argsort(-choice, axis=-1, kind="stable")[:, : c.topk]
    w = np.take_along_axis(scores, idx, axis=-1)
    if c.normalize:
        w = w / w.sum(-1, keepdims=True)
    return idx, w * c.routed_scaling_factor, probs


def np_kept(m: MoE, idx, capacity):
    """[N, K] bool: the (token, k) entries that fit ``capacity`` rows at their expert's rank
    (docs/semantics.md, expert-major: rows by (local expert, source rank, token, k); the first C kept)."""
    dp, ep = m.mesh.shape["dp"], m.mesh.shape["ep"]
    N, K = idx.shape
    T, E_loc = N // (dp * ep), m.config.num_experts // ep
    keep = np.zeros((N, K), bool)
    for g in range(dp):
        for r in range(ep):
            rows = []
            for s in range(ep):
                for t in range(T):
                    n = (g * ep + s) * T + t          # token shards in (dp, ep) mesh order
                    for k in range(K):
                        if idx[n, k] // E_loc == r:
                            rows.append((idx[n, k] % E_loc, s, t, k, n))
            for row in sorted(rows)[:capacity]:
                keep[row[4], row[3]] = True
    return keep


# -- forward -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("router", ["softmax", "deepseek_v3"])
@pytest.mark.parametrize("ep", [1, 2, 4, 8])
def test_forward_matches_dense_f32(ep, router):
    m = make_moe(ep, router=router, num_shared_experts=1 if ep == 2 else 0)
    x = tokens(64)
    y, aux = run(m, x)
    ref, idx, w = dense_moe(m.config, m.arrays(), x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # the routing itself agrees with an independent numpy router
    nidx, nw, _ = np_route(m, x)
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(nidx, -1))
    np.testing.assert_allclose(np.asarray(w), nw, rtol=1e-5, atol=1e-6)
    assert int(aux["overflow"]) == 0


def test_ranks_per_node_keeps_the_results():
    """A layer declared over 2 nodes (internode kernels on GPUs; the reference backend here) computes the same."""
    m = make_moe(8, router="deepseek_v3", ranks_per_node=4)
    x = tokens(64)
    y, _ = run(m, x)
    ref, _, _ = dense_moe(m.config, m.arrays(), x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert m.buffer(8).num_nodes == 2
    with pytest.raises(ValueError, match="low-latency mode over several nodes"):
        make_moe(8, mode="low_latency", ranks_per_node=4)


def test_forward_3d_input_and_sharded_weights():
    m = make_moe(4, dp=2)
    assert m.w_gate[...].sharding.is_equivalent_to(NamedSharding(m.mesh, P("ep")), 3)      # split over ep
    assert m.router_kernel[...].sharding.is_equivalent_to(NamedSharding(m.mesh, P()), 2)   # replicated
    x = tokens(48).reshape(4, 12, H)
    y, _ = run(m, x)
    ref, _, _ = dense_moe(m.config, m.arrays(), x)
    assert y.shape == (4, 12, H)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", ["softmax", "deepseek_v3"])
def test_forward_matches_dense_bf16(router):
    m = make_moe(4, router=router, dtype=jnp.bfloat16, num_shared_experts=2, expert_alignment=8)
    x = tokens(64)
    y, _ = run(m, x)
    ref, _, _ = dense_moe(m.config, m.arrays(), x)
    assert y.dtype == jnp.bfloat16
    assert relerr(y, ref) < 2e-2


# -- backward ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ep,router", [(1, "softmax"), (2, "deepseek_v3"), (4, "softmax"), (8, "deepseek_v3")])
def test_gradients_match_dense(ep, router):
    m = make_moe(ep, router=router, num_shared_experts=1 if ep == 4 else 0)
    x = tokens(64)
    cot = jax.random.normal(jax.random.key(3), x.shape)

    @nnx.jit
    def grads(model, x):
        def loss(model, x):
            y, aux = model(x)
            return jnp.sum(y * cot) + 0.1 * aux["aux_loss"]
        return nnx.grad(loss, argnums=(0, 1))(model, x)

    g_model, g_x = grads(m, x)
    g_model = nnx.to_pure_dict(g_model)

    params = m.arrays()
    bias = params.pop("score_bias", None)

    def ref_loss(params, x):
        full = dict(params, **({"score_bias": bias} if bias is not None else {}))
        y, _, _ = dense_moe(m.config, full, x)
        # aux loss from the same routing, written independently of the layer's psum path
        logits = x @ params["router_kernel"]
        probs = (jax.nn.softmax(logits) if router == "softmax"
                 else jax.nn.sigmoid(logits) / jnp.sum(jax.nn.sigmoid(logits), -1, keepdims=True))
        _, idx, _ = dense_moe(m.config, full, x)
        f = jnp.bincount(idx.reshape(-1), length=m.config.num_experts) / idx.size
        aux = m.config.num_experts * jnp.sum(f * jnp.mean(probs, 0))
        return jnp.sum(y * cot) + 0.1 * aux

    r_params, r_x = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(params, x)
    assert set(g_model) == set(r_params)
    np.testing.assert_allclose(np.asarray(g_x), np.asarray(r_x), rtol=1e-5, atol=1e-5)
    for name in r_params:
        assert relerr(g_model[name], r_params[name]) < 1e-5, name
    assert np.abs(np.asarray(r_params["router_kernel"])).max() > 0  # the router does get a gradient


# -- low-latency mode --------------------------------------------------------------------------------------

@pytest.mark.parametrize("router", ["softmax", "deepseek_v3"])
def test_low_latency_equals_normal(router):
    kw = dict(router=router, E=16, K=4, dtype=jnp.bfloat16, num_shared_experts=1)
    normal = make_moe(8, **kw)
    decode = make_moe(8, mode="low_latency", max_tokens_per_rank=4, **kw)   # same seed: same weights
    x = tokens(16)                                                            # 2 tokens per rank
    y_n, aux_n = run(normal, x)
    y_d, aux_d = run(decode, x)
    assert y_d.dtype == jnp.bfloat16 and y_d.shape == x.shape
    assert relerr(y_d, y_n) < 1e-2
    np.testing.assert_array_equal(np.asarray(aux_d["expert_load"]), np.asarray(aux_n["expert_load"]))


def test_low_latency_fp8_close():
    # fp8 payload: per-128-channel e4m3 (about 2^-4 relative error per element), so a loose bound
    m = make_moe(4, mode="low_latency", use_fp8=True, dtype=jnp.bfloat16, max_tokens_per_rank=4, hidden=128)
    x = tokens(16, hidden=128)
    y, _ = run(m, x)
    ref, _, _ = dense_moe(m.config, m.arrays(), x)
    assert relerr(y, ref) < 8e-2


# -- capacity and statistics ------------------------------------------------------------------------------

@pytest.mark.parametrize("ep", [2, 8])
def test_capacity_overflow_reported_and_dropped(ep):
    m = make_moe(ep, capacity_factor=0.4)
    x = tokens(64, seed=5)
    y, aux = run(m, x)
    T, K = 64 // 8, m.config.topk
    capacity = int(np.ceil(0.4 * T * K))
    assert m.buffer(T).max_recv_rows == capacity
    idx, _, _ = np_route(m, x)
    keep = np_kept(m, idx, capacity)
    assert int(aux["overflow"]) == int((~keep).sum()) > 0
    assert aux["overflow_per_rank"].shape == (8,)
    ref, _, _ = dense_moe(m.config, m.arrays(), x, keep=jnp.asarray(keep))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
    full, _, _ = dense_moe(m.config, m.arrays(), x)
    dropped = ~keep.all(1)
    assert np.abs(np.asarray(full)[dropped] - np.asarray(y)[dropped]).max() > 1e-3  # contributions missing


@pytest.mark.parametrize("router", ["softmax", "deepseek_v3"])
def test_aux_loss_and_load_match_numpy(router):
    m = make_moe(4, router=router)
    x = tokens(64, seed=9)
    _, aux = run(m, x)
    idx, _, probs = np_route(m, x)
    E, K, N = m.config.num_experts, m.config.topk, x.shape[0]
    load = np.bincount(idx.reshape(-1), minlength=E)
    np.testing.assert_array_equal(np.asarray(aux["expert_load"]), load)
    expected = E * np.sum(load / (N * K) * probs.mean(0))
    np.testing.assert_allclose(float(aux["aux_loss"]), expected, rtol=1e-5)


def test_bad_token_count():
    m = make_moe(8)
    with pytest.raises(ValueError, match="not divisible"):
        m(tokens(12))
