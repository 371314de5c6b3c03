"""A rank that never joins: the others must fail within the timeout, naming the rank they waited for.

Run through ``python -m jax_ep.launch --nproc 2`` with JAX_EP_TIMEOUT_S small. Rank 1 compiles the step
(which sets up the communication buffer with everyone) but never runs it; rank 0 runs it and must get an
error. Exit codes: 0 = rank 0 failed with a diagnostic naming rank 1 (the expected outcome); 1 = it did not.
JAX_EP_RANKS_PER_NODE=1: the same in internode mode (two one-rank nodes; the diagnostic must also name the
internode stage).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.gpu.harness import global_array, log, setup  # noqa: E402

rank, R, mesh, _ = setup()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402
from jax_ep.cuda_backend import runtime  # noqa: E402

T, H, K, E = 64, 256, 2, 4 * R
RANKS_PER_NODE = int(os.environ.get("JAX_EP_RANKS_PER_NODE", "0")) or None
buf = jax_ep.Buffer(mesh, num_experts=E, hidden=H, max_tokens_per_rank=T, num_topk=K, backend="cuda",
                    ranks_per_node=RANKS_PER_NODE)
rng = np.random.default_rng(0)
args = [global_array(mesh, a) for a in (rng.standard_normal((R * T, H)).astype(np.float32),
                                        rng.integers(0, E, (R * T, K)).astype(np.int32),
                                        rng.random((R * T, K)).astype(np.float32))]
step = jax.jit(jax.shard_map(lambda x, i, w: jax_ep.dispatch(buf, x, i, w).x, mesh=mesh,
                             in_specs=(P("ep"),) * 3, out_specs=P("ep")))
compiled = step.lower(*args).compile()   # every rank: trace (buffer exchange) + compile
if rank != 0:
    time.sleep(3 * buf.timeout_s + 10)   # never joins the op
    os._exit(0)                          # no distributed shutdown barrier with a rank that trapped
t0 = time.time()
try:
    jax.block_until_ready(compiled(*args))
    log(rank, "ERROR: the op completed without its peer")
    sys.exit(1)
except Exception as e:  # noqa: BLE001 - a trapped kernel surfaces as an XLA runtime error
    elapsed = time.time() - t0
    diag = runtime.ensure(buf).diagnostics()
    log(rank, f"failed after {elapsed:.1f} s: {type(e).__name__}; diagnostics: {diag!r}")
    ok = "waiting for rank 1" in diag and elapsed < 5 * buf.timeout_s + 30
    if RANKS_PER_NODE is not None and RANKS_PER_NODE < R:
        ok = ok and "internode" in diag   # the stage is named too
    sys.stdout.flush()
    # Outlive rank 1 (it hosts no coordinator, this rank does): its clean exit must come first, or losing
    # the coordination service kills it with a non-zero code that the launcher would report.
    time.sleep(max(0.0, 3 * buf.timeout_s + 15 - elapsed))
    os._exit(0 if ok else 1)   # the CUDA context is gone after the trap: skip normal teardown
