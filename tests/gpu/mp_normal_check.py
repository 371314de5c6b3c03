"""Multi-rank check of the CUDA normal mode against the reference backend (run by tests/test_gpu_normal.py
through ``python -m jax_ep.launch --nproc R``). Exits non-zero on any mismatch; rank 0 writes a JSON
summary to $JAX_EP_RESULT if set. JAX_EP_RANKS_PER_NODE=N < R runs the internode mode (R / N virtual nodes;
combine is then compared to tolerance: partial sums per node change the f32 order) and adds routings
limited to a few nodes per token, generated like DeepSeek-V3's router."""

from __future__ import annotations

import hashlib
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.gpu.harness import Checks, global_array, local_rows, log, setup  # noqa: E402
from tests.gpu.harness import routing as shared_routing  # noqa: E402

rank, R, gpu_mesh, cpu_mesh = setup()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402

GPU_BACKEND = "reference" if os.environ.get("JAX_EP_DRYRUN") else "cuda"
RANKS_PER_NODE = int(os.environ.get("JAX_EP_RANKS_PER_NODE", "0")) or R
INTERNODE = RANKS_PER_NODE < R
check = Checks(rank)


def routing(rng, T, K, E, invalid=False):
    return shared_routing(rng, R, T, K, E, invalid)


_gpu_buffers = []


def run(mesh, backend, fn, arrays, n_out):
    buf_args = fn.buffer_args
    buf = jax_ep.Buffer(mesh, num_experts=buf_args["E"], hidden=buf_args["H"], max_tokens_per_rank=buf_args["T"],
                        num_topk=buf_args["K"], max_recv_tokens=buf_args.get("C"), backend=backend,
                        ranks_per_node=RANKS_PER_NODE)
    f = jax.jit(jax.shard_map(lambda *a: fn(buf, *a), mesh=mesh, in_specs=(P("ep"),) * len(arrays),
                              out_specs=(P("ep"),) * n_out))
    if mesh is gpu_mesh:
        _gpu_buffers.append(buf)
        return [local_rows(o) for o in f(*[global_array(mesh, a) for a in arrays])], (f, buf)
    outs = f(*arrays)
    return [np.asarray(o).reshape((R, -1) + o.shape[1:])[rank] for o in outs], (f, buf)


def scalars(out):
    return jnp.stack([out.num_recv, out.overflow, out.num_invalid_ids])[None]


def group_limited_routing(rng, T, K, E, topk_group):
    """DeepSeek-V3's routing: sigmoid scores, one group per node, a token's groups ranked by their top-2
    scores; its top-k experts come from its best `topk_group` groups only."""
    groups = R // RANKS_PER_NODE
    scores = 1 / (1 + np.exp(-rng.standard_normal((R * T, E))))
    by_group = scores.reshape(R * T, groups, E // groups)
    group_score = np.sort(by_group, axis=2)[:, :, -2:].sum(axis=2)
    keep = np.argsort(-group_score, axis=1)[:, :topk_group]
    mask = np.zeros((R * T, groups), bool)
    np.put_along_axis(mask, keep, True, axis=1)
    masked = np.where(np.repeat(mask, E // groups, axis=1), scores, -1.0)
    idx = np.argsort(-masked, axis=1)[:, :K].astype(np.int32)
    idx[rng.random(idx.shape) < 0.05] = -1
    return idx, rng.random(idx.shape).astype(np.float32)


def case_dispatch(T, H, K, E, dtype, C=None, alignment=4, invalid=False, seed=0, topk_group=None):
    rng = np.random.default_rng(seed)
    if topk_group:
        idx, w = group_limited_routing(rng, T, K, E, topk_group)
    else:
        idx, w = routing(rng, T, K, E, invalid)
    x = rng.standard_normal((R * T, H)).astype(np.float32)
    name = f"R{R} T{T} H{H} K{K} E{E} {dtype} C{C} inv{invalid}" + (f" groups{topk_group}" if topk_group else "")

    def fn(buf, x, idx, w):
        payload = x.astype(dtype) if dtype != "fp8" else jax_ep.per_token_cast_to_fp8(x)
        out = jax_ep.dispatch(buf, payload, idx, w, expert_alignment=alignment)
        xs = out.x if dtype != "fp8" else jax.lax.bitcast_convert_type(out.x, jnp.uint8)
        scales = out.x_scales if dtype == "fp8" else jnp.zeros((out.x.shape[0], 1), jnp.float32)
        # Exact in every dtype (a power-of-two scale), so GPU and CPU feed combine identical rows.
        y = out.x.astype(jnp.float32) if dtype != "fp8" else jax_ep.per_token_cast_back(out.x, out.x_scales,
                                                                                         out_dtype=jnp.float32)
        y = (2.0 * y).astype(jnp.bfloat16 if dtype != "float32" else jnp.float32)
        comb = jax_ep.combine(buf, y, out.handle)  # compared in its own dtype: XLA GPU may drop f32->bf16->f32
        again = jax_ep.cached_dispatch(buf, x.astype(y.dtype), out.handle)
        return (xs, scales, out.topk_idx, out.topk_weights, out.tokens_per_expert[None], scalars(out), comb, again)
    fn.buffer_args = dict(T=T, H=H, K=K, E=E, C=C)
    got, _ = run(gpu_mesh, GPU_BACKEND, fn, (x, idx, w), 8)
    want, _ = run(cpu_mesh, "reference", fn, (x, idx, w), 8)
    for i, field in enumerate(("x", "x_scales", "topk_idx", "topk_weights", "tokens_per_expert", "stats")):
        check(f"dispatch {name}: {field}", got[i], want[i])
    if INTERNODE:  # per-node partial sums first: another f32 order
        check(f"combine {name}", got[6], want[6], exact=False, rtol=1e-2, atol=1e-2)
    else:
        check(f"combine {name}", got[6], want[6])  # same f32 order (ascending rank): bit-exact
    check(f"cached_dispatch {name}", got[7], want[7])


def case_expert_major_and_grad(T, H, K, E, seed=1):
    rng = np.random.default_rng(seed)
    idx, w = routing(rng, T, K, E)
    x = rng.standard_normal((R * T, H)).astype(np.float32)
    W = (rng.standard_normal((H, H)) / np.sqrt(H)).astype(np.float32)

    def fn(buf, x, idx, w):
        def loss(x, w):
            out = jax_ep.dispatch(buf, x, idx, w, layout="expert_major", expert_alignment=8)
            y = jnp.tanh(jnp.dot(out.x, W, precision=jax.lax.Precision.HIGHEST))
            z = jax_ep.combine(buf, y, out.handle, topk_weights=out.topk_weights)
            return jnp.sum(z * z), (z, out.group_sizes)
        (val, (z, gs)), (gx, gw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)
        return z, gs[None], gx, gw
    fn.buffer_args = dict(T=T, H=H, K=K, E=E)
    got, _ = run(gpu_mesh, GPU_BACKEND, fn, (x, idx, w), 4)
    want, _ = run(cpu_mesh, "reference", fn, (x, idx, w), 4)
    name = f"expert-major R{R} T{T} H{H}"
    check(f"{name}: combine", got[0], want[0], exact=False, rtol=1e-4, atol=1e-5)
    check(f"{name}: group_sizes", got[1], want[1])
    check(f"{name}: grad x", got[2], want[2], exact=False, rtol=1e-4, atol=1e-5)
    check(f"{name}: grad topk_weights", got[3], want[3], exact=False, rtol=1e-4, atol=1e-5)


def case_determinism(T=512, H=1024, K=8, E=64, repeats=20):
    rng = np.random.default_rng(7)
    idx, w = routing(rng, T, K, E)
    x = rng.standard_normal((R * T, H)).astype(np.float32)

    def fn(buf, x, idx, w):
        out = jax_ep.dispatch(buf, x.astype(jnp.bfloat16), idx, w)
        return out.x, jax_ep.combine(buf, out.x, out.handle)
    fn.buffer_args = dict(T=T, H=H, K=K, E=E)
    _, (f, _) = run(gpu_mesh, GPU_BACKEND, fn, (x, idx, w), 2)
    args = [global_array(gpu_mesh, a) for a in (x, idx, w)]
    digests = set()
    for _ in range(repeats):
        outs = f(*args)
        h = hashlib.sha256()
        for o in outs:
            h.update(local_rows(o).tobytes())
        digests.add(h.hexdigest())
    check(f"determinism over {repeats} repeats", np.array(len(digests)), np.array(1))


t0 = time.time()
case_dispatch(T=256, H=512, K=8, E=32, dtype="bfloat16")
case_dispatch(T=256, H=512, K=8, E=32, dtype="float32", invalid=True)
case_dispatch(T=128, H=1024, K=4, E=16 * R, dtype="fp8", alignment=1)
case_dispatch(T=200, H=264, K=3, E=6 * R, dtype="bfloat16", C=max(1, 200 * R // 3))   # capacity below worst case
case_dispatch(T=64, H=128, K=16, E=max(16, 4 * R), dtype="bfloat16", C=5)
if INTERNODE:
    case_dispatch(T=256, H=1024, K=8, E=16 * R, dtype="bfloat16", topk_group=max(1, R // RANKS_PER_NODE // 2))
    case_dispatch(T=192, H=512, K=8, E=8 * R, dtype="fp8", topk_group=1, seed=3)
case_expert_major_and_grad(T=128, H=256, K=4, E=8 * R)
case_determinism()
if GPU_BACKEND == "cuda":
    # The transport each Buffer took: in this harness (one GPU per process, the mesh over every process) auto
    # must take NVSHMEM; JAX_EP_TRANSPORT=ipc keeps CUDA IPC. Internode Buffers are always NVSHMEM.
    from jax_ep.cuda_backend import runtime as _runtime
    asked = os.environ.get("JAX_EP_TRANSPORT", "auto")
    want = "nvshmem" if INTERNODE or asked != "ipc" else "ipc"
    taken = sorted({b._state()["runtime"].transport for b in _gpu_buffers if "runtime" in b._state()})
    check(f"transport ({asked}) is {want}", np.array(taken == [want]), np.array(True))
    log(rank, "transport:", taken)
elapsed = time.time() - t0
sys.exit(check.finish(elapsed, ranks=R, ranks_per_node=RANKS_PER_NODE, device=str(jax.devices()[0].device_kind)))
