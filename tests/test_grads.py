"""Gradients through dispatch -> nonlinear expert function -> combine (check_grads, rev mode, f32), cached
dispatch, and the exact VJP of dispatch alone (= combine of the cotangents) against the oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_ep
import oracle
from conftest import ep_mesh, run_sharded_raw

E, K, H, T = 8, 3, 8, 4


def _buffer(R, **kw):
    return jax_ep.Buffer(ep_mesh(R), num_experts=E, hidden=H, max_tokens_per_rank=T, num_topk=K, **kw)


def _scale(local_idx):
    return 1.0 + 0.3 * jnp.maximum(local_idx, 0).astype(jnp.float32)


def _moe_rank_major(x, idx, w, *, buffer):
    out = jax_ep.dispatch(buffer, x, idx, w, layout="rank_major")
    # per (row, k): weight * tanh(x * s_e), summed over the row's local experts (weights are 0 elsewhere)
    h = jnp.tanh(out.x[:, None, :] * _scale(out.topk_idx)[:, :, None])       # [C, K, H]
    y = jnp.sum(out.topk_weights[:, :, None] * h, axis=1)
    return jax_ep.combine(buffer, y, out.handle)


def _moe_expert_major(x, idx, w, *, buffer):
    out = jax_ep.dispatch(buffer, x, idx, w, layout="expert_major", expert_alignment=2)
    y = jnp.tanh(out.x * _scale(out.topk_idx)[:, None]) + 0.1 * out.x * out.x
    return jax_ep.combine(buffer, y, out.handle, topk_weights=out.topk_weights)


def _moe_cached(x, x2, idx, w, *, buffer, layout):
    out = jax_ep.dispatch(buffer, x, idx, w, layout=layout)
    rows = jax_ep.cached_dispatch(buffer, x2, out.handle)
    y = jnp.tanh(rows) * out.x + rows
    if layout == "rank_major":
        return jax_ep.combine(buffer, y, out.handle)
    return jax_ep.combine(buffer, y, out.handle, topk_weights=out.topk_weights)


def _inputs(R, seed, **routing):
    rng = np.random.default_rng(seed)
    idx, w = oracle.make_routing(rng, R, T, E, K, **routing)
    x = oracle.make_x(rng, R * T, H)
    return rng, jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w)


@pytest.mark.parametrize("R", [2, 4])
@pytest.mark.parametrize("fn", [_moe_rank_major, _moe_expert_major], ids=["rank_major", "expert_major"])
def test_check_grads_moe(fn, R):
    _, x, idx, w = _inputs(R, 10 + R, duplicates=True, invalid=True)
    buf = _buffer(R)
    f = lambda x, w: run_sharded_raw(fn, buf.mesh, x, idx, w, buffer=buf)
    check_grads(f, (x, w), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("layout", ["rank_major", "expert_major"])
def test_check_grads_cached_dispatch(layout):
    R = 4
    rng, x, idx, w = _inputs(R, 20)
    x2 = jnp.asarray(oracle.make_x(rng, R * T, H))
    buf = _buffer(R)
    f = lambda x, x2, w: run_sharded_raw(_moe_cached, buf.mesh, x, x2, idx, w, buffer=buf, layout=layout)
    check_grads(f, (x, x2, w), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


def test_check_grads_with_overflow():
    """Dropped tokens simply get no gradient from the rank that dropped them."""
    R = 4
    _, x, idx, w = _inputs(R, 30, skew=0.7, neg_frac=0.1)
    buf = _buffer(R, max_recv_tokens=5, max_recv_rows=7)
    for fn in (_moe_rank_major, _moe_expert_major):
        f = lambda x, w: run_sharded_raw(fn, buf.mesh, x, idx, w, buffer=buf)
        check_grads(f, (x, w), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


# -- exact VJP of dispatch alone -----------------------------------------------------------------------------

def _dispatch_only(x, idx, w, *, buffer, layout):
    out = jax_ep.dispatch(buffer, x, idx, w, layout=layout, expert_alignment=2)
    return out.x, out.topk_weights


@pytest.mark.parametrize("capacity", [None, (5, 7)], ids=["full", "overflow"])
@pytest.mark.parametrize("layout", ["rank_major", "expert_major"])
def test_dispatch_vjp_is_combine_of_cotangent(layout, capacity):
    R = 4
    rng, x, idx, w = _inputs(R, 40, duplicates=True, invalid=True, skew=0.6 if capacity else None)
    kw = dict(max_recv_tokens=capacity[0], max_recv_rows=capacity[1]) if capacity else {}
    buf = _buffer(R, **kw)
    f = lambda x, w: run_sharded_raw(_dispatch_only, buf.mesh, x, idx, w, buffer=buf, layout=layout)
    (rows, weights), vjp = jax.vjp(f, x, w)
    ct_x = rng.standard_normal(rows.shape).astype(np.float32)        # random on every row, padding included
    ct_w = rng.standard_normal(weights.shape).astype(np.float32)
    dx, dw = (np.asarray(a) for a in vjp((jnp.asarray(ct_x), jnp.asarray(ct_w))))
    idx_np, w_np, x_np = np.asarray(idx), np.asarray(w), np.asarray(x)

    if layout == "rank_major":
        want = oracle.dispatch_rank_major(x_np, idx_np, w_np, R, E, buf.recv_capacity)
        if capacity:
            assert want["overflow"].sum() > 0
        slots = want["slots"]
        _, dx_want, mag = oracle.combine_rank_major(ct_x, slots, np.float32)
        dw_want = np.zeros((R, T, K), np.float32)
        e_loc = E // R
        for s in range(R):
            for t in range(T):
                for k in range(K):
                    e = int(idx_np[s * T + t, k])
                    if 0 <= e < E and slots[s, t, e // e_loc] >= 0:
                        dw_want[s, t, k] = ct_w[e // e_loc, slots[s, t, e // e_loc], k]
    else:
        want = oracle.dispatch_expert_major(x_np, idx_np, w_np, R, E, buf.expert_major_capacity(2), 2,
                                            token_capacity=buf.recv_capacity)
        if capacity:
            assert want["overflow"].sum() > 0
        _, dx_want, mag = oracle.combine_expert_major(ct_x, want["rows"], R, T, np.float32, np.ones(ct_w.shape))
        dw_want = np.zeros((R, T, K), np.float32)
        for r in range(R):
            for pos, s, t, k in want["rows"][r]:
                dw_want[s, t, k] = ct_w[r, pos]
    oracle.assert_close_f32(dx.reshape(R, T, H), dx_want, mag, "d x")
    oracle.assert_bits_equal(dw.reshape(R, T, K), dw_want, "d topk_weights")


def test_combine_vjp_is_cached_dispatch():
    """d combine / d y (rank-major) = the output cotangent dispatched along the same routing."""
    R = 4
    rng, x, idx, w = _inputs(R, 50, duplicates=True)
    buf = _buffer(R)

    def per_rank(x, idx, w, y, *, buffer):
        out = jax_ep.dispatch(buffer, x, idx, w)
        return jax_ep.combine(buffer, y, out.handle)

    y = jnp.asarray(oracle.make_x(rng, R * buf.recv_capacity, H))
    f = lambda y: run_sharded_raw(per_rank, buf.mesh, x, idx, w, y, buffer=buf)
    out, vjp = jax.vjp(f, y)
    ct = rng.standard_normal(out.shape).astype(np.float32)
    (dy,) = vjp(jnp.asarray(ct))
    want = oracle.dispatch_rank_major(ct.reshape(R * T, H), np.asarray(idx), np.asarray(w), R, E, buf.recv_capacity)
    oracle.assert_bits_equal(np.asarray(dy).reshape(R, -1, H), want["x"], "d y")


def _dispatch_fp8(q, s, idx, w, *, buffer, layout):
    out = jax_ep.dispatch(buffer, (q, s), idx, w, layout=layout)
    return out.topk_weights, out.x_scales


@pytest.mark.parametrize("layout", ["rank_major", "expert_major"])
def test_fp8_payload_grads(layout):
    """fp8 payloads are forward-only: zero cotangents of the right shape; the weights still get theirs."""
    R, Hf = 2, 128
    rng = np.random.default_rng(60)
    idx, w = oracle.make_routing(rng, R, T, E, K, duplicates=True)
    q, s = jax_ep.fp8.per_token_cast_to_fp8(jnp.asarray(oracle.make_x(rng, R * T, Hf)))
    buf = jax_ep.Buffer(ep_mesh(R), num_experts=E, hidden=Hf, max_tokens_per_rank=T, num_topk=K)
    f = lambda s, w: run_sharded_raw(_dispatch_fp8, buf.mesh, q, s, jnp.asarray(idx), w, buffer=buf, layout=layout)
    (weights, scales), vjp = jax.vjp(f, s, jnp.asarray(w))
    ct_w = rng.standard_normal(weights.shape).astype(np.float32)
    ds, dw = vjp((jnp.asarray(ct_w), jnp.ones_like(scales)))
    assert ds.shape == s.shape
    np.testing.assert_array_equal(np.asarray(ds), 0)
    # d w = the cotangent of the received entry (oracle as in the bf16/f32 test, via the rows / slots)
    if layout == "rank_major":
        want = oracle.dispatch_rank_major(np.asarray(s).repeat(128, axis=1), idx, w, R, E, buf.recv_capacity)
        slots, e_loc = want["slots"], E // R
        dw_want = np.zeros((R, T, K), np.float32)
        for si in range(R):
            for t in range(T):
                for k in range(K):
                    e = int(idx[si * T + t, k])
                    if 0 <= e < E:
                        dw_want[si, t, k] = ct_w[e // e_loc, slots[si, t, e // e_loc], k]
    else:
        want = oracle.dispatch_expert_major(np.asarray(s).repeat(128, axis=1), idx, w, R, E,
                                            buf.expert_major_capacity(1), 1, token_capacity=buf.recv_capacity)
        dw_want = np.zeros((R, T, K), np.float32)
        for r in range(R):
            for pos, si, t, k in want["rows"][r]:
                dw_want[si, t, k] = ct_w[r, pos]
    oracle.assert_bits_equal(np.asarray(dw).reshape(R, T, K), dw_want, "d topk_weights (fp8 payload)")
