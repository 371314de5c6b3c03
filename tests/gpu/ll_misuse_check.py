"""Low-latency misuse that must fail the call with a message saying what went wrong (never hang, never corrupt):
`python ll_misuse_check.py third_send` -- a third send while two results are pending;
`python ll_misuse_check.py out_of_order` -- two pending dispatches received in the wrong order (a later send would
otherwise reuse the unreceived result's staging). One process, every local GPU a rank. Exit 0 = the expected
failure and message."""

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


def third_send(x, i):
    pends = [jax_ep.low_latency_dispatch_send(buf, x, i) for _ in range(3)]
    return sum(jax_ep.low_latency_dispatch_recv(buf, p).count for p in pends)


def out_of_order(x, i):
    first = jax_ep.low_latency_dispatch_send(buf, x, i)
    second = jax_ep.low_latency_dispatch_send(buf, x, i)
    late = jax_ep.low_latency_dispatch_recv(buf, second).count
    late, first = jax.lax.optimization_barrier((late, first))   # XLA must keep this (wrong) order
    early = jax_ep.low_latency_dispatch_recv(buf, first).count
    return late + early


SCENARIOS = {"third_send": (third_send, "two results"), "out_of_order": (out_of_order, "order they were sent")}
body, expected = SCENARIOS[sys.argv[1]]
f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 2, out_specs=P("ep")))
try:
    jax.block_until_ready(f(x, idx))
    print(f"ERROR: {sys.argv[1]} did not fail", flush=True)
    os._exit(1)
except Exception as e:  # noqa: BLE001 - the trapped kernel surfaces as an XLA runtime error
    diag = runtime.ensure(buf).diagnostics()
    print(f"failed as expected: {type(e).__name__}; diagnostics: {diag!r}", flush=True)
    os._exit(0 if expected in diag else 1)   # the CUDA context is gone after the trap
