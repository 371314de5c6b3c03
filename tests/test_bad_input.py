"""Bad input: every trace-time error path raises ValueError / TypeError / RuntimeError with a helpful message,
and run-time problems (overflow, out-of-range ids) are counted and, when asked, raised."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ep
from conftest import ep_mesh, run_sharded

R, E, K, H, T = 2, 8, 2, 64, 4


def make_buffer(**kw):
    cfg = dict(num_experts=E, hidden=H, max_tokens_per_rank=T, num_topk=K)
    cfg.update(kw)
    mesh = cfg.pop("mesh", None) or ep_mesh(R)
    return jax_ep.Buffer(mesh, **cfg)


def trace(fn, *args, mesh=None):
    """Trace ``fn`` per rank inside shard_map (no compile): trace-time errors surface here."""
    mesh = mesh or ep_mesh(R)
    return jax.eval_shape(jax.shard_map(fn, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")), *args)


def good_inputs(rows=R * T, hidden=H, dtype=jnp.float32, k=K):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((rows, hidden)), dtype)
    idx = jnp.asarray(rng.integers(0, E, size=(rows, k)), jnp.int32)
    w = jnp.asarray(rng.uniform(size=(rows, k)), jnp.float32)
    return x, idx, w


def dispatch_fn(buf, **kw):
    def fn(x, idx, w):
        return jax_ep.dispatch(buf, x, idx, w, **kw).x
    return fn


def test_good_inputs_trace():
    """Baseline: the inputs the other tests corrupt are accepted."""
    buf = make_buffer()
    trace(dispatch_fn(buf), *good_inputs())
    trace(dispatch_fn(buf, layout="expert_major", expert_alignment=8), *good_inputs())


# -- dispatch: dtypes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float16, jnp.int8])
def test_x_wrong_dtype(dtype):
    x, idx, w = good_inputs()
    with pytest.raises(ValueError, match=r"x must be bfloat16 or float32"):
        trace(dispatch_fn(make_buffer()), x.astype(dtype), idx, w)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int16, jnp.uint32])
def test_topk_idx_wrong_dtype(dtype):
    x, idx, w = good_inputs()
    with pytest.raises(ValueError, match=r"topk_idx must be int32"):
        trace(dispatch_fn(make_buffer()), x, idx.astype(dtype), w)


def test_topk_idx_int64():
    x, idx, w = good_inputs()
    with jax.enable_x64(True):
        idx64 = jnp.asarray(np.asarray(idx), jnp.int64)
        assert idx64.dtype == jnp.int64
        with pytest.raises(ValueError, match=r"topk_idx must be int32, got int64"):
            trace(dispatch_fn(make_buffer()), x, idx64, w)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.int32])
def test_topk_weights_wrong_dtype(dtype):
    x, idx, w = good_inputs()
    with pytest.raises(ValueError, match=r"topk_weights must be float32"):
        trace(dispatch_fn(make_buffer()), x, idx, w.astype(dtype))


# -- dispatch: shapes ----------------------------------------------------------------------------------------

def test_x_wrong_rank():
    x, idx, w = good_inputs()
    with pytest.raises(ValueError, match=r"x must be \[T, H\]"):
        trace(dispatch_fn(make_buffer()), x.reshape(R * T, 2, H // 2), idx, w)


def test_topk_idx_wrong_rank():
    x, idx, w = good_inputs()
    with pytest.raises(ValueError, match=r"topk_idx must be \[T, K\]"):
        trace(dispatch_fn(make_buffer()), x, idx.reshape(-1), w)


def test_topk_weights_wrong_shape():
    x, idx, w = good_inputs()
    with pytest.raises(ValueError, match=r"topk_weights shape"):
        trace(dispatch_fn(make_buffer()), x, idx, w[:, :1])


def test_rows_mismatch():
    x, idx, w = good_inputs()
    with pytest.raises(ValueError, match=r"topk_idx has \d+ rows but x has \d+ tokens"):
        trace(dispatch_fn(make_buffer()), x, idx[:R * (T - 1)], w[:R * (T - 1)])


def test_k_mismatch_with_buffer():
    x, idx, w = good_inputs(k=K + 1)
    with pytest.raises(ValueError, match=r"num_topk"):
        trace(dispatch_fn(make_buffer()), x, idx, w)


def test_hidden_mismatch_with_buffer():
    x, idx, w = good_inputs(hidden=H * 2)
    with pytest.raises(ValueError, match=r"hidden"):
        trace(dispatch_fn(make_buffer()), x, idx, w)


def test_hidden_not_aligned():
    """Buffer(hidden=4): 4 bf16 = 8 bytes, not a multiple of the 16-byte rows the kernels move."""
    buf = make_buffer(hidden=4)
    x, idx, w = good_inputs(hidden=4, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"not a multiple of 16 bytes"):
        trace(dispatch_fn(buf), x, idx, w)
    trace(dispatch_fn(buf), x.astype(jnp.float32), idx, w)       # 4 f32 = 16 bytes: fine


def test_too_many_tokens():
    x, idx, w = good_inputs(rows=R * (T + 1))
    with pytest.raises(ValueError, match=r"max_tokens_per_rank"):
        trace(dispatch_fn(make_buffer()), x, idx, w)


# -- dispatch: fp8 pairs ------------------------------------------------------------------------------------

def _fp8_fn(buf):
    def fn(q, s, idx, w):
        return jax_ep.dispatch(buf, (q, s), idx, w).x
    return fn


def test_fp8_pair_wrong_scales():
    buf = make_buffer(hidden=256)
    x, idx, w = good_inputs(hidden=256)
    q, s = jax_ep.fp8.per_token_cast_to_fp8(x)
    trace(_fp8_fn(buf), q, s, idx, w)
    with pytest.raises(ValueError, match=r"fp8 scales must be float32 \[\d+, 2\]"):
        trace(_fp8_fn(buf), q, s[:, :1], idx, w)
    with pytest.raises(ValueError, match=r"fp8 scales must be float32"):
        trace(_fp8_fn(buf), q, s.astype(jnp.bfloat16), idx, w)
    with pytest.raises(ValueError, match=r"fp8 payload must be float8_e4m3fn"):
        trace(_fp8_fn(buf), q.astype(jnp.bfloat16), s, idx, w)


def test_fp8_pair_wrong_arity_and_hidden():
    buf = make_buffer(hidden=64)
    x, idx, w = good_inputs(hidden=64)
    q = x.astype(jnp.float8_e4m3fn)
    s = jnp.ones((x.shape[0], 1), jnp.float32)
    with pytest.raises(ValueError, match=r"multiple of 128"):
        trace(_fp8_fn(buf), q, s, idx, w)
    with pytest.raises(ValueError, match=r"pair"):
        trace(lambda q, idx, w: jax_ep.dispatch(buf, (q, q, q), idx, w).x, q, idx, w)


# -- dispatch: options and context ---------------------------------------------------------------------------

def test_wrong_layout_name():
    with pytest.raises(ValueError, match=r"layout must be one of"):
        trace(dispatch_fn(make_buffer(), layout="token_major"), *good_inputs())


@pytest.mark.parametrize("alignment", [0, -4, 2.5, True])
def test_bad_expert_alignment(alignment):
    with pytest.raises(ValueError, match=r"expert_alignment must be an int >= 1"):
        trace(dispatch_fn(make_buffer(), expert_alignment=alignment), *good_inputs())


def test_outside_shard_map():
    x, idx, w = good_inputs(rows=T)
    with pytest.raises(ValueError, match=r"inside jax.shard_map"):
        jax_ep.dispatch(make_buffer(), x, idx, w)
    with pytest.raises(ValueError, match=r"inside jax.shard_map"):
        jax.jit(lambda x, i, w: jax_ep.dispatch(make_buffer(), x, i, w).x)(x, idx, w)


def test_buffer_for_another_mesh_size():
    buf = make_buffer(mesh=ep_mesh(4))
    with pytest.raises(ValueError, match=r"size 2 here but the buffer was built for 4"):
        trace(dispatch_fn(buf), *good_inputs())


def test_not_a_buffer():
    x, idx, w = good_inputs()
    with pytest.raises(TypeError, match=r"expected a jax_ep.Buffer"):
        trace(lambda x, i, w: jax_ep.dispatch("buffer", x, i, w).x, x, idx, w)


def test_closed_buffer():
    buf = make_buffer()
    buf.close()
    assert buf.closed
    with pytest.raises(RuntimeError, match=r"closed"):
        trace(dispatch_fn(buf), *good_inputs())
    with pytest.raises(RuntimeError, match=r"closed"):
        trace(lambda x, i: jax_ep.low_latency_dispatch(buf, x, i).x,
              *good_inputs(dtype=jnp.bfloat16)[:2])
    # an equal, open buffer still works
    trace(dispatch_fn(make_buffer()), *good_inputs())


# -- Buffer construction -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,exc,msg", [
    (dict(num_experts=7), ValueError, r"not divisible by the 2 ranks"),
    (dict(num_experts=64, num_topk=33), ValueError, r"num_topk=33 too large"),
    (dict(num_experts=8, num_topk=9), ValueError, r"num_topk=9 too large"),
    (dict(num_topk=0), ValueError, r"num_topk must be a positive int"),
    (dict(hidden=-8), ValueError, r"hidden must be a positive int"),
    (dict(hidden=64.0), ValueError, r"hidden must be a positive int"),
    (dict(max_tokens_per_rank=0), ValueError, r"max_tokens_per_rank must be a positive int"),
    (dict(max_recv_tokens=0), ValueError, r"max_recv_tokens must be None or a positive int"),
    (dict(max_recv_rows=-1), ValueError, r"max_recv_rows must be None or a positive int"),
    (dict(backend="tpu"), ValueError, r"backend must be"),
    (dict(timeout_s=0), ValueError, r"timeout_s"),
], ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{a}={b}" for a, b in v.items()))
def test_buffer_rejects(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        make_buffer(**kw)


def test_buffer_rejects_mesh_and_axis():
    with pytest.raises(TypeError, match=r"mesh must be a jax.sharding.Mesh"):
        jax_ep.Buffer(jax.devices(), num_experts=E, hidden=H, max_tokens_per_rank=T, num_topk=K)
    with pytest.raises(ValueError, match=r"axis 'tp' is not a mesh axis"):
        jax_ep.Buffer(ep_mesh(R), "tp", num_experts=E, hidden=H, max_tokens_per_rank=T, num_topk=K)


# -- get_dispatch_layout --------------------------------------------------------------------------------------

def test_layout_concrete_ids_out_of_range():
    idx = np.array([[0, 1], [E + 3, -1]], np.int32)
    with pytest.raises(ValueError, match=r"outside \[-1, 8\).*11"):
        jax_ep.get_dispatch_layout(jnp.asarray(idx), E, num_ranks=R)
    with pytest.raises(ValueError, match=r"outside \[-1, 8\).*-7"):
        jax_ep.get_dispatch_layout(jnp.asarray(np.array([[-7, 0]], np.int32)), E, num_ranks=R)


def test_layout_bad_arguments():
    idx = jnp.zeros((4, 2), jnp.int32)
    with pytest.raises(ValueError, match=r"pass num_ranks="):
        jax_ep.get_dispatch_layout(idx, E)
    with pytest.raises(ValueError, match=r"not divisible by num_ranks=3"):
        jax_ep.get_dispatch_layout(idx, E, num_ranks=3)
    with pytest.raises(ValueError, match=r"topk_idx must be int32 \[T, K\]"):
        jax_ep.get_dispatch_layout(idx.astype(jnp.float32), E, num_ranks=R)
    with pytest.raises(ValueError, match=r"topk_idx must be int32 \[T, K\]"):
        jax_ep.get_dispatch_layout(idx.reshape(-1), E, num_ranks=R)
    with pytest.raises(ValueError, match=r"num_experts must be an int >= 1"):
        jax_ep.get_dispatch_layout(idx, 0, num_ranks=R)


def test_dispatch_concrete_ids_out_of_range():
    """Concrete ids known at trace time (closed over) are rejected; traced ones are counted at run time."""
    buf = make_buffer()
    x, idx, w = good_inputs()
    bad = jnp.asarray(np.array([[E, 0]] * T, np.int32))
    with pytest.raises(ValueError, match=r"outside \[-1, 8\)"):
        trace(lambda x, w: jax_ep.dispatch(buf, x, bad, w).x, x, w)


# -- combine / cached_dispatch ------------------------------------------------------------------------------

def _combine_fn(buf, y_shape=None, y_dtype=None, handle="ok", **kw):
    def fn(x, idx, w):
        out = jax_ep.dispatch(buf, x, idx, w, layout=kw.pop("layout", "rank_major"))
        y = out.x
        if y_shape is not None:
            y = jnp.zeros(y_shape, y.dtype)
        if y_dtype is not None:
            y = y.astype(y_dtype)
        h = out.handle if handle == "ok" else handle
        res = jax_ep.combine(buf, y, h, **kw)
        return res[0] if isinstance(res, tuple) else res
    return fn


def test_combine_errors():
    buf = make_buffer()
    C = buf.recv_capacity
    inputs = good_inputs()
    trace(_combine_fn(buf), *inputs)
    with pytest.raises(ValueError, match=rf"y must be \[{C}, {H}\]"):
        trace(_combine_fn(buf, y_shape=(C - 1, H)), *inputs)
    with pytest.raises(ValueError, match=rf"y must be \[{C}, {H}\]"):
        trace(_combine_fn(buf, y_shape=(C, H, 1)), *inputs)
    with pytest.raises(ValueError, match=r"y must be bfloat16 or float32"):
        trace(_combine_fn(buf, y_dtype=jnp.int32), *inputs)
    with pytest.raises(TypeError, match=r"handle must be a DispatchOutput.handle"):
        trace(_combine_fn(buf, handle={"send_pos": 0}), *inputs)
    with pytest.raises(ValueError, match=r"topk_weights must be float32"):
        trace(_combine_fn(buf, topk_weights=jnp.zeros((C + 1, K), jnp.float32)), *inputs)
    with pytest.raises(ValueError, match=r"expert-major topk_weights must be float32"):
        trace(_combine_fn(buf, layout="expert_major", y_shape=None,
                          topk_weights=jnp.zeros((3,), jnp.float32)), *inputs)
    with pytest.raises(ValueError, match=r"bias must be \[4, 64\]"):
        trace(_combine_fn(buf, bias=jnp.zeros((T + 1, H))), *inputs)
    with pytest.raises(ValueError, match=r"bias must be \[4, 64\]"):
        trace(_combine_fn(buf, bias=(jnp.zeros((T, H)), jnp.zeros((T, H + 1)))), *inputs)


def test_combine_y_not_aligned():
    buf = make_buffer(hidden=4)
    with pytest.raises(ValueError, match=r"not a multiple of 16 bytes"):
        trace(_combine_fn(buf, y_dtype=jnp.bfloat16), *good_inputs(hidden=4))


def test_cached_dispatch_errors():
    buf = make_buffer()

    def fn(x, idx, w, *, x2_shape=None, handle="ok"):
        out = jax_ep.dispatch(buf, x, idx, w)
        return jax_ep.cached_dispatch(buf, jnp.zeros(x2_shape, x.dtype) if x2_shape else x,
                                      out.handle if handle == "ok" else handle)

    inputs = good_inputs()
    trace(fn, *inputs)
    with pytest.raises(ValueError, match=r"x must be .*\[4, H\]"):
        trace(lambda *a: fn(*a, x2_shape=(T + 1, H)), *inputs)
    with pytest.raises(TypeError, match=r"handle must be a DispatchOutput.handle"):
        trace(lambda *a: fn(*a, handle=None), *inputs)


# -- low-latency --------------------------------------------------------------------------------------------

def _ll(buf, **kw):
    return lambda x, idx: jax_ep.low_latency_dispatch(buf, x, idx, **kw).x


def test_low_latency_errors():
    ll = make_buffer(hidden=256, low_latency=True)
    x, idx, _ = good_inputs(hidden=256, dtype=jnp.bfloat16)
    trace(_ll(ll), x, idx)
    with pytest.raises(ValueError, match=r"without low_latency=True"):
        trace(_ll(make_buffer(hidden=256)), x, idx)
    xb, ib, _ = good_inputs(rows=R * (T + 1), hidden=256, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"max_tokens_per_rank"):
        trace(_ll(ll), xb, ib)
    with pytest.raises(ValueError, match=r"x must be bfloat16"):
        trace(_ll(ll), x.astype(jnp.float32), idx)
    with pytest.raises(ValueError, match=r"x must be \[T, 256\]"):
        trace(_ll(ll), x[:, :128], idx)
    with pytest.raises(ValueError, match=r"use_ue8m0 needs use_fp8=True"):
        trace(_ll(ll, use_fp8=False, use_ue8m0=True), x, idx)
    with pytest.raises(ValueError, match=r"topk_idx must be int32"):
        trace(_ll(ll), x, idx.astype(jnp.float32))
    ll64 = make_buffer(hidden=64, low_latency=True)
    x64, _, _ = good_inputs(hidden=64, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"fp8 needs hidden % 128 == 0"):
        trace(_ll(ll64), x64, idx)
    trace(_ll(ll64, use_fp8=False), x64, idx)


def test_low_latency_combine_errors():
    ll = make_buffer(hidden=128, low_latency=True)
    x, idx, w = good_inputs(hidden=128, dtype=jnp.bfloat16)

    def fn(x, idx, w, *, y_shape=None, y_dtype=jnp.bfloat16, handle="ok", weights="ok"):
        out = jax_ep.low_latency_dispatch(ll, x, idx)
        y = jnp.zeros(y_shape or out.x.shape, y_dtype)
        return jax_ep.low_latency_combine(ll, y, idx, w if weights == "ok" else weights,
                                          out.handle if handle == "ok" else handle)

    trace(fn, x, idx, w)
    with pytest.raises(ValueError, match=r"y must be bfloat16"):
        trace(lambda *a: fn(*a, y_dtype=jnp.float32), x, idx, w)
    with pytest.raises(ValueError, match=r"y must be bfloat16"):
        trace(lambda *a: fn(*a, y_shape=(E // R, R * T - 1, 128)), x, idx, w)
    with pytest.raises(TypeError, match=r"handle must be a LowLatencyDispatchOutput.handle"):
        trace(lambda *a: fn(*a, handle=None), x, idx, w)
    with pytest.raises(ValueError, match=r"topk_weights must be float32"):
        trace(lambda *a: fn(*a, weights=jnp.zeros((T, K), jnp.bfloat16)), x, idx, w)


def test_low_latency_cumulative_stats_shape():
    ll = make_buffer(hidden=128, low_latency=True)
    x, idx, _ = good_inputs(hidden=128, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"cumulative_stats must be int32"):
        trace(lambda x, i: jax_ep.low_latency_dispatch(ll, x, i, cumulative_stats=jnp.zeros((3,), jnp.int32)).x,
              x, idx)


# -- run time: overflow and invalid ids ----------------------------------------------------------------------

def _counts(x, idx, w, *, buffer):
    out = jax_ep.dispatch(buffer, x, idx, w)
    return out._replace(handle=None)


def _counts_raising(x, idx, w, *, buffer):       # separate function: traced only while raising is on
    return jax_ep.dispatch(buffer, x, idx, w).num_recv


def _counts_raising_em(x, idx, w, *, buffer):
    return jax_ep.dispatch(buffer, x, idx, w, layout="expert_major").num_recv


def _drain_failed_callbacks():
    """The overflow check is a host callback: its error also stays in JAX's runtime effect tokens, where an
    unrelated later ``jax.effects_barrier()`` (or interpreter exit) would report it again. Consume it."""
    try:
        jax.effects_barrier()
    except Exception:  # noqa: BLE001 - the error this test provoked
        pass
    tokens = getattr(getattr(getattr(jax, "_src", None), "dispatch", None), "runtime_tokens", None)
    if tokens is not None and hasattr(tokens, "clear"):
        tokens.clear()


@pytest.fixture
def raise_on_overflow():
    jax_ep.set_raise_on_overflow(True)
    try:
        yield
    finally:
        jax_ep.set_raise_on_overflow(False)
        _drain_failed_callbacks()


def _overflowing_inputs():
    x, _, w = good_inputs()
    idx = np.zeros((R * T, K), np.int32)      # every token to experts 0 and 1 (rank 0): R*T tokens for rank 0
    idx[:, 1] = 1
    return x, jnp.asarray(idx), w


def test_overflow_counted():
    buf = make_buffer(max_recv_tokens=3)
    x, idx, w = _overflowing_inputs()
    out = run_sharded(_counts, buf.mesh, x, idx, w, buffer=buf)
    np.testing.assert_array_equal(out.overflow, [R * T - 3, 0])
    np.testing.assert_array_equal(out.num_recv, [3, 0])
    with pytest.raises(jax_ep.CapacityOverflowError, match=r"capacity"):
        jax_ep.check_overflow(out)
    # no overflow, no invalid ids: passes
    jax_ep.check_overflow(run_sharded(_counts, buf.mesh, x, jnp.full_like(idx, -1), w, buffer=buf))


def test_invalid_ids_counted_and_check_overflow():
    buf = make_buffer()
    x, idx, w = good_inputs()
    bad = np.asarray(idx).copy()
    bad[0, 0], bad[1, 1], bad[R * T - 1, 0] = E, -7, 2 ** 31 - 1
    out = run_sharded(_counts, buf.mesh, x, jnp.asarray(bad), w, buffer=buf)
    np.testing.assert_array_equal(out.num_invalid_ids, [2, 1])
    with pytest.raises(jax_ep.CapacityOverflowError, match=r"outside \[-1, num_experts\)"):
        jax_ep.check_overflow(out)


def test_raise_on_overflow_at_run_time(raise_on_overflow):
    buf = make_buffer(max_recv_tokens=3)
    x, idx, w = _overflowing_inputs()
    with pytest.raises(Exception, match=r"capacity") as info:
        jax.block_until_ready(run_sharded(_counts_raising, buf.mesh, x, idx, w, buffer=buf))
    assert "max_recv_tokens" in str(info.value)
    # the same compiled function is fine on routing that fits
    ok = run_sharded(_counts_raising, buf.mesh, x, jnp.full_like(idx, -1), w, buffer=buf)
    np.testing.assert_array_equal(ok, [0, 0])


def test_raise_on_overflow_expert_major(raise_on_overflow):
    buf = make_buffer(max_recv_rows=5)
    x, idx, w = _overflowing_inputs()
    with pytest.raises(Exception, match=r"capacity"):
        jax.block_until_ready(run_sharded(_counts_raising_em, buf.mesh, x, idx, w, buffer=buf))


def test_raise_on_overflow_reset():
    assert not jax_ep._overflow.raise_on_overflow_enabled()
