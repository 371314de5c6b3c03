"""get_dispatch_layout vs the numpy oracle: inside shard_map (R in {1, 2, 4, 8}) and outside with num_ranks=."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
import oracle
from conftest import dp_ep_mesh, ep_mesh, run_sharded


def _layout(idx, *, num_experts):
    return tuple(jax_ep.get_dispatch_layout(idx, num_experts))


def _check(got, want):
    per_rank, per_expert, in_rank = got
    w_rank, w_expert, w_in = want
    oracle.assert_bits_equal(per_rank, w_rank, "num_tokens_per_rank")
    oracle.assert_bits_equal(per_expert, w_expert, "num_tokens_per_expert")
    oracle.assert_bits_equal(in_rank, w_in, "is_token_in_rank")


@pytest.mark.parametrize("E,K,T", [(8, 2, 8), (16, 4, 6), (32, 8, 4)], ids=lambda v: str(v))
@pytest.mark.parametrize("R", [1, 2, 4, 8])
def test_layout_in_shard_map(R, E, K, T):
    rng = np.random.default_rng(1000 * R + E)
    mesh = ep_mesh(R)
    for routing in (dict(), dict(duplicates=True, invalid=True, neg_frac=0.4)):   # same shapes: one compile
        idx, _ = oracle.make_routing(rng, R, T, E, K, **routing)
        got = run_sharded(_layout, mesh, idx, num_experts=E)
        _check(got, oracle.layout(idx, R, E))


def test_layout_types_and_shapes():
    R, E, K, T = 4, 16, 4, 6
    rng = np.random.default_rng(0)
    idx, _ = oracle.make_routing(rng, R, T, E, K)
    out = jax_ep.get_dispatch_layout(jnp.asarray(idx[:T]), E, num_ranks=R)
    assert isinstance(out, jax_ep.DispatchLayout)
    assert out.num_tokens_per_rank.shape == (R,) and out.num_tokens_per_rank.dtype == jnp.int32
    assert out.num_tokens_per_expert.shape == (E,) and out.num_tokens_per_expert.dtype == jnp.int32
    assert out.is_token_in_rank.shape == (T, R) and out.is_token_in_rank.dtype == jnp.bool_


@pytest.mark.parametrize("R,E,K,T", [(1, 4, 2, 5), (2, 8, 3, 7), (4, 16, 4, 9), (8, 64, 8, 3), (8, 8, 8, 4)])
def test_layout_outside_shard_map(R, E, K, T):
    """num_ranks= lets it run without a mesh (eagerly and under jit, also with out-of-range ids under jit)."""
    rng = np.random.default_rng(7 * R + E)
    idx, _ = oracle.make_routing(rng, 1, T, E, K, duplicates=True, uneven=False)
    got = jax_ep.get_dispatch_layout(jnp.asarray(idx), E, num_ranks=R)
    _check(tuple(np.asarray(a) for a in got), oracle.layout_one(idx, R, E))
    # Under jit the ids are not known at trace time: out-of-range ones are ignored (treated as -1).
    bad, _ = oracle.make_routing(rng, 1, T, E, K, invalid=True, uneven=False)
    fn = jax.jit(functools.partial(jax_ep.get_dispatch_layout, num_experts=E, num_ranks=R))
    got = fn(jnp.asarray(bad))
    _check(tuple(np.asarray(a) for a in got), oracle.layout_one(bad, R, E))


def test_layout_edge_rows():
    """All -1, all one expert, every expert on every rank."""
    R, E, K = 4, 8, 8
    idx = np.array([[-1] * K, [3] * K, list(range(E)), [7, -1, 0, -1, 7, -1, 0, -1]], np.int32)
    got = jax_ep.get_dispatch_layout(jnp.asarray(idx), E, num_ranks=R)
    np.testing.assert_array_equal(np.asarray(got.is_token_in_rank),
                                  [[0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 1]])
    np.testing.assert_array_equal(np.asarray(got.num_tokens_per_rank), [2, 2, 1, 2])
    np.testing.assert_array_equal(np.asarray(got.num_tokens_per_expert), [3, 1, 1, 9, 1, 1, 1, 3])


def test_layout_2d_mesh_groups():
    """On a (dp=2, ep=4) mesh the default axis "ep" gives R=4 per group; groups are independent."""
    mesh = dp_ep_mesh(2, 4)
    R, E, K, T = 4, 16, 4, 6
    rng = np.random.default_rng(3)
    idx, _ = oracle.make_routing(rng, 2 * R, T, E, K)
    got = run_sharded(_layout, mesh, idx, num_experts=E)
    _check(got, oracle.layout(idx, R, E, num_groups=2))


@pytest.mark.parametrize("R,N", [(8, 4), (8, 2), (4, 1), (4, 4), (6, 3)])
def test_layout_per_node(R, N):
    """ranks_per_node=N: a token counts once per node of N consecutive ranks (numpy oracle), and the first
    three fields are the plain layout's."""
    E, K, T = 4 * R, 4, 11
    rng = np.random.default_rng(R * 10 + N)
    idx, _ = oracle.make_routing(rng, 1, T, E, K, duplicates=True, invalid=True, uneven=False)
    got = jax.jit(functools.partial(jax_ep.get_dispatch_layout, num_experts=E, num_ranks=R,
                                    ranks_per_node=N))(jnp.asarray(idx))
    assert isinstance(got, jax_ep.InternodeDispatchLayout)
    _check(tuple(np.asarray(a) for a in got[:3]), oracle.layout_one(idx, R, E))
    valid = (idx >= 0) & (idx < E)
    node_of = np.where(valid, idx // (E // R) // N, -1)
    in_node = np.stack([(node_of == n).any(axis=1) for n in range(R // N)], axis=1)
    oracle.assert_bits_equal(np.asarray(got.is_token_in_node), in_node, "is_token_in_node")
    oracle.assert_bits_equal(np.asarray(got.num_tokens_per_node), in_node.sum(0).astype(np.int32),
                             "num_tokens_per_node")


def test_layout_per_node_rejects_bad_node_size():
    idx = jnp.zeros((4, 2), jnp.int32)
    with pytest.raises(ValueError, match="ranks_per_node=3 does not divide num_ranks=8"):
        jax_ep.get_dispatch_layout(idx, 16, num_ranks=8, ranks_per_node=3)
    with pytest.raises(ValueError, match="ranks_per_node"):
        jax_ep.get_dispatch_layout(idx, 16, num_ranks=8, ranks_per_node=0)
