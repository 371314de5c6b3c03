"""GPU suite: the CUDA get_dispatch_layout kernel (jax_ep._C) against a numpy oracle.

Runs on a machine with a CUDA device visible to JAX and the compiled extension
(``pytest -m gpu``); everywhere else every test here is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jax
import jax.numpy as jnp


def _cuda_status() -> tuple[bool, str]:
    try:
        from jax_ep import _cuda
    except Exception as e:  # noqa: BLE001 - any import problem means: not testable here
        return False, f"jax_ep._cuda does not import: {type(e).__name__}: {e}"
    if _cuda.extension_error() is not None:
        return False, _cuda.extension_error()
    if not _cuda.available():
        return False, "no CUDA device visible to JAX"
    return True, ""


_READY, _WHY = _cuda_status()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _READY, reason=_WHY)]


# ---------------------------------------------------------------------------
# numpy oracle (docs/semantics.md, get_dispatch_layout)

def layout_numpy(topk_idx: np.ndarray, num_ranks: int, num_experts: int):
    topk_idx = np.asarray(topk_idx)
    num_tokens = topk_idx.shape[0]
    experts_per_rank = num_experts // num_ranks
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    per_expert = np.bincount(topk_idx[valid], minlength=num_experts).astype(np.int32)
    in_rank = np.zeros((num_tokens, num_ranks), dtype=bool)
    rows, cols = np.nonzero(valid)
    in_rank[rows, topk_idx[rows, cols] // experts_per_rank] = True
    per_rank = in_rank.sum(axis=0).astype(np.int32)
    return per_rank, per_expert, in_rank


def random_routing(rng: np.random.Generator, T: int, K: int, E: int, *, p_masked=0.15,
                   p_bad=0.03, p_dup=0.05) -> np.ndarray:
    """Top-k style routing (distinct experts per token where K <= E) with -1 masks,
    out-of-range ids, duplicates, and some fully masked (absent) tokens."""
    if K <= E:
        ids = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int32) if T else \
            np.zeros((0, K), np.int32)
    else:
        ids = rng.integers(0, E, size=(T, K), dtype=np.int32)
    if T and K:
        ids = np.where(rng.random((T, K)) < p_masked, -1, ids)
        dup = rng.random((T, K)) < p_dup
        ids = np.where(dup, ids[:, :1], ids)  # repeat the first entry of the row
        bad_values = np.array([-2, -7, E, E + 1, E + 1000, np.iinfo(np.int32).max,
                               np.iinfo(np.int32).min], dtype=np.int32)
        bad = rng.random((T, K)) < p_bad
        ids = np.where(bad, rng.choice(bad_values, size=(T, K)), ids)
        absent = rng.random(T) < 0.05
        ids[absent] = -1
    return ids.astype(np.int32)


def _cuda_device():
    return jax.devices("cuda")[0]


def _run(topk: np.ndarray, R: int, E: int, *, jit: bool):
    from jax_ep import _cuda

    x = jax.device_put(topk, _cuda_device())
    fn = (lambda a: _cuda.get_dispatch_layout(a, R, E))
    if jit:
        fn = jax.jit(fn)
    return tuple(np.asarray(o) for o in fn(x))


def _check(got, want):
    names = ("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank")
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype, (name, g.dtype, w.dtype)
        assert g.shape == w.shape, (name, g.shape, w.shape)
        if not np.array_equal(g, w):
            bad = np.argwhere(g != w)
            raise AssertionError(f"{name}: {len(bad)} mismatches, first at {bad[0].tolist()}: "
                                 f"got {g[tuple(bad[0])]}, want {w[tuple(bad[0])]}")


# (T, K, E, R): sizes that hit the kernel's paths: column sums by 32-bit words
# (R % 4 == 0) or by bytes (R = 1, 2, 3, 6), warp-reduced (R/4 a power of two
# <= 32) or not (R = 48, 300), more column words than threads (R = 2048, 8192),
# E_loc = 1, histograms in global memory (E > 4096, R > 4096), one token,
# several chunks per block (T > 264 * 128), K = 1 and K = 9.
CONFIGS = [
    (1, 1, 1, 1),
    (1, 8, 256, 8),
    (7, 3, 12, 4),
    (20, 4, 4, 2),
    (33, 4, 6, 3),
    (50, 5, 18, 6),
    (300, 8, 2048, 2048),
    (40, 4, 8192, 8192),
    (129, 9, 288, 48),
    (500, 6, 1024, 256),
    (257, 2, 600, 300),
    (64, 8, 64, 64),
    (300, 4, 8192, 8),
    (4096, 8, 256, 8),
    (40000, 8, 256, 8),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("T,K,E,R", CONFIGS)
def test_layout_matches_numpy(T, K, E, R, jit):
    rng = np.random.default_rng(1000 * T + 10 * K + E + R)
    topk = random_routing(rng, T, K, E)
    _check(_run(topk, R, E, jit=jit), layout_numpy(topk, R, E))


@pytest.mark.parametrize("T,K,E,R", [(0, 8, 256, 8), (16, 0, 8, 2)])
def test_layout_empty(T, K, E, R):
    topk = np.zeros((T, K), np.int32)
    _check(_run(topk, R, E, jit=True), layout_numpy(topk, R, E))


def test_layout_skewed_and_masked():
    """Hot expert (all tokens on expert 0), all masked, all out of range."""
    T, K, E, R = 4096, 8, 256, 8
    cases = {
        "hot": np.zeros((T, K), np.int32),
        "masked": np.full((T, K), -1, np.int32),
        "out_of_range": np.full((T, K), E, np.int32),
        "last_expert": np.full((T, K), E - 1, np.int32),
    }
    for name, topk in cases.items():
        try:
            _check(_run(topk, R, E, jit=True), layout_numpy(topk, R, E))
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def test_layout_repeatable_and_outputs_fully_written():
    """Same input, same bits; a different input in between must not leak through
    (outputs are fully written by the kernel, counts zeroed on the stream)."""
    T, K, E, R = 4096, 8, 256, 8
    rng = np.random.default_rng(7)
    a = random_routing(rng, T, K, E)
    b = random_routing(rng, T, K, E, p_masked=0.6)
    from jax_ep import _cuda
    fn = jax.jit(lambda x: _cuda.get_dispatch_layout(x, R, E))
    dev = _cuda_device()
    first = [np.asarray(o) for o in fn(jax.device_put(a, dev))]
    for _ in range(3):
        [np.asarray(o) for o in fn(jax.device_put(b, dev))]
        again = [np.asarray(o) for o in fn(jax.device_put(a, dev))]
        for f, g in zip(first, again):
            assert np.array_equal(f, g)
    _check(tuple(first), layout_numpy(a, R, E))


def test_layout_vmap_sequential():
    from jax_ep import _cuda
    T, K, E, R, B = 100, 4, 32, 4, 3
    rng = np.random.default_rng(3)
    topk = np.stack([random_routing(rng, T, K, E) for _ in range(B)])
    got = jax.jit(jax.vmap(lambda x: _cuda.get_dispatch_layout(x, R, E)))(
        jax.device_put(topk, _cuda_device()))
    for i in range(B):
        _check(tuple(np.asarray(o)[i] for o in got), layout_numpy(topk[i], R, E))


def test_layout_in_shard_map():
    """Per-device call inside shard_map over all local GPUs (one GPU: a 1-device mesh);
    each rank sees its own routing."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jax_ep import _cuda
    devices = jax.devices("cuda")
    n = len(devices)
    mesh = jax.sharding.Mesh(np.array(devices), ("ep",))
    T, K, E = 512, 8, 64 * n
    R = n
    rng = np.random.default_rng(11)
    topk = np.concatenate([random_routing(rng, T, K, E) for _ in range(n)])

    def per_rank(x):
        per_rank_counts, per_expert, in_rank = _cuda.get_dispatch_layout(x, R, E)
        return per_rank_counts[None], per_expert[None], in_rank

    f = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P("ep"),
                              out_specs=(P("ep"), P("ep"), P("ep"))))
    got = f(jax.device_put(topk, NamedSharding(mesh, P("ep"))))
    got = [np.asarray(o) for o in got]
    for r in range(n):
        want = layout_numpy(topk[r * T:(r + 1) * T], R, E)
        _check((got[0][r], got[1][r], got[2][r * T:(r + 1) * T]), want)


def test_ffi_boundary_rejects_bad_attrs():
    """The handler validates what it is given (E % R != 0, output shape mismatch)."""
    from jax_ep import _cuda
    _cuda.register()
    x = jax.device_put(np.zeros((4, 2), np.int32), _cuda_device())

    def call(R, E, out_R=None):
        out_R = R if out_R is None else out_R
        return jax.ffi.ffi_call(
            _cuda.TARGET_GET_DISPATCH_LAYOUT,
            (jax.ShapeDtypeStruct((out_R,), jnp.int32), jax.ShapeDtypeStruct((E,), jnp.int32),
             jax.ShapeDtypeStruct((4, out_R), jnp.bool_)),
            vmap_method="sequential",
        )(x, num_ranks=np.int64(R), num_experts=np.int64(E))

    with pytest.raises(Exception, match="divisible"):
        jax.block_until_ready(call(3, 8))
    with pytest.raises(Exception, match="num_tokens_per_rank has shape"):
        jax.block_until_ready(call(4, 8, out_R=2))


def test_public_api_matches_reference():
    """jax_ep.get_dispatch_layout: backend="cuda" against backend="reference"."""
    import jax_ep
    if not hasattr(jax_ep, "get_dispatch_layout"):
        pytest.skip("jax_ep.get_dispatch_layout not there yet")
    T, K, E, R = 4096, 8, 256, 8
    rng = np.random.default_rng(5)
    topk = random_routing(rng, T, K, E, p_bad=0.0)  # the public API rejects concrete bad ids
    x = jax.device_put(topk, _cuda_device())
    cuda = jax_ep.get_dispatch_layout(x, E, num_ranks=R, backend="cuda")
    ref = jax_ep.get_dispatch_layout(x, E, num_ranks=R, backend="reference")
    for a, b in zip(jax.tree_util.tree_leaves(cuda), jax.tree_util.tree_leaves(ref)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_layout_in_cuda_graph():
    """XLA command buffers (CUDA graphs) may capture the custom call: same results.
    Run in a fresh process so the XLA flags apply."""
    code = textwrap.dedent("""
        import numpy as np, jax
        from jax_ep import _cuda
        T, K, E, R = 4096, 8, 256, 8
        rng = np.random.default_rng(0)
        topk = rng.integers(-1, E, size=(T, K), dtype=np.int32)

        @jax.jit
        def f(x):
            outs = []
            for i in range(4):  # several ops so the graph is worth capturing
                outs.append(_cuda.get_dispatch_layout((x + i) % E, R, E))
            return outs

        x = jax.device_put(topk, jax.devices("cuda")[0])
        res = [f(x) for _ in range(3)]
        for r in res[1:]:
            for a, b in zip(jax.tree_util.tree_leaves(res[0]), jax.tree_util.tree_leaves(r)):
                assert np.array_equal(np.asarray(a), np.asarray(b))
        for i, (pr, pe, ir) in enumerate(res[0]):
            ids = (topk + i) % E
            pe_want = np.bincount(ids.ravel(), minlength=E)
            assert np.array_equal(np.asarray(pe), pe_want), i
            ir_want = np.zeros((T, R), bool)
            ir_want[np.arange(T)[:, None], ids // (E // R)] = True
            assert np.array_equal(np.asarray(ir), ir_want), i
            assert np.array_equal(np.asarray(pr), ir_want.sum(0)), i
        print("OK")
    """)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL"
                        " --xla_gpu_graph_min_graph_size=1").strip()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-4000:]
