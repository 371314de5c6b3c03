"""dispatch (rank-major and expert-major) vs the numpy oracle, bit-exact, every field including padding rows.

One jitted shard_map per (shape, buffer) config computes both layouts; the routing data varies freely
(several routings per compile, and hypothesis draws routings for the same configs).
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_ep
import oracle
from conftest import dp_ep_mesh, ep_mesh, run_sharded

FIELDS = ("x", "x_scales", "topk_idx", "topk_weights", "num_recv", "tokens_per_expert", "overflow",
          "num_invalid_ids", "group_sizes")


@dataclasses.dataclass(frozen=True)
class Case:
    R: int
    E: int
    K: int
    H: int
    T: int
    dtype: str            # "f32" | "bf16" | "fp8"
    align: int
    T_max: int | None = None        # default T
    max_recv_tokens: int | None = None
    max_recv_rows: int | None = None

    @property
    def id(self):
        extra = "".join(f"-{k}{v}" for k, v in (("Tmax", self.T_max), ("C", self.max_recv_tokens),
                                                 ("Cx", self.max_recv_rows)) if v is not None)
        return f"R{self.R}-E{self.E}-K{self.K}-H{self.H}-T{self.T}-{self.dtype}-A{self.align}{extra}"

    def buffer(self, mesh=None):
        return jax_ep.Buffer(mesh if mesh is not None else ep_mesh(self.R), num_experts=self.E, hidden=self.H,
                             max_tokens_per_rank=self.T_max or self.T, num_topk=self.K,
                             max_recv_tokens=self.max_recv_tokens, max_recv_rows=self.max_recv_rows)


CASES = [
    Case(1, 4, 2, 32, 8, "f32", 1),
    Case(1, 16, 4, 64, 6, "bf16", 16),
    Case(2, 8, 3, 64, 5, "bf16", 4),
    Case(2, 16, 4, 32, 8, "f32", 1, T_max=12),
    Case(4, 16, 4, 64, 8, "f32", 4),
    Case(4, 8, 8, 32, 6, "bf16", 16),      # K = E: every row may hit every expert
    Case(4, 64, 6, 128, 7, "bf16", 1),
    Case(8, 16, 4, 64, 8, "bf16", 1),
    Case(8, 32, 8, 32, 4, "f32", 16),
    Case(8, 8, 1, 64, 8, "f32", 4),        # E_loc = 1, K = 1
    Case(2, 8, 2, 256, 8, "fp8", 4),
    Case(8, 16, 4, 128, 4, "fp8", 1),
]
OVERFLOW_CASES = [
    Case(4, 16, 4, 64, 8, "bf16", 4, max_recv_tokens=10, max_recv_rows=24),
    Case(8, 16, 4, 32, 6, "f32", 1, max_recv_tokens=9),                 # Cx derived from C
    Case(2, 8, 3, 128, 8, "fp8", 16, max_recv_tokens=7, max_recv_rows=40),
]
BY_ID = {c.id: c for c in CASES + OVERFLOW_CASES}


# -- per-rank functions (module level: they key the compile cache) -------------------------------------------

def _both(payload, idx, w, *, buffer, align):
    x = tuple(payload) if isinstance(payload, (tuple, list)) else payload
    rm = jax_ep.dispatch(buffer, x, idx, w, expert_alignment=align, layout="rank_major")
    em = jax_ep.dispatch(buffer, x, idx, w, expert_alignment=align, layout="expert_major")
    return dict(rm=rm._replace(handle=None), em=em._replace(handle=None))


def _ragged(x, idx, w, weights, *, buffer, align):
    out = jax_ep.dispatch(buffer, x, idx, w, expert_alignment=align, layout="expert_major")
    y = jax.lax.ragged_dot(out.x, weights, out.group_sizes)
    return out._replace(handle=None), y


# -- inputs and oracle ---------------------------------------------------------------------------------------

ROUTINGS = {
    "plain": dict(),
    "dup_invalid": dict(duplicates=True, invalid=True, neg_frac=0.35),
    "dense": dict(neg_frac=0.0, uneven=False),
}


def make_inputs(case: Case, seed: int, **routing):
    rng = np.random.default_rng(seed)
    idx, w = oracle.make_routing(rng, case.R, case.T, case.E, case.K, **routing)
    if case.dtype == "fp8":
        xf = oracle.make_x(rng, case.R * case.T, case.H) * rng.uniform(0.01, 10, size=(case.R * case.T, 1))
        x_fp8, scales = jax_ep.fp8.per_token_cast_to_fp8(jnp.asarray(xf, jnp.float32))
        payload = (np.asarray(x_fp8), np.asarray(scales))
    else:
        payload = oracle.make_x(rng, case.R * case.T, case.H, oracle.BF16 if case.dtype == "bf16" else np.float32)
    return payload, idx, w


def expected(case: Case, payload, idx, w, buffer):
    rm = oracle.dispatch_rank_major(payload, idx, w, case.R, case.E, buffer.recv_capacity, case.align)
    em = oracle.dispatch_expert_major(payload, idx, w, case.R, case.E, buffer.expert_major_capacity(case.align),
                                      case.align, token_capacity=buffer.recv_capacity)
    return rm, em


def run_case(case: Case, payload, idx, w):
    buf = case.buffer()
    got = run_sharded(_both, buf.mesh, payload, idx, w, buffer=buf, align=case.align)
    return buf, got


def check_output(got, want, what):
    for f in FIELDS:
        g, wv = getattr(got, f), want[f]
        if wv is None:
            assert g is None, f"{what}.{f}: expected None"
            continue
        oracle.assert_bits_equal(g, wv, f"{what}.{f}")


def check_case(case: Case, seed: int, **routing):
    payload, idx, w = make_inputs(case, seed, **routing)
    buf, got = run_case(case, payload, idx, w)
    want_rm, want_em = expected(case, payload, idx, w, buf)
    check_output(got["rm"], want_rm, f"{case.id} rank_major")
    check_output(got["em"], want_em, f"{case.id} expert_major")
    return got, want_rm, want_em


# -- tests ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_dispatch_vs_oracle(case):
    for i, kind in enumerate(ROUTINGS):
        check_case(case, seed=zlib.crc32(case.id.encode()) % 1000 + i, **ROUTINGS[kind])


def test_dispatch_output_types():
    case = CASES[4]
    payload, idx, w = make_inputs(case, 0)
    buf, got = run_case(case, payload, idx, w)
    R, C, K, E_loc = case.R, buf.recv_capacity, case.K, case.E // case.R
    Cx = buf.expert_major_capacity(case.align)
    rm, em = got["rm"], got["em"]
    assert rm.x.shape == (R, C, case.H) and rm.x.dtype == np.float32
    assert rm.topk_idx.shape == (R, C, K) and rm.topk_idx.dtype == np.int32
    assert rm.topk_weights.shape == (R, C, K) and rm.topk_weights.dtype == np.float32
    assert rm.x_scales is None and rm.group_sizes is None
    for f in ("num_recv", "overflow", "num_invalid_ids"):
        assert getattr(rm, f).shape == (R,) and getattr(rm, f).dtype == np.int32, f
    assert rm.tokens_per_expert.shape == (R, E_loc)
    assert em.x.shape == (R, Cx, case.H) and em.topk_idx.shape == (R, Cx) and em.topk_weights.shape == (R, Cx)
    assert em.group_sizes.shape == (R, E_loc) and em.group_sizes.dtype == np.int32


@pytest.mark.parametrize("case", OVERFLOW_CASES, ids=lambda c: c.id)
def test_dispatch_capacity_overflow(case):
    """Capacity below the worst case: overflow equals the oracle (and is non-zero), kept rows are the oracle's."""
    got, want_rm, want_em = check_case(case, seed=11, skew=0.7, neg_frac=0.1)
    assert want_rm["overflow"].sum() > 0 and want_em["overflow"].sum() > 0, "test routing should overflow"
    Cx = case.buffer().expert_major_capacity(case.align)
    assert (got["em"].group_sizes.sum(axis=1) <= Cx).all()
    assert (got["rm"].num_recv <= case.buffer().recv_capacity).all()
    # A second routing that does not overflow anywhere (all -1 but one token): nothing dropped.
    payload, idx, w = make_inputs(case, 12)
    idx[:] = -1
    idx[3, 0] = 1
    buf, got = run_case(case, payload, idx, w)
    want_rm, want_em = expected(case, payload, idx, w, buf)
    check_output(got["rm"], want_rm, "single token rm")
    check_output(got["em"], want_em, "single token em")
    assert got["rm"].num_recv.sum() == 1 and got["rm"].overflow.sum() == 0


def test_dispatch_deterministic():
    case = CASES[7]
    payload, idx, w = make_inputs(case, 5, duplicates=True)
    _, a = run_case(case, payload, idx, w)
    _, b = run_case(case, payload, idx, w)
    jax.tree.map(lambda u, v: oracle.assert_bits_equal(u, v, "repeat"), a, b)


def em_from_rm(rm, num_local_experts, align, capacity_rows):
    """Expert-major rows rebuilt from rank-major output (numpy): per local expert, slots j then k ascending."""
    R, C, K = rm.topk_idx.shape
    H = rm.x.shape[2]
    xs = np.zeros((R, capacity_rows, H), rm.x.dtype)
    idx = np.full((R, capacity_rows), -1, np.int32)
    w = np.zeros((R, capacity_rows), np.float32)
    sizes = np.zeros((R, num_local_experts), np.int32)
    for r in range(R):
        pos = 0
        for e in range(num_local_experts):
            entries = [(j, k) for j in range(int(rm.num_recv[r])) for k in range(K) if rm.topk_idx[r, j, k] == e]
            for i, (j, k) in enumerate(entries):
                xs[r, pos + i], idx[r, pos + i], w[r, pos + i] = rm.x[r, j], e, rm.topk_weights[r, j, k]
            sizes[r, e] = oracle.round_up(len(entries), align)
            pos += sizes[r, e]
    return xs, idx, w, sizes


@pytest.mark.parametrize("case", [CASES[2], CASES[5], CASES[8], CASES[10], OVERFLOW_CASES[1]], ids=lambda c: c.id)
def test_expert_major_is_rank_major_permuted(case):
    """Also under token-capacity overflow (Cx derived from C cannot truncate): expert-major expands the kept slots."""
    payload, idx, w = make_inputs(case, 21, duplicates=True, invalid=True, skew=0.6 if case.max_recv_tokens else None)
    buf, got = run_case(case, payload, idx, w)
    rm, em = got["rm"], got["em"]
    xs, ids, ws, sizes = em_from_rm(rm, case.E // case.R, case.align, buf.expert_major_capacity(case.align))
    oracle.assert_bits_equal(em.x, xs, "x")
    oracle.assert_bits_equal(em.topk_idx, ids, "topk_idx")
    oracle.assert_bits_equal(em.topk_weights, ws, "topk_weights")
    oracle.assert_bits_equal(em.group_sizes, sizes, "group_sizes")
    if case.dtype == "fp8":
        for r in range(case.R):   # scales travel with their rows
            for i in range(em.x.shape[1]):
                if em.topk_idx[r, i] >= 0:
                    j = [j for j in range(int(rm.num_recv[r])) if (rm.x[r, j].view(np.uint8) ==
                                                                 em.x[r, i].view(np.uint8)).all()][0]
                    oracle.assert_bits_equal(em.x_scales[r, i], rm.x_scales[r, j], "x_scales")
    # and the rank-major tokens_per_expert equals the expert-major group sizes (same alignment)
    oracle.assert_bits_equal(rm.tokens_per_expert, em.group_sizes, "tokens_per_expert")


@pytest.mark.parametrize("case", [CASES[4], CASES[8]], ids=lambda c: c.id)
def test_expert_major_feeds_ragged_dot(case):
    rng = np.random.default_rng(3)
    payload, idx, w = make_inputs(case, 31)
    N = 24
    E_loc = case.E // case.R
    weights = rng.standard_normal((case.E, case.H, N)).astype(np.float32)   # rank r holds experts of rank r
    buf = case.buffer()
    out, y = run_sharded(_ragged, buf.mesh, payload, idx, w, weights, buffer=buf, align=case.align)
    Cx = buf.expert_major_capacity(case.align)
    for r in range(case.R):
        bounds = np.cumsum(out.group_sizes[r])
        for i in range(Cx):
            if i >= bounds[-1]:
                np.testing.assert_array_equal(y[r, i], 0)
                continue
            e = int(np.searchsorted(bounds, i, side="right"))
            if out.topk_idx[r, i] >= 0:
                assert out.topk_idx[r, i] == e
            want = out.x[r, i].astype(np.float64) @ weights[r * E_loc + e].astype(np.float64)
            np.testing.assert_allclose(y[r, i], want, rtol=1e-4, atol=1e-4 * np.abs(want).max(initial=1))


def test_dispatch_2d_mesh_independent_groups():
    """(dp=2, ep=4): each dp row is its own EP group of 4 ranks; outputs equal the per-group oracle."""
    mesh = dp_ep_mesh(2, 4)
    R, E, K, H, T, A = 4, 16, 4, 64, 6, 4
    buf = jax_ep.Buffer(mesh, "ep", num_experts=E, hidden=H, max_tokens_per_rank=T, num_topk=K)
    assert buf.num_ranks == 4
    rng = np.random.default_rng(8)
    idx, w = oracle.make_routing(rng, 2 * R, T, E, K, invalid=True)
    x = oracle.make_x(rng, 2 * R * T, H)
    got = run_sharded(_both, mesh, x, idx, w, buffer=buf, align=A)
    n = R * T
    groups = [oracle.dispatch_rank_major(x[g * n:(g + 1) * n], idx[g * n:(g + 1) * n], w[g * n:(g + 1) * n],
                                         R, E, buf.recv_capacity, A) for g in range(2)]
    egroups = [oracle.dispatch_expert_major(x[g * n:(g + 1) * n], idx[g * n:(g + 1) * n], w[g * n:(g + 1) * n],
                                            R, E, buf.expert_major_capacity(A), A, buf.recv_capacity)
               for g in range(2)]
    stack = lambda gs: {f: (None if gs[0][f] is None else np.concatenate([g[f] for g in gs])) for f in FIELDS}
    check_output(got["rm"], stack(groups), "2d rank_major")
    check_output(got["em"], stack(egroups), "2d expert_major")


HYPO_CASES = [CASES[3], CASES[4], CASES[7], CASES[10], OVERFLOW_CASES[0]]


@settings(max_examples=12)
@given(case=st.sampled_from(HYPO_CASES), seed=st.integers(0, 2 ** 16), neg=st.floats(0.0, 0.95),
       duplicates=st.booleans(), invalid=st.booleans(), uneven=st.booleans(),
       skew=st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_dispatch_random_routings(case, seed, neg, duplicates, invalid, uneven, skew):
    check_case(case, seed, neg_frac=neg, duplicates=duplicates, invalid=invalid, uneven=uneven, skew=skew)
