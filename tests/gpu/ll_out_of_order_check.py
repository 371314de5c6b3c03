"""Two pending low-latency dispatches received in the wrong order must fail the call with a message that says
so (a later send would otherwise reuse the unreceived result's staging). One process, every local GPU a rank.
Exit 0 = the expected failure and message."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # the checkout's jax_ep, installed or not

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402
from jax_ep.cuda_backend import runtime  # noqa: E402

devs = jax.devices("cuda")
R, T, H, K = len(devs), 16, 256, 2
mesh = Mesh(np.array(devs), ("ep",))
buf = jax_ep.Buffer(mesh, num_experts=4 * R, hidden=H, max_tokens_per_rank=T, num_topk=K, low_latency=True,
                    backend="cuda", timeout_s=5)
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((R * T, H)), jnp.bfloat16)
idx = jnp.asarray(rng.integers(0, 4 * R, (R * T, K)), jnp.int32)


def second_received_first(x, i):
    first = jax_ep.low_latency_dispatch_send(buf, x, i)
    second = jax_ep.low_latency_dispatch_send(buf, x, i)
    late = jax_ep.low_latency_dispatch_recv(buf, second).count
    late, first = jax.lax.optimization_barrier((late, first))   # XLA must keep this (wrong) order
    early = jax_ep.low_latency_dispatch_recv(buf, first).count
    return late + early


f = jax.jit(jax.shard_map(second_received_first, mesh=mesh, in_specs=(P("ep"),) * 2, out_specs=P("ep")))
try:
    jax.block_until_ready(f(x, idx))
    print("ERROR: receiving out of order did not fail", flush=True)
    os._exit(1)
except Exception as e:  # noqa: BLE001 - the trapped kernel surfaces as an XLA runtime error
    diag = runtime.ensure(buf).diagnostics()
    print(f"failed as expected: {type(e).__name__}; diagnostics: {diag!r}", flush=True)
    os._exit(0 if "order they were sent" in diag else 1)   # the CUDA context is gone after the trap
