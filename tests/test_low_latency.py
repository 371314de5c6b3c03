"""Low-latency (decode) dispatch / combine vs the numpy oracle; split phases; LL vs normal-mode combine."""

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
class LLCase:
    R: int
    E: int
    K: int
    H: int
    T: int
    T_max: int

    @property
    def id(self):
        return f"R{self.R}-E{self.E}-K{self.K}-H{self.H}-T{self.T}-Tmax{self.T_max}"

    def buffer(self):
        return jax_ep.Buffer(ep_mesh(self.R), num_experts=self.E, hidden=self.H, max_tokens_per_rank=self.T_max,
                             num_topk=self.K, low_latency=True)


CASES = [
    LLCase(1, 4, 2, 128, 4, 4),
    LLCase(2, 8, 4, 256, 5, 8),       # T < T_max
    LLCase(4, 16, 4, 640, 3, 4),      # 5 scale groups: the packed UE8M0 word is padded
    LLCase(8, 16, 8, 128, 4, 6),
]


def _ll_all(x, idx, w, y, stats, *, buffer):
    bf = jax_ep.low_latency_dispatch(buffer, x, idx, use_fp8=False, cumulative_stats=stats)
    f8 = jax_ep.low_latency_dispatch(buffer, x, idx)
    f8r = jax_ep.low_latency_dispatch(buffer, x, idx, round_scale=True)
    f8u = jax_ep.low_latency_dispatch(buffer, x, idx, use_ue8m0=True)
    outs = {}
    for name, o in (("bf16", bf), ("fp8", f8), ("fp8_round", f8r), ("fp8_ue8m0", f8u)):
        outs[name] = dict(x=o.x, x_scales=o.x_scales, count=o.count, src_info=o.handle.src_info,
                          layout_range=o.handle.layout_range)
    outs["stats"] = bf.cumulative_stats
    outs["no_stats"] = f8.cumulative_stats
    outs["combined"] = jax_ep.low_latency_combine(buffer, y, idx, w, bf.handle)
    outs["combined_fp8_handle"] = jax_ep.low_latency_combine(buffer, y, idx, w, f8u.handle)
    return outs


def _ll_split(x, idx, w, y, a, b, *, buffer):
    pending = jax_ep.low_latency_dispatch_send(buffer, x, idx)
    m1 = a @ b                                            # independent compute between the phases
    out = jax_ep.low_latency_dispatch_recv(buffer, pending)
    pending_c = jax_ep.low_latency_combine_send(buffer, y, out.handle)
    m2 = jnp.tanh(m1) @ b
    comb = jax_ep.low_latency_combine_recv(buffer, pending_c, idx, w)
    return dict(x=out.x, x_scales=out.x_scales, count=out.count, src_info=out.handle.src_info,
                layout_range=out.handle.layout_range, combined=comb, m1=m1, m2=m2)


def _inputs(case: LLCase, seed, **routing):
    rng = np.random.default_rng(seed)
    idx, w = oracle.make_routing(rng, case.R, case.T, case.E, case.K, **routing)
    # per-token magnitudes spread over decades: exercises the fp8 scales
    x = (oracle.make_x(rng, case.R * case.T, case.H) * 10.0 ** rng.uniform(-3, 2, size=(case.R * case.T, 1)))
    x = x.astype(oracle.BF16)
    E_loc, S = case.E // case.R, case.R * case.T_max
    y = oracle.make_x(rng, case.R * E_loc, case.H, oracle.BF16)
    y = np.broadcast_to(y[:, None, :], (case.R * E_loc, S, case.H)) * rng.uniform(0.5, 2, size=(1, S, 1))
    y = (y + oracle.make_x(rng, case.R * E_loc * S, case.H).reshape(y.shape)).astype(oracle.BF16)
    stats = rng.integers(0, 100, size=(case.R * E_loc,)).astype(np.int32)
    return rng, x, idx, w, y, stats


def _check_dispatch(got, want, what):
    for f in ("x", "x_scales", "count", "src_info", "layout_range"):
        if want[f] is None:
            assert got[f] is None, f"{what}.{f}"
        else:
            oracle.assert_bits_equal(got[f], want[f], f"{what}.{f}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_low_latency_vs_oracle(case):
    buf = case.buffer()
    for seed, routing in ((1, {}), (2, dict(duplicates=True, invalid=True, neg_frac=0.4))):
        rng, x, idx, w, y, stats = _inputs(case, 100 * case.R + seed, **routing)
        got = run_sharded(_ll_all, buf.mesh, x, idx, w, y, stats, buffer=buf)
        want = oracle.low_latency_dispatch(x, idx, case.R, case.E, case.T_max)
        _check_dispatch(got["bf16"], want, "bf16")
        assert got["bf16"]["x"].dtype == oracle.BF16
        for name, kw in (("fp8", {}), ("fp8_round", dict(round_scale=True)), ("fp8_ue8m0", dict(use_ue8m0=True))):
            q, s = jax_ep.fp8.per_token_cast_to_fp8(jnp.asarray(x), **kw)
            want_q = oracle.low_latency_dispatch(x, idx, case.R, case.E, case.T_max, x_fp8=np.asarray(q),
                                                 scales=np.asarray(s))
            _check_dispatch(got[name], want_q, name)
        assert got["fp8_ue8m0"]["x_scales"].dtype == np.int32
        assert got["fp8_ue8m0"]["x_scales"].shape[-1] == -(-case.H // 512)
        # round_scale: powers of two
        m, _ = np.frexp(got["fp8_round"]["x_scales"][got["fp8_round"]["x_scales"] != 0])
        assert (m == 0.5).all()
        # counts / stats
        oracle.assert_bits_equal(got["stats"], oracle.split_ranks(stats, case.R) + want["count"], "cumulative_stats")
        assert got["no_stats"] is None
        np.testing.assert_array_equal(want["layout_range"].sum(axis=2), want["count"])
        # combine
        out, f32, _ = oracle.low_latency_combine(y.reshape(case.R, -1, *y.shape[1:]), idx, w, want["row_of"],
                                                 case.R, case.E)
        oracle.assert_bf16_close(got["combined"], f32, "low_latency_combine")
        oracle.assert_bits_equal(got["combined_fp8_handle"], got["combined"], "combine via the fp8 handle")


def test_low_latency_fp8_dequantizes_close():
    """Sanity: received fp8 rows dequantize to the source bf16 rows within e4m3 precision."""
    case = CASES[2]
    buf = case.buffer()
    _, x, idx, w, y, stats = _inputs(case, 7)
    got = run_sharded(_ll_all, buf.mesh, x, idx, w, y, stats, buffer=buf)
    want = oracle.low_latency_dispatch(x, idx, case.R, case.E, case.T_max)
    for name in ("fp8", "fp8_ue8m0"):
        back = np.asarray(jax_ep.fp8.per_token_cast_back(got[name]["x"], got[name]["x_scales"], out_dtype=jnp.float32))
        ref = want["x"].astype(np.float32)
        scale = np.abs(ref).reshape(*ref.shape[:-1], -1, 128).max(-1, keepdims=True)
        err = np.abs(back - ref).reshape(*ref.shape[:-1], -1, 128)
        assert (err <= scale * 2 ** -3 + 1e-6).all(), name


def test_split_phases_match_fused():
    case = CASES[2]
    buf = case.buffer()
    rng, x, idx, w, y, stats = _inputs(case, 201, duplicates=True)
    a = rng.standard_normal((case.R * 16, 32)).astype(np.float32)
    b = rng.standard_normal((32, 32)).astype(np.float32)
    fused = run_sharded(_ll_all, buf.mesh, x, idx, w, y, stats, buffer=buf)
    b_all = np.tile(b, (case.R, 1))                       # every rank gets the same [32, 32]
    split = run_sharded(_ll_split, buf.mesh, x, idx, w, y, a, b_all, buffer=buf)
    for f in ("x", "x_scales", "count", "src_info", "layout_range"):
        oracle.assert_bits_equal(split[f], fused["fp8"][f], f)
    oracle.assert_bits_equal(split["combined"], fused["combined"], "combined")
    m1 = np.einsum("rij,jk->rik", a.reshape(case.R, 16, 32), b)
    np.testing.assert_allclose(split["m1"], m1, rtol=1e-4, atol=1e-4)


def test_recv_rejects_wrong_token():
    case = CASES[1]
    buf = case.buffer()

    def bad(x, idx, w, y, *, buffer):
        pending = jax_ep.low_latency_dispatch_send(buffer, x, idx)
        return jax_ep.low_latency_combine_recv(buffer, pending, idx, w)

    _, x, idx, w, y, _ = _inputs(case, 3)
    with pytest.raises(TypeError, match="low_latency_combine_send"):
        run_sharded(bad, buf.mesh, x, idx, w, y, buffer=buf)


# -- LL combine vs normal-mode expert-major combine ---------------------------------------------------------

def _expert_fn(rows, global_expert):
    xf = rows.astype(jnp.float32)
    return (jnp.tanh(xf) * (1.0 + 0.25 * global_expert) + 0.05 * xf).astype(jnp.bfloat16)


def _ll_vs_normal(x, idx, w, *, buffer):
    first = jax.lax.axis_index(buffer.axis) * buffer.num_local_experts
    ll = jax_ep.low_latency_dispatch(buffer, x, idx, use_fp8=False)
    e_ll = (first + jnp.arange(buffer.num_local_experts)).astype(jnp.float32)[:, None, None]
    out_ll = jax_ep.low_latency_combine(buffer, _expert_fn(ll.x, e_ll), idx, w, ll.handle)
    em = jax_ep.dispatch(buffer, x, idx, w, layout="expert_major")
    e_em = (first + jnp.maximum(em.topk_idx, 0)).astype(jnp.float32)[:, None]
    out_em = jax_ep.combine(buffer, _expert_fn(em.x, e_em), em.handle)
    return out_ll, out_em


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=lambda c: c.id)
def test_low_latency_combine_matches_normal_expert_major(case):
    buf = case.buffer()
    _, x, idx, w, _, _ = _inputs(case, 300 + case.R, duplicates=True, invalid=True)
    out_ll, out_em = run_sharded(_ll_vs_normal, buf.mesh, x, idx, w, buffer=buf)
    assert out_ll.dtype == oracle.BF16 and out_em.dtype == oracle.BF16
    assert oracle.bf16_ulp_diff(out_ll, out_em).max() <= 1
    # and both are the dense result
    xf = x.astype(np.float32)
    dense = np.zeros(xf.shape, np.float64)
    for i in range(idx.shape[0]):
        for k in range(case.K):
            e = int(idx[i, k])
            if 0 <= e < case.E:
                fx = (np.tanh(xf[i].astype(np.float64)) * (1 + 0.25 * e) + 0.05 * xf[i]).astype(oracle.BF16)
                dense[i] += w[i, k] * fx.astype(np.float64)
    got = out_ll.reshape(xf.shape).astype(np.float64)
    np.testing.assert_allclose(got, dense, rtol=2 ** -6, atol=2 ** -6 * np.abs(dense).max())
