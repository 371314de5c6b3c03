"""combine vs the numpy oracle (both layouts, bias, combined weights) and dispatch -> f -> combine round trips."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
import oracle
from conftest import ep_mesh, run_sharded


@dataclasses.dataclass(frozen=True)
class Cfg:
    R: int
    E: int
    K: int
    H: int
    T: int
    dtype: str
    align: int
    max_recv_tokens: int | None = None
    max_recv_rows: int | None = None

    @property
    def id(self):
        extra = "".join(f"-{k}{v}" for k, v in (("C", self.max_recv_tokens), ("Cx", self.max_recv_rows))
                        if v is not None)
        return f"R{self.R}-E{self.E}-K{self.K}-H{self.H}-T{self.T}-{self.dtype}-A{self.align}{extra}"

    @property
    def np_dtype(self):
        return oracle.BF16 if self.dtype == "bf16" else np.float32

    def buffer(self):
        return jax_ep.Buffer(ep_mesh(self.R), num_experts=self.E, hidden=self.H, max_tokens_per_rank=self.T,
                             num_topk=self.K, max_recv_tokens=self.max_recv_tokens,
                             max_recv_rows=self.max_recv_rows)


CFGS = [
    Cfg(1, 4, 2, 32, 8, "f32", 1),
    Cfg(2, 8, 3, 64, 5, "bf16", 4),
    Cfg(4, 16, 4, 64, 8, "f32", 4),
    Cfg(8, 16, 4, 64, 8, "bf16", 1),
    Cfg(8, 32, 8, 32, 4, "f32", 16),
]
OVERFLOW_CFGS = [
    Cfg(4, 16, 4, 64, 8, "bf16", 4, max_recv_tokens=10, max_recv_rows=24),
    Cfg(8, 16, 4, 32, 6, "f32", 1, max_recv_tokens=9),
]


# -- per-rank functions --------------------------------------------------------------------------------------

def _combine_all(x, idx, w, y_rm, y_em, w_rm, w_em, b1, b2, *, buffer, align):
    rm = jax_ep.dispatch(buffer, x, idx, w, expert_alignment=align, layout="rank_major")
    out_rm, cw = jax_ep.combine(buffer, y_rm, rm.handle, topk_weights=w_rm, bias=(b1, b2))
    out_rm_plain = jax_ep.combine(buffer, y_rm, rm.handle)
    em = jax_ep.dispatch(buffer, x, idx, w, expert_alignment=align, layout="expert_major")
    out_em_h = jax_ep.combine(buffer, y_em, em.handle, bias=b1)
    out_em_w = jax_ep.combine(buffer, y_em, em.handle, topk_weights=w_em)
    return dict(out_rm=out_rm, cw=cw, out_rm_plain=out_rm_plain, out_em_h=out_em_h, out_em_w=out_em_w)


def expert_fn(rows, local_idx, first_expert):
    """A nonlinear per-row function that depends on the row's (global) expert (any value on padding rows)."""
    e = (first_expert + jnp.maximum(local_idx, 0)).astype(jnp.float32)[:, None]
    xf = rows.astype(jnp.float32)
    return (jnp.tanh(xf) * (1.0 + 0.25 * e) + 0.1 * xf * xf).astype(rows.dtype)


def expert_fn_np(x, e_global):
    xf = x.astype(np.float64)
    return np.tanh(xf) * (1.0 + 0.25 * e_global) + 0.1 * xf * xf


def _roundtrip(x, idx, w, *, buffer, align):
    rm = jax_ep.dispatch(buffer, x, idx, w, expert_alignment=align, layout="rank_major")
    out_id = jax_ep.combine(buffer, rm.x, rm.handle)
    _, cw = jax_ep.combine(buffer, rm.x, rm.handle, topk_weights=rm.topk_weights)
    em = jax_ep.dispatch(buffer, x, idx, w, expert_alignment=align, layout="expert_major")
    first = jax.lax.axis_index(buffer.axis) * buffer.num_local_experts
    out_em = jax_ep.combine(buffer, expert_fn(em.x, em.topk_idx, first), em.handle)
    return dict(out_id=out_id, cw=cw, out_em=out_em, rm_overflow=rm.overflow, em_overflow=em.overflow)


# -- helpers -------------------------------------------------------------------------------------------------

def inputs(cfg: Cfg, seed, **routing):
    rng = np.random.default_rng(seed)
    idx, w = oracle.make_routing(rng, cfg.R, cfg.T, cfg.E, cfg.K, **routing)
    x = oracle.make_x(rng, cfg.R * cfg.T, cfg.H, cfg.np_dtype)
    return rng, x, idx, w


def check_value(got, want, f32, mag, dtype, what):
    if dtype == "bf16":
        oracle.assert_bf16_close(got, f32, what)
    else:
        assert np.asarray(got).dtype == np.float32, what
        oracle.assert_close_f32(got, f32, mag, what)


def check_multiple(got, x, n, what):
    """got == n[t] * x[t] (summed n times in f32, cast back); a token that gets nothing is +0. Bit-exact for
    bf16 (n * x fits f32 exactly), within the f32 summation bound for f32."""
    xf = np.asarray(x).astype(np.float32)
    want = np.where(n[:, None] > 0, n[:, None] * xf, 0).astype(np.float32)
    if np.asarray(x).dtype == oracle.BF16:
        oracle.assert_bits_equal(got, want.astype(oracle.BF16), what)
    else:
        oracle.assert_close_f32(got, want, n[:, None] * np.abs(xf), what)
        oracle.assert_bits_equal(got[n == 0], np.zeros_like(xf[n == 0]), what + " (unrouted tokens)")


# -- tests ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", CFGS + OVERFLOW_CFGS, ids=lambda c: c.id)
def test_combine_vs_oracle(cfg):
    rng, x, idx, w = inputs(cfg, 100 + cfg.R, duplicates=True, invalid=True, skew=0.5 if cfg.max_recv_tokens else None)
    buf = cfg.buffer()
    C, Cx, R, T, H, K = buf.recv_capacity, buf.expert_major_capacity(cfg.align), cfg.R, cfg.T, cfg.H, cfg.K
    y_rm = oracle.make_x(rng, R * C, H, cfg.np_dtype)          # every row random, padding rows included
    y_em = oracle.make_x(rng, R * Cx, H, cfg.np_dtype)
    w_rm = rng.standard_normal((R * C, K)).astype(np.float32)
    w_em = rng.standard_normal((R * Cx,)).astype(np.float32)
    b1 = oracle.make_x(rng, R * T, H)
    b2 = oracle.make_x(rng, R * T, H, oracle.BF16)
    got = run_sharded(_combine_all, buf.mesh, x, idx, w, y_rm, y_em, w_rm, w_em, b1, b2, buffer=buf, align=cfg.align)

    rm = oracle.dispatch_rank_major(x, idx, w, R, cfg.E, C, cfg.align)
    em = oracle.dispatch_expert_major(x, idx, w, R, cfg.E, Cx, cfg.align, token_capacity=C)
    y_rm3, y_em3 = oracle.split_ranks(y_rm, R), oracle.split_ranks(y_em, R)
    w_rm3, w_em2 = oracle.split_ranks(w_rm, R), oracle.split_ranks(w_em, R)

    out, f32, mag, cw = oracle.combine_rank_major(y_rm3, rm["slots"], cfg.np_dtype, bias=(b1, b2), topk_weights=w_rm3)
    check_value(got["out_rm"], out, f32, mag, cfg.dtype, "rank_major + bias tuple")
    _, _, cw_mag = oracle.combine_rank_major(w_rm3, rm["slots"], np.float32)      # error scale of the weights
    oracle.assert_close_f32(got["cw"], cw, cw_mag, "combined topk_weights")
    out, f32, mag = oracle.combine_rank_major(y_rm3, rm["slots"], cfg.np_dtype)
    check_value(got["out_rm_plain"], out, f32, mag, cfg.dtype, "rank_major")

    out, f32, mag = oracle.combine_expert_major(y_em3, em["rows"], R, T, cfg.np_dtype, em["topk_weights"], bias=b1)
    check_value(got["out_em_h"], out, f32, mag, cfg.dtype, "expert_major handle weights + bias")
    out, f32, mag = oracle.combine_expert_major(y_em3, em["rows"], R, T, cfg.np_dtype, w_em2)
    check_value(got["out_em_w"], out, f32, mag, cfg.dtype, "expert_major given weights")


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: c.id)
def test_roundtrip_dense(cfg):
    """Expert-major: combine(f(dispatch(x))) = sum_k w[t,k] f_{e_k}(x[t]); rank-major identity: (#ranks) * x;
    combined weights = the original weights where the id was valid, else 0."""
    _, x, idx, w = inputs(cfg, 200 + cfg.R, duplicates=True, invalid=True)
    buf = cfg.buffer()
    got = run_sharded(_roundtrip, buf.mesh, x, idx, w, buffer=buf, align=cfg.align)
    assert got["rm_overflow"].sum() == 0 and got["em_overflow"].sum() == 0
    valid = (idx >= 0) & (idx < cfg.E)
    e_loc = cfg.E // cfg.R
    n_ranks = np.array([len({int(e) // e_loc for e in row if 0 <= e < cfg.E}) for row in idx])
    xf = x.astype(np.float32)
    check_multiple(got["out_id"].reshape(x.shape), x, n_ranks, "rank-major identity round trip")
    oracle.assert_bits_equal(got["cw"].reshape(w.shape), np.where(valid, w, 0).astype(np.float32), "combined w")

    dense = np.zeros(x.shape, np.float64)
    mag = np.zeros(x.shape, np.float64)
    for i in range(idx.shape[0]):
        for k in range(cfg.K):
            if valid[i, k]:
                term = w[i, k] * expert_fn_np(xf[i], int(idx[i, k]))
                dense[i] += term
                mag[i] += np.abs(term)
    got_em = got["out_em"].reshape(x.shape).astype(np.float32)
    tol = (2 ** -7 if cfg.dtype == "bf16" else 1e-5) * (mag + np.abs(dense)) + 1e-6
    assert (np.abs(got_em - dense) <= tol).all(), f"max err {np.abs(got_em - dense).max()}"


@pytest.mark.parametrize("cfg", OVERFLOW_CFGS, ids=lambda c: c.id)
def test_roundtrip_with_overflow(cfg):
    """A token dropped on rank r (capacity) gets nothing from r: identity round trip = (#ranks that kept it) * x."""
    _, x, idx, w = inputs(cfg, 300 + cfg.R, skew=0.7, neg_frac=0.1)
    buf = cfg.buffer()
    got = run_sharded(_roundtrip, buf.mesh, x, idx, w, buffer=buf, align=cfg.align)
    rm = oracle.dispatch_rank_major(x, idx, w, cfg.R, cfg.E, buf.recv_capacity, cfg.align)
    em = oracle.dispatch_expert_major(x, idx, w, cfg.R, cfg.E, buf.expert_major_capacity(cfg.align), cfg.align,
                                      token_capacity=buf.recv_capacity)
    assert rm["overflow"].sum() > 0 and em["overflow"].sum() > 0
    np.testing.assert_array_equal(got["rm_overflow"], rm["overflow"])
    np.testing.assert_array_equal(got["em_overflow"], em["overflow"])
    slots = rm["slots"]                                   # [s, t, r] slot or -1 (dropped / not routed)
    kept = (slots >= 0).sum(axis=2).reshape(-1)
    e_loc = cfg.E // cfg.R
    routed = np.array([len({int(e) // e_loc for e in row if 0 <= e < cfg.E}) for row in idx])
    assert (kept < routed).any(), "some token should lose a rank to overflow"
    check_multiple(got["out_id"].reshape(x.shape), x, kept, "identity with drops")
    # combined weights: only the entries of ranks that kept the token
    e_owner = np.where((idx >= 0) & (idx < cfg.E), idx // e_loc, -1)
    T = cfg.T
    want_cw = np.zeros(w.shape, np.float32)
    for i in range(idx.shape[0]):
        for k in range(cfg.K):
            if e_owner[i, k] >= 0 and slots[i // T, i % T, e_owner[i, k]] >= 0:
                want_cw[i, k] = w[i, k]
    oracle.assert_bits_equal(got["cw"].reshape(w.shape), want_cw, "combined weights with drops")
    # expert-major: only the kept (token, expert) rows contribute
    dense = np.zeros(x.shape, np.float64)
    mag = np.zeros(x.shape, np.float64)
    for r in range(cfg.R):
        for pos, s, t, k in em["rows"][r]:
            i = s * T + t
            term = w[i, k] * expert_fn_np(x[i].astype(np.float32), int(idx[i, k]))
            dense[i] += term
            mag[i] += np.abs(term)
    got_em = got["out_em"].reshape(x.shape).astype(np.float32)
    tol = (2 ** -7 if cfg.dtype == "bf16" else 1e-5) * (mag + np.abs(dense)) + 1e-6
    assert (np.abs(got_em - dense) <= tol).all(), f"max err {np.abs(got_em - dense).max()}"
