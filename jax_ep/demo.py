"""``python -m jax_ep demo``: one MoE step (route → dispatch → expert SwiGLU → combine) on every device,
checked against the dense computation, with what moved and how long it took."""

from __future__ import annotations

import argparse
import time

import numpy as np


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m jax_ep demo", description=__doc__)
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=128, help="expert FFN width")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--layout", choices=("expert_major", "rank_major"), default="expert_major")
    p.add_argument("--backend", choices=("auto", "cuda", "reference"), default="auto")
    p.add_argument("--decode-tokens", type=int, default=32,
                   help="tokens per rank of the decode (low-latency mode) step; 0 skips it")
    p.add_argument("--iters", type=int, default=5, help="timed repetitions")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def info(argv=None):
    import jax

    from . import _cuda
    print(f"jax {jax.__version__}, devices: {jax.devices()}")
    err = _cuda.extension_error()
    print("CUDA extension:", "loaded" if err is None else f"unavailable ({err})")
    if err is None:
        print("build:", _cuda.build_info())


def main(argv=None):
    args = _parse(argv)
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P

    import jax_ep

    devices = jax.devices()
    R = len(devices)
    E = max(args.experts - args.experts % R, R)
    T, H, F, K = args.tokens, args.hidden, args.ffn, min(args.topk, E)
    mesh = Mesh(np.array(devices), ("ep",))
    buf = jax_ep.Buffer(mesh, num_experts=E, hidden=H, max_tokens_per_rank=T, num_topk=K,
                        backend=None if args.backend == "auto" else args.backend)
    E_loc = buf.num_local_experts
    print(f"jax_ep demo: {R} rank(s) on {devices[0].platform} ({devices[0].device_kind}), "
          f"E={E} experts ({E_loc}/rank), top-{K}, T={T} tokens/rank, H={H}, layout={args.layout}")

    rng = np.random.default_rng(args.seed)
    x = jnp.asarray(rng.standard_normal((R * T, H)), jnp.float32)
    router = jnp.asarray(rng.standard_normal((H, E)) / np.sqrt(H), jnp.float32)
    w_in = jnp.asarray(rng.standard_normal((E, H, 2 * F)) / np.sqrt(H), jnp.float32)
    w_out = jnp.asarray(rng.standard_normal((E, F, H)) / np.sqrt(F), jnp.float32)

    def route(x):
        probs = jax.nn.softmax(x @ router, axis=-1)
        weights, idx = jax.lax.top_k(probs, K)
        return idx.astype(jnp.int32), weights / jnp.sum(weights, -1, keepdims=True)

    def swiglu(rows, gate_up, down, group_sizes=None):
        if group_sizes is None:
            h = rows @ gate_up
        else:
            h = jax.lax.ragged_dot(rows, gate_up, group_sizes)
        g, u = jnp.split(h, 2, axis=-1)
        h = jax.nn.silu(g) * u
        return h @ down if group_sizes is None else jax.lax.ragged_dot(h, down, group_sizes)

    def moe_rank(x, w_in, w_out):
        idx, weights = route(x)
        out = jax_ep.dispatch(buf, x, idx, weights, layout=args.layout)
        if args.layout == "expert_major":
            y = swiglu(out.x, w_in, w_out, out.group_sizes)
            z = jax_ep.combine(buf, y, out.handle, topk_weights=out.topk_weights)
        else:  # rank-major: each row through its local experts, weighted here, unweighted combine
            y = jnp.zeros_like(out.x)
            for e in range(E_loc):
                w_e = jnp.sum(jnp.where(out.topk_idx == e, out.topk_weights, 0.0), axis=1, keepdims=True)
                y = y + w_e * swiglu(out.x, w_in[e], w_out[e])
            z = jax_ep.combine(buf, y, out.handle)
        stats = jnp.stack([out.num_recv, out.overflow])[None]
        return z, stats

    step = jax.jit(jax.shard_map(moe_rank, mesh=mesh, in_specs=(P("ep"), P("ep"), P("ep")),
                                 out_specs=(P("ep"), P("ep"))))

    def dense(x):
        idx, weights = route(x)
        per_expert = jax.vmap(lambda a, b: swiglu(x, a, b))(w_in, w_out)          # [E, N, H]
        picked = per_expert[idx, jnp.arange(x.shape[0])[:, None]]                 # [N, K, H]
        return jnp.einsum("nk,nkh->nh", weights, picked)

    t0 = time.perf_counter()
    z, stats = jax.block_until_ready(step(x, w_in, w_out))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(step(x, w_in, w_out))
        times.append(time.perf_counter() - t0)
    ref = jax.jit(dense)(x)
    stats = np.asarray(stats)
    err = float(jnp.linalg.norm(z - ref) / jnp.linalg.norm(ref))
    for r in range(R):
        print(f"  rank {r}: received {stats[r, 0]:6d} {'rows' if args.layout == 'expert_major' else 'tokens'}"
              f", overflow {stats[r, 1]}")
    print(f"moved {int(stats[:, 0].sum())} rows of {H} f32 in total; backend="
          f"{jax_ep._backend.resolve('dispatch', buf.backend, devices[0].platform)}")
    print(f"check vs dense MoE: relative error {err:.2e} ({'OK' if err < 1e-4 else 'MISMATCH'})")
    print(f"time: first call (compile) {compile_s:.2f} s, step median {1e3 * np.median(times):.2f} ms "
          f"over {args.iters} runs")
    if err >= 1e-4:
        raise SystemExit("jax_ep demo: result does not match the dense MoE")
    result = dict(error=err, step_ms=1e3 * float(np.median(times)), ranks=R)
    if args.decode_tokens > 0:
        result["decode_error"] = _decode_step(args, mesh, x, route, swiglu, dense, w_in, w_out, E, K)
    return result


def _decode_step(args, mesh, x, route, swiglu, dense, w_in, w_out, E, K):
    """Decode: low_latency_dispatch (bf16) -> every local expert on its fixed [R*T, H] buffer (rows past
    its count masked) -> low_latency_combine; checked against the dense MoE on the same tokens."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import jax_ep
    R = mesh.shape["ep"]
    T, H = min(args.decode_tokens, args.tokens), x.shape[1]
    xs = x.reshape(R, -1, H)[:, :T].reshape(R * T, H).astype(jnp.bfloat16)
    buf = jax_ep.Buffer(mesh, num_experts=E, hidden=H, max_tokens_per_rank=T, num_topk=K, low_latency=True,
                        backend=None if args.backend == "auto" else args.backend)

    def decode_rank(x, w_in, w_out):
        idx, weights = route(x.astype(jnp.float32))
        out = jax_ep.low_latency_dispatch(buf, x, idx, use_fp8=False)
        y = jax.vmap(swiglu)(out.x.astype(jnp.float32), w_in, w_out)             # [E_loc, R*T, H]
        valid = jnp.arange(y.shape[1])[None, :] < out.count[:, None]
        y = jnp.where(valid[:, :, None], y, 0.0).astype(jnp.bfloat16)
        return jax_ep.low_latency_combine(buf, y, idx, weights, out.handle)

    step = jax.jit(jax.shard_map(decode_rank, mesh=mesh, in_specs=(P("ep"), P("ep"), P("ep")), out_specs=P("ep")))
    z = step(xs, w_in, w_out).astype(jnp.float32)
    ref = jax.jit(dense)(xs.astype(jnp.float32))
    err = float(jnp.linalg.norm(z - ref) / jnp.linalg.norm(ref))
    backend = jax_ep._backend.resolve("low_latency_dispatch", buf.backend, mesh.devices.flat[0].platform)
    print(f"decode step (low-latency mode, {T} tokens/rank, bf16, backend={backend}): relative error vs dense "
          f"{err:.2e} ({'OK' if err < 2e-2 else 'MISMATCH'})")
    buf.close()
    if err >= 2e-2:
        raise SystemExit("jax_ep demo: the decode step does not match the dense MoE")
    return err
