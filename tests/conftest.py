"""Shared pytest setup for the jax_ep suite.

* 8 fake CPU devices (``--xla_force_host_platform_device_count=8``), set before jax is imported;
* ``JAX_EP_BACKEND=reference`` unless the environment already chose a backend;
* a small, derandomized hypothesis profile (the CPU suite has a tight time budget: jit compiles dominate);
* the ``gpu`` marker: skipped unless JAX sees a GPU;
* mesh fixtures / helpers and the shard_map harness (``run_sharded``).
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_EP_BACKEND", "reference")

import functools  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import jax  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

settings.register_profile(
    "jax_ep", max_examples=10, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large])
settings.load_profile(os.environ.get("JAX_EP_HYPOTHESIS_PROFILE", "jax_ep"))


# -- markers --------------------------------------------------------------------------------------------------

def _has_gpu() -> bool:
    try:
        return any(d.platform in ("gpu", "cuda") for d in jax.devices())
    except RuntimeError:
        return False


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU visible to JAX (run with `pytest -m gpu`)")


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a GPU visible to JAX")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# -- meshes ---------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def ep_mesh(num_ranks: int, axis: str = "ep") -> Mesh:
    """1-D mesh of the first ``num_ranks`` devices. (Not jax.make_mesh: its Explicit axes reject unsharded
    inputs in shard_map.)"""
    devices = jax.devices()
    if len(devices) < num_ranks:
        pytest.skip(f"needs {num_ranks} devices, have {len(devices)}")
    return Mesh(np.array(devices[:num_ranks]), (axis,))


@functools.lru_cache(maxsize=None)
def dp_ep_mesh(dp: int, ep: int) -> Mesh:
    """2-D mesh ("dp", "ep"): ``dp`` independent EP groups of ``ep`` ranks (device d*ep + e at (d, e))."""
    devices = jax.devices()
    if len(devices) < dp * ep:
        pytest.skip(f"needs {dp * ep} devices, have {len(devices)}")
    return Mesh(np.array(devices[:dp * ep]).reshape(dp, ep), ("dp", "ep"))


@pytest.fixture(params=[1, 2, 4, 8], ids=lambda r: f"R{r}")
def num_ranks(request):
    return request.param


@pytest.fixture
def mesh(num_ranks):
    return ep_mesh(num_ranks)


@pytest.fixture
def mesh_factory():
    return ep_mesh


@pytest.fixture
def mesh_2d_factory():
    return dp_ep_mesh


# -- shard_map harness ----------------------------------------------------------------------------------------

def _spec_for(mesh: Mesh):
    names = tuple(mesh.axis_names)
    return P(names[0] if len(names) == 1 else names)


@functools.lru_cache(maxsize=None)
def _compiled(fn, mesh: Mesh, static_items: tuple):
    static = dict(static_items)
    spec = _spec_for(mesh)

    def per_rank(*args):
        out = fn(*args, **static)
        # A leading dim of 1 per rank: out_specs=P(axis) stacks them to [ranks, ...] (scalars included).
        return jax.tree.map(lambda a: a[None], out)

    return jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=spec, out_specs=spec))


def run_sharded(fn, mesh: Mesh, *args, **static):
    """Run ``fn(*per_rank_args, **static)`` per rank under jit(shard_map) over every axis of ``mesh``.

    ``args`` are global arrays ``[R*T, ...]`` (split along their first axis, rank-major over the mesh axes);
    returns ``fn``'s output pytree with every leaf stacked per rank (``[R, ...]``) as numpy arrays. ``fn``
    and the keyword arguments (hashable) key a cache of jitted functions, so equal configs compile once.
    """
    compiled = _compiled(fn, mesh, tuple(sorted(static.items())))
    out = compiled(*args)
    return jax.tree.map(np.asarray, out)


def run_sharded_raw(fn, mesh: Mesh, *args, **static):
    """Like ``run_sharded`` but returns the jax arrays (not yet synchronised)."""
    return _compiled(fn, mesh, tuple(sorted(static.items())))(*args)
