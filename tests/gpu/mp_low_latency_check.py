"""Multi-rank check of the CUDA low-latency mode against the reference backend (run through
``python -m jax_ep.launch --nproc R``; tests/test_gpu_low_latency.py drives it). Exits non-zero on any
mismatch; rank 0 writes a JSON summary to $JAX_EP_RESULT if set.

Compared exactly: count, layout_range, src_info (padding -1 included), every valid payload row (fp8 bytes
and scales, or bf16). Rows past count are unspecified on the cuda backend and not compared. Combine is
compared to f32-accumulation tolerance (same k order; one bf16 rounding at the end).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.gpu.harness import Checks, global_array, local_rows, routing, setup  # noqa: E402

rank, R, gpu_mesh, cpu_mesh = setup()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402

GPU_BACKEND = "reference" if os.environ.get("JAX_EP_DRYRUN") else "cuda"
check = Checks(rank)


def buffer(mesh, backend, T_max, H, K, E):
    return jax_ep.Buffer(mesh, num_experts=E, hidden=H, max_tokens_per_rank=T_max, num_topk=K, low_latency=True,
                         backend=backend)


_transports = set()   # the transport of every GPU Buffer (noted, not kept: a live Buffer holds heap memory)


def run(mesh, backend, fn, arrays, n_out, dims):
    buf = buffer(mesh, backend, *dims)
    f = jax.jit(jax.shard_map(lambda *a: fn(buf, *a), mesh=mesh, in_specs=(P("ep"),) * len(arrays),
                              out_specs=(P("ep"),) * n_out))
    if mesh is gpu_mesh:
        outs = [local_rows(o) for o in f(*[global_array(mesh, a) for a in arrays])]
        if "runtime" in buf._state():
            _transports.add(buf._state()["runtime"].transport)
        return outs, f
    outs = f(*arrays)
    return [np.asarray(o).reshape((R, -1) + o.shape[1:])[rank] for o in outs], f


def expert_outputs(out, use_fp8):
    """A deterministic stand-in for the experts: rows scaled by (local expert + 1) / 4 (exact in bf16)."""
    x = (jax_ep.per_token_cast_back(out.x, out.x_scales, out_dtype=jnp.float32) if use_fp8
         else out.x.astype(jnp.float32))
    factor = (jnp.arange(x.shape[0], dtype=jnp.float32) + 1.0) / 4.0
    return (x * factor[:, None, None]).astype(jnp.bfloat16)


def as_bytes(a):
    return jax.lax.bitcast_convert_type(a, jnp.uint8) if a.dtype.itemsize == 1 else a


def compare_dispatch(name, got, want, use_fp8):
    """got / want: [x, scales, count, layout_range, src_info]; payload rows compared where valid."""
    count = want[2].reshape(-1)
    check(f"{name}: count", got[2], want[2])
    check(f"{name}: layout_range", got[3], want[3])
    check(f"{name}: src_info", got[4], want[4])
    valid = np.arange(got[0].shape[1])[None, :] < count[:, None]          # [E_loc, S]
    check(f"{name}: x (valid rows)", got[0][valid], want[0][valid])
    if use_fp8:
        check(f"{name}: scales (valid rows)", got[1][valid], want[1][valid])


def case(T_max, H, K, E, use_fp8=True, round_scale=False, use_ue8m0=False, T=None, invalid=False,
         duplicates=False, seed=0):
    T = T or T_max
    rng = np.random.default_rng(seed)
    idx, w = routing(rng, R, T, K, E, invalid=invalid, duplicates=duplicates)
    x = rng.standard_normal((R * T, H)).astype(np.float32)
    name = f"R{R} T{T}/{T_max} H{H} K{K} E{E} fp8={use_fp8} round={round_scale} ue8m0={use_ue8m0} inv={invalid} dup={duplicates}"

    def fn(buf, x, idx, w):
        out = jax_ep.low_latency_dispatch(buf, x.astype(jnp.bfloat16), idx, use_fp8=use_fp8, round_scale=round_scale,
                                          use_ue8m0=use_ue8m0)
        scales = out.x_scales if use_fp8 else jnp.zeros((1, 1, 1), jnp.float32)
        y = expert_outputs(out, use_fp8) if not use_ue8m0 else out.x.astype(jnp.bfloat16)  # fp8 -> bf16 is exact
        comb = jax_ep.low_latency_combine(buf, y, idx, w, out.handle)
        return (as_bytes(out.x), as_bytes(scales) if use_fp8 else scales, out.count[None],
                out.handle.layout_range[None], out.handle.src_info[None], comb)
    got, _ = run(gpu_mesh, GPU_BACKEND, fn, (x, idx, w), 6, (T_max, H, K, E))
    want, _ = run(cpu_mesh, "reference", fn, (x, idx, w), 6, (T_max, H, K, E))
    got[2:5] = [g[0] for g in got[2:5]]
    want[2:5] = [g[0] for g in want[2:5]]
    compare_dispatch(f"dispatch {name}", got, want, use_fp8)
    check(f"combine {name}", got[5].astype(np.float32), want[5].astype(np.float32), exact=False, rtol=1e-2,
          atol=1e-2)


def case_two_in_flight_and_overlap(T_max=64, H=512, K=4, E=None, seed=3):
    """send(a), send(b), an independent matmul, recv(a), recv(b); then the same for combine: results equal
    the one-at-a-time reference (double buffering), and the matmul between send and recv is unaffected."""
    E = E or 4 * R
    rng = np.random.default_rng(seed)
    idx_a, w_a = routing(rng, R, T_max, K, E)
    idx_b, w_b = routing(rng, R, T_max, K, E)
    xa = rng.standard_normal((R * T_max, H)).astype(np.float32)
    xb = rng.standard_normal((R * T_max, H)).astype(np.float32)
    m = rng.standard_normal((R * 64, 256)).astype(np.float32)

    def fn(buf, xa, ia, wa, xb, ib, wb, m):
        pa = jax_ep.low_latency_dispatch_send(buf, xa.astype(jnp.bfloat16), ia)
        pb = jax_ep.low_latency_dispatch_send(buf, xb.astype(jnp.bfloat16), ib)
        mm = jnp.dot(m, m.T, precision=jax.lax.Precision.HIGHEST)   # independent work between send and recv
        oa = jax_ep.low_latency_dispatch_recv(buf, pa)
        ob = jax_ep.low_latency_dispatch_recv(buf, pb)
        ca = jax_ep.low_latency_combine_send(buf, expert_outputs(oa, True), oa.handle)
        cb = jax_ep.low_latency_combine_send(buf, expert_outputs(ob, True), ob.handle)
        ya = jax_ep.low_latency_combine_recv(buf, ca, ia, wa)
        yb = jax_ep.low_latency_combine_recv(buf, cb, ib, wb)
        return (as_bytes(oa.x), oa.count[None], as_bytes(ob.x), ob.count[None], ya, yb, mm)

    def one_at_a_time(buf, xa, ia, wa, xb, ib, wb, m):
        outs = []
        for x, i, w in ((xa, ia, wa), (xb, ib, wb)):
            o = jax_ep.low_latency_dispatch(buf, x.astype(jnp.bfloat16), i)
            outs.append((o, jax_ep.low_latency_combine(buf, expert_outputs(o, True), i, w, o.handle)))
        (oa, ya), (ob, yb) = outs
        return (as_bytes(oa.x), oa.count[None], as_bytes(ob.x), ob.count[None], ya, yb,
                jnp.dot(m, m.T, precision=jax.lax.Precision.HIGHEST))
    arrays = (xa, idx_a, w_a, xb, idx_b, w_b, m)
    got, _ = run(gpu_mesh, GPU_BACKEND, fn, arrays, 7, (T_max, H, K, E))
    want, _ = run(cpu_mesh, "reference", one_at_a_time, arrays, 7, (T_max, H, K, E))
    for tag, xi, ci in (("a", 0, 1), ("b", 2, 3)):
        count = want[ci][0]
        check(f"two in flight {tag}: count", got[ci], want[ci])
        valid = np.arange(got[xi].shape[1])[None, :] < count[:, None]
        check(f"two in flight {tag}: x (valid rows)", got[xi][valid], want[xi][valid])
    check("two in flight a: combine", got[4].astype(np.float32), want[4].astype(np.float32), exact=False,
          rtol=1e-2, atol=1e-2)
    check("two in flight b: combine", got[5].astype(np.float32), want[5].astype(np.float32), exact=False,
          rtol=1e-2, atol=1e-2)
    check("matmul between send and recv", got[6], want[6], exact=False, rtol=1e-4, atol=1e-3)


def case_independent_ops(rounds=6, T_max=32, H=256, K=4, E=None, seed=13):
    """Independent dispatch + combine pairs traced straight-line into one jit: XLA orders custom calls only by
    data, so it is free to start every dispatch before any combine. Each op must still complete on its own
    (its send and receive stay together): results equal the reference, and no call reports too many in flight."""
    E = E or 4 * R
    rng = np.random.default_rng(seed)
    idx, w = routing(rng, R, T_max, K, E)
    x = rng.standard_normal((R * T_max, H)).astype(np.float32)

    def fn(buf, x, idx, w):
        outs = []
        for r in range(rounds):
            xr = (x * (r + 1)).astype(jnp.bfloat16)   # independent of every other round
            o = jax_ep.low_latency_dispatch(buf, xr, idx)
            outs.append(jax_ep.low_latency_combine(buf, expert_outputs(o, True), idx, w, o.handle))
        return (jnp.stack(outs),)
    got, _ = run(gpu_mesh, GPU_BACKEND, fn, (x, idx, w), 1, (T_max, H, K, E))
    want, _ = run(cpu_mesh, "reference", fn, (x, idx, w), 1, (T_max, H, K, E))
    check(f"{rounds} independent dispatch + combine in one jit", got[0].astype(np.float32),
          want[0].astype(np.float32), exact=False, rtol=1e-2, atol=1e-2)


def case_stats_and_determinism(T_max=128, H=1024, K=8, E=None, repeats=20):
    E = E or 8 * R
    rng = np.random.default_rng(11)
    idx, w = routing(rng, R, T_max, K, E)
    x = rng.standard_normal((R * T_max, H)).astype(np.float32)
    stats0 = np.tile(np.arange(E // R, dtype=np.int32), R)

    def fn(buf, x, idx, w, stats):
        out = jax_ep.low_latency_dispatch(buf, x.astype(jnp.bfloat16), idx, cumulative_stats=stats)
        y = expert_outputs(out, True)
        valid = jnp.arange(out.x.shape[1])[None, :] < out.count[:, None]
        xb = jnp.where(valid[..., None], as_bytes(out.x), 0)   # the hash covers the defined rows only
        return xb, out.cumulative_stats, jax_ep.low_latency_combine(buf, y, idx, w, out.handle)
    got, f = run(gpu_mesh, GPU_BACKEND, fn, (x, idx, w, stats0), 3, (T_max, H, K, E))
    want, _ = run(cpu_mesh, "reference", fn, (x, idx, w, stats0), 3, (T_max, H, K, E))
    check("cumulative_stats", got[1], want[1])
    args = [global_array(gpu_mesh, a) for a in (x, idx, w, stats0)]
    digests = set()
    for _ in range(repeats):
        h = hashlib.sha256()
        for o in f(*args):
            h.update(local_rows(o).tobytes())
        digests.add(h.hexdigest())
    check(f"determinism over {repeats} repeats", np.array(len(digests)), np.array(1))


t0 = time.time()
case(T_max=128, H=7168, K=8, E=32 * R)                                    # DeepSeek-like row, fp8
case(T_max=128, H=7168, K=8, E=32 * R, use_fp8=False)                     # bf16
case(T_max=96, H=1024, K=8, E=8 * R, T=61, invalid=True, duplicates=True)   # T < T_max, bad ids, repeated ids
case(T_max=64, H=2048, K=6, E=6 * R, round_scale=True, seed=5)
case(T_max=64, H=640, K=4, E=4 * R, use_ue8m0=True, seed=6)              # 5 groups: a padded UE8M0 word
case(T_max=32, H=256, K=16, E=max(16, 4 * R), use_fp8=False, seed=7)
case_two_in_flight_and_overlap()
case_independent_ops()
case_stats_and_determinism()
if GPU_BACKEND == "cuda":
    # The transport each Buffer took (one GPU per process, the mesh over every process): auto takes NVSHMEM,
    # JAX_EP_TRANSPORT=ipc keeps CUDA IPC -- whose same-GPU reads (a source's own staging, read by the owners on its
    # GPU) are only exercised by a run that asked for it.
    asked = os.environ.get("JAX_EP_TRANSPORT", "auto")
    want = "ipc" if asked == "ipc" else "nvshmem"
    taken = sorted(_transports)
    check(f"transport ({asked}) is {want}", np.array(taken == [want]), np.array(True))
sys.exit(check.finish(time.time() - t0, ranks=R, device=str(jax.devices()[0].device_kind)))
