"""A third low-latency send while two results are pending must fail the call with a message that says so
(not hang). One process, every local GPU a rank. Exit 0 = the expected failure and message."""

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


def three_in_flight(x, i):
    pends = [jax_ep.low_latency_dispatch_send(buf, x, i) for _ in range(3)]
    return sum(jax_ep.low_latency_dispatch_recv(buf, p).count for p in pends)


f = jax.jit(jax.shard_map(three_in_flight, mesh=mesh, in_specs=(P("ep"),) * 2, out_specs=P("ep")))
try:
    jax.block_until_ready(f(x, idx))
    print("ERROR: three results in flight did not fail", flush=True)
    os._exit(1)
except Exception as e:  # noqa: BLE001 - the trapped kernel surfaces as an XLA runtime error
    diag = runtime.ensure(buf).diagnostics()
    print(f"failed as expected: {type(e).__name__}; diagnostics: {diag!r}", flush=True)
    os._exit(0 if "two results" in diag else 1)   # the CUDA context is gone after the trap
