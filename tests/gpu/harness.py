"""Shared by the multi-process GPU workers: join the launcher's process group, and build per-rank GPU
inputs plus the reference backend on this process's CPU devices (the oracle; XLA collectives on the GPU
are not usable when several ranks share one GPU)."""

from __future__ import annotations

import os
import sys


def setup():
    nproc = int(os.environ["JAX_EP_NUM_PROCESSES"])
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={nproc}".strip()
    from jax_ep.launch import initialize
    initialize()
    import jax
    import numpy as np
    from jax.sharding import Mesh
    if os.environ.get("JAX_EP_DRYRUN"):  # CPU rehearsal of a worker: one CPU device per process plays the GPU
        firsts = {}
        for d in jax.devices():
            firsts.setdefault(d.process_index, d)
        gpu_mesh = Mesh(np.array([firsts[p] for p in sorted(firsts)]), ("ep",))
    else:
        gpu_mesh = Mesh(np.array(jax.devices()), ("ep",))
    cpu_mesh = Mesh(np.array(jax.local_devices(backend="cpu")[:nproc]), ("ep",))
    return jax.process_index(), nproc, gpu_mesh, cpu_mesh


def global_array(mesh, data):
    """A global jax.Array sharded over "ep" along axis 0, from the same numpy data on every process."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    return jax.make_array_from_callback(data.shape, NamedSharding(mesh, P("ep")), lambda index: data[index])


def local_rows(arr):
    """This process's shard of a global output, as numpy."""
    import numpy as np
    (shard,) = arr.addressable_shards
    return np.asarray(shard.data)


def log(rank, *args):
    print(f"[rank {rank}]", *args, flush=True)
    sys.stdout.flush()
