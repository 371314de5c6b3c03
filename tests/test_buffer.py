"""jax_ep.Buffer: identity by config, static-arg use in jit, lifetime, derived sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ep
from conftest import dp_ep_mesh, ep_mesh


def make(R=4, **kw):
    cfg = dict(num_experts=16, hidden=64, max_tokens_per_rank=8, num_topk=4)
    cfg.update(kw)
    return jax_ep.Buffer(ep_mesh(R), **cfg)


def test_equal_and_hash_by_config():
    a, b = make(), make()
    assert a is not b and a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    for other in (make(hidden=128), make(R=2), make(num_topk=2), make(max_recv_tokens=8), make(low_latency=True),
                  make(backend="reference")):
        assert other != a
    assert a != "not a buffer"


def test_static_jit_argument():
    traces = []

    def per_rank(buffer, x, idx, w):
        traces.append(buffer)
        out = jax_ep.dispatch(buffer, x, idx, w)
        return out.num_recv[None]

    def step(x, idx, w, buffer):
        return jax.shard_map(lambda *a: per_rank(buffer, *a), mesh=buffer.mesh, in_specs=P("ep"),
                             out_specs=P("ep"))(x, idx, w)

    step = jax.jit(step, static_argnums=3)
    a = make(R=2, num_experts=4, num_topk=2)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 64)), jnp.float32)
    idx = jnp.asarray(np.tile([[0, 2]], (16, 1)), jnp.int32)
    w = jnp.ones((16, 2), jnp.float32)
    np.testing.assert_array_equal(step(x, idx, w, a), [16, 16])
    np.testing.assert_array_equal(step(x, idx, w, make(R=2, num_experts=4, num_topk=2)), [16, 16])
    assert len(traces) == 1, "an equal Buffer must hit the jit cache"
    step(x, idx, w, make(R=2, num_experts=4, num_topk=2, max_recv_tokens=5))
    assert len(traces) == 2


def test_context_manager_closes():
    with make() as b:
        assert not b.closed
        b.check_open()
    assert b.closed
    with pytest.raises(RuntimeError, match="closed"):
        b.check_open()
    b.close()                              # idempotent
    assert not make().closed               # an equal buffer is a separate resource


def test_close_state_does_not_leak_to_new_buffers():
    """A new Buffer must never start closed, whatever happened to earlier (collected) buffers: in particular
    one that CPython allocates at the address (id) of a closed buffer that was freed."""
    mesh = ep_mesh(2)
    reused = leaked = 0
    for _ in range(10):
        b = jax_ep.Buffer(mesh, num_experts=4, hidden=64, max_tokens_per_rank=8, num_topk=2)
        b.close()
        addr = id(b)
        del b                              # freed at once (refcount): its address may be reused
        keep = []
        for _ in range(20):
            c = jax_ep.Buffer(mesh, num_experts=4, hidden=64, max_tokens_per_rank=8, num_topk=2)
            keep.append(c)
            if id(c) == addr:
                reused += 1
                leaked += c.closed
                break
        del keep
    if not reused:
        pytest.skip("the allocator never reused a buffer's address: nothing to check")
    assert leaked == 0, f"{leaked}/{reused} buffers created at a closed buffer's address reported closed"


def test_recv_capacity_and_expert_major_capacity():
    b = make(R=4, num_experts=16, max_tokens_per_rank=8, num_topk=4)
    assert b.num_ranks == 4 and b.num_local_experts == 4
    assert b.recv_capacity == 4 * 8
    assert b.expert_major_capacity() == 32 * 4
    assert b.expert_major_capacity(1) == 32 * 4
    assert b.expert_major_capacity(16) == 32 * 4 + 4 * 15
    assert b.low_latency_slots == 4 * 8
    c = make(R=4, max_recv_tokens=10)
    assert c.recv_capacity == 10 and c.expert_major_capacity(4) == 10 * 4 + 4 * 3
    d = make(R=4, max_recv_tokens=10, max_recv_rows=7)
    assert d.recv_capacity == 10 and d.expert_major_capacity(1) == 7 and d.expert_major_capacity(16) == 7
    e = make(R=1)
    assert e.num_ranks == 1 and e.num_local_experts == 16 and e.recv_capacity == 8


def test_size_hint_grows():
    base = make()
    assert isinstance(base.size_hint, int) and base.size_hint > 0
    assert make(hidden=128).size_hint > base.size_hint
    assert make(max_tokens_per_rank=16).size_hint > base.size_hint
    assert make(num_topk=8).size_hint > base.size_hint
    assert make(max_recv_tokens=64).size_hint > make(max_recv_tokens=8).size_hint
    assert make(R=8).size_hint > make(R=2).size_hint


def test_2d_mesh_axis():
    b = jax_ep.Buffer(dp_ep_mesh(2, 4), "ep", num_experts=8, hidden=64, max_tokens_per_rank=4, num_topk=2)
    assert b.num_ranks == 4 and b.num_local_experts == 2 and b.recv_capacity == 16
    d = jax_ep.Buffer(dp_ep_mesh(2, 4), "dp", num_experts=8, hidden=64, max_tokens_per_rank=4, num_topk=2)
    assert d.num_ranks == 2 and d != b


def test_repr():
    text = repr(make(max_recv_tokens=10))
    assert "R=4" in text and "E=16" in text and "C=10" in text


def test_size_hint_matches_the_cuda_layout():
    """size_hint is what the CUDA runtime allocates (checked against the extension when it is built)."""
    from jax_ep import _cuda
    if _cuda.extension_error() is not None:
        pytest.skip("CUDA extension not built")
    from jax_ep.cuda_backend import runtime
    for R, H, K, T, ll in ((1, 7168, 8, 4096, False), (4, 264, 3, 200, False), (8, 128, 16, 64, False),
                           (8, 7168, 8, 128, True), (2, 640, 6, 96, True)):
        buf = jax_ep.Buffer(ep_mesh(R), num_experts=8 * R, hidden=H, max_tokens_per_rank=T, num_topk=K,
                            low_latency=ll)
        assert buf.size_hint == runtime.bytes_per_rank(buf)


@pytest.mark.parametrize("name, largest, message", [
    # the receive keeps one (expert, source) pair's presence bits and 16-bit row slots in shared memory
    ("max_tokens", 16384, "fewer tokens per rank"),
    # the dispatch send stages a token's bf16 row in shared memory
    ("ll_hidden", 65536, "stages a token's row in shared memory"),
])
def test_low_latency_buffer_past_a_bound_is_a_clear_error(name, largest, message):
    """Low-latency sizes past what the kernels' shared memory holds are refused when the CUDA runtime sizes the
    buffer, saying why."""
    from jax_ep import _cuda
    if _cuda.extension_error() is not None:
        pytest.skip("CUDA extension not built")
    ext = _cuda.extension()
    args = dict(num_ranks=8, capacity=8, num_topk=8, max_row_bytes=64, max_scale_bytes=4, max_tokens=128,
                ll_hidden=7168, ll_num_experts=256)
    assert ext.intranode_bytes(**{**args, name: largest}) > 0
    with pytest.raises(ValueError, match=message):
        ext.intranode_bytes(**{**args, name: largest + 8})


def test_ranks_per_node_selects_internode_mode():
    mesh = ep_mesh(8)

    def make(**kw):
        return jax_ep.Buffer(mesh, num_experts=16, hidden=256, max_tokens_per_rank=32, num_topk=4, **kw)
    assert make().num_nodes == 1 and make(ranks_per_node=8).num_nodes == 1
    assert make(ranks_per_node=4).num_nodes == 2 and make(ranks_per_node=1).num_nodes == 8
    assert make(ranks_per_node=2).size_hint > make().size_hint   # network and reduce areas
    for bad in (3, 0, 16, True):
        with pytest.raises(ValueError, match="ranks_per_node"):
            make(ranks_per_node=bad)
    with pytest.raises(ValueError, match="low-latency mode over several nodes"):
        make(ranks_per_node=4, low_latency=True)


def test_internode_size_hint_matches_the_extension():
    ext = pytest.importorskip("jax_ep._C")
    from jax_ep.cuda_backend import runtime
    mesh = ep_mesh(8)
    for n in (8, 4, 2, 1):
        buf = jax_ep.Buffer(mesh, num_experts=32, hidden=7168, max_tokens_per_rank=96, num_topk=8, ranks_per_node=n)
        assert buf.size_hint == ext.intranode_bytes(**runtime.layout_args(buf))
