"""Normal-mode dispatch / combine benchmark in the multi-process harness (one rank per process):
``python -m jax_ep.launch --nproc 8 -- python benchmarks/bench_normal.py --hbm-bytes-per-s B``.

Times (per rank, max over ranks reported):
- op: the kernel-side time of one op: median wall time of one jitted call that runs the op 3 x ``--loop``
  times back to back (fori_loop), minus that of a call running it ``--loop`` times, over 2 x ``--loop``. What
  a call costs once (launch, host dispatch, the processes starting the call at different moments: the first
  op waits for the last process) cancels out; ``op_loop_s`` keeps the plain per-op time of the short call;
- jit: median wall time of one jitted call of a single op, blocking on each call (latency);
- jit_pipelined: per call, of back-to-back jitted calls dispatched without blocking (what a loop pays), from
  runs of 3n and n calls as for op (``jit_pipelined_plain_s``: the n-call run divided by n;
  ``jit_host_issue_s``: the host's dispatch time per call in the 3n run -- near jit_pipelined, the host sets the pace).
Bandwidth follows DeepEP: bytes of the received tokens (fp8 counted with its scales) / time, summed over
ranks; combine counts the same rows in bf16. Rank 0 prints a JSON line and writes it to --out.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.gpu.harness import (bench_arguments, emit_result, exchange, gather, global_array,  # noqa: E402
                               kernel_profile, log, physical_gpus, setup, timed,
                               timed_pipelined_steady, visible_sms)

p = bench_arguments(tokens=4096, loop=10)
p.add_argument("--peer-bytes-per-s", type=float, default=0.0,
               help="per-GPU NVLink rate (benchmarks/peer_copy.py's sm_push_all_to_all) for runs over several GPUs")
p.add_argument("--num-sms", default="0",
               help="comma-separated grid budgets (Buffer.num_sms, blocks) to sweep "
                    "(0 = the default, four per visible SM)")
p.add_argument("--ranks-per-node", type=int, default=0,
               help="internode mode with R / N (virtual) nodes; routing limited to --topk-groups nodes per token")
p.add_argument("--topk-groups", type=int, default=4, help="nodes a token may use in internode mode (DeepSeek-V3)")
p.add_argument("--profile", action="store_true",
               help="also trace one timed loop per op and report GPU time per kernel, every rank (JAX profiler)")
args = p.parse_args()

rank, R, mesh, _ = setup()
G = physical_gpus(rank, R)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402

T, H, K, E = args.tokens, args.hidden, args.topk, args.experts
rng = np.random.default_rng(0)
scores = np.abs(rng.standard_normal((R * T, E))) + 1.0           # DeepEP's benchmark routing
N = args.ranks_per_node or R
NODES = R // N
if NODES > 1:  # DeepEP's internode benchmark: experts from the top `topk_groups` nodes of each token only
    by_node = scores.reshape(R * T, NODES, E // NODES).max(axis=2)
    keep = np.argsort(-by_node, axis=1)[:, :min(args.topk_groups, NODES)]
    allowed = np.zeros((R * T, NODES), bool)
    np.put_along_axis(allowed, keep, True, axis=1)
    scores = np.where(np.repeat(allowed, E // NODES, axis=1), scores, 0.0)
idx = np.argsort(-scores, axis=1)[:, :K].astype(np.int32)
w = rng.random((R * T, K)).astype(np.float32)
x = rng.standard_normal((R * T, H)).astype(np.float32)
def bench(num_sms, with_fp8):
    tag = f"sms{num_sms}_"
    results = {}
    buf = jax_ep.Buffer(mesh, num_experts=E, hidden=H, max_tokens_per_rank=T, num_topk=K, backend="reference" if os.environ.get("JAX_EP_DRYRUN") else "cuda",
                        num_sms=num_sms or None, ranks_per_node=N)
    gx, gi, gw = (global_array(mesh, a) for a in (x.astype(jnp.bfloat16), idx, w))


    def smap(fn, n_in):
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("ep"),) * n_in, out_specs=P("ep")))


    def payload(x, fp8):
        return jax_ep.per_token_cast_to_fp8(x) if fp8 else x


    def timed_(f, *a):
        return timed(f, *a, repeats=args.repeats)

    def steady_op(t_long, t_short, n, fallback=None):
        """Per-op time from calls of 3n and n ops; the short call's per-op time when timing noise (CPU
        rehearsals) makes the difference meaningless."""
        diff = (t_long - t_short) / (2 * n)
        return diff if diff > 0 else (fallback if fallback is not None else t_short / n)

    def gather_max(name, value):
        return gather(name, value, rank, R)

    def profile(name, f, *a):
        """Every rank's kernel times for one loop call, through the key-value store (rank 0 reports them)."""
        if not args.profile:
            return None
        mine = json.dumps(kernel_profile(f, *a, ops=args.loop))
        return [json.loads(t) for t in exchange(f"{tag}{name}/profile", mine, rank, R)]

    for fp8 in ((False, True) if with_fp8 else (False,)):
        name = "dispatch_fp8" if fp8 else "dispatch_bf16"
        pre = smap(lambda x: jax.tree.map(lambda a: a, payload(x, fp8)), 1)(gx)  # cast outside the timed op

        def one(x, i, w):
            return jax_ep.dispatch(buf, x, i, w).num_recv[None]

        def loop_of(n):
            def loop(x, i, w):
                def body(_, acc):
                    return acc + jax_ep.dispatch(buf, x, i, w).num_recv
                return jax.lax.fori_loop(0, n, body, i[0, 0] * 0)[None]
            return loop
        loop = loop_of(args.loop)

        n_recv = np.asarray(smap(one, 3)(pre, gi, gw).addressable_shards[0].data)[0]
        t_short = timed_(smap(loop, 3), pre, gi, gw)
        t_op = steady_op(timed_(smap(loop_of(3 * args.loop), 3), pre, gi, gw), t_short, args.loop)
        t_jit = timed_(smap(one, 3), pre, gi, gw)
        t_pipe, t_pipe_plain, t_issue = timed_pipelined_steady(smap(one, 3), pre, gi, gw, calls=args.repeats)
        row_bytes = H + 4 * (H // 128) if fp8 else 2 * H
        results[name] = dict(recv_tokens_this_rank=int(n_recv), op_s=gather_max(f"{tag}{name}_op", t_op),
                             op_loop_s=gather_max(f"{tag}{name}_op_loop", t_short / args.loop),
                             jit_s=gather_max(f"{tag}{name}_jit", t_jit),
                             jit_pipelined_s=gather_max(f"{tag}{name}_pipe", t_pipe),
                             jit_pipelined_plain_s=gather_max(f"{tag}{name}_pipe_plain", t_pipe_plain),
                             jit_host_issue_s=gather_max(f"{tag}{name}_issue", t_issue),
                             row_bytes=row_bytes)
        results[name]["recv_tokens_all_ranks"] = int(gather(f"{tag}{name}/rows", int(n_recv), rank, R, reduce=sum))
        if args.profile:
            results[name]["kernels_per_rank"] = profile(name, smap(loop, 3), pre, gi, gw)

    # Combine of bf16 rows along the bf16 dispatch's handle (the dispatch's own time is subtracted).
    # Through-jit calls return one row of the combined output, as the dispatch calls return num_recv: the
    # back-to-back runs keep every call's result alive, and 60 fresh [T, H] outputs per rank made the allocator
    # grow the pool (cudaMalloc, which waits for the device) inside the host's issue loop.
    def comb_one(x, i, w):
        out = jax_ep.dispatch(buf, x, i, w)
        return jax_ep.combine(buf, out.x, out.handle)[:1]


    def comb_loop_of(n):
        def comb_loop(x, i, w):
            out = jax_ep.dispatch(buf, x, i, w)

            def body(_, acc):
                return acc + jax_ep.combine(buf, out.x, out.handle)[0, 0].astype(jnp.float32)
            return jax.lax.fori_loop(0, n, body, w[0, 0] * 0)[None]
        return comb_loop
    comb_loop = comb_loop_of(args.loop)


    t_disp_jit = results["dispatch_bf16"]["jit_s"]
    t_comb_loop = timed_(smap(comb_loop, 3), gx, gi, gw)
    # Both loops hold one dispatch: the difference is 2 x loop combines.
    t_comb_op_loop = (t_comb_loop - results["dispatch_bf16"]["op_loop_s"]) / args.loop
    t_comb_op = steady_op(timed_(smap(comb_loop_of(3 * args.loop), 3), gx, gi, gw), t_comb_loop, args.loop,
                          fallback=t_comb_op_loop)
    t_comb_jit = timed_(smap(comb_one, 3), gx, gi, gw) - t_disp_jit
    # Through jit, back-to-back calls of combine alone (host dispatch overlapped, what a training loop pays), on
    # one dispatch's rows and handle passed in as arguments; and, as before, a dispatch + combine call minus
    # the dispatch's own through-jit time.
    rows, handle = smap(lambda x, i, w: (lambda o: (o.x, o.handle))(jax_ep.dispatch(buf, x, i, w)), 3)(gx, gi, gw)
    comb_only = smap(lambda y, h: jax_ep.combine(buf, y, h)[:1], 2)
    t_comb_pipe, _, t_comb_issue = timed_pipelined_steady(comb_only, rows, handle, calls=args.repeats)
    t_comb_pipe_pair = timed_pipelined_steady(smap(comb_one, 3), gx, gi, gw, calls=args.repeats)[0] - \
        results["dispatch_bf16"]["jit_pipelined_s"]
    del rows, handle
    results["combine_bf16"] = dict(op_s=gather_max(f"{tag}combine_op", t_comb_op),
                                   op_loop_s=gather_max(f"{tag}combine_op_loop", t_comb_op_loop),
                                   jit_s=gather_max(f"{tag}combine_jit", t_comb_jit),
                                   jit_pipelined_s=gather_max(f"{tag}combine_pipe", t_comb_pipe),
                                   jit_host_issue_s=gather_max(f"{tag}combine_issue", t_comb_issue),
                                   jit_pipelined_pair_minus_dispatch_s=gather_max(f"{tag}combine_pipe_pair",
                                                                                  t_comb_pipe_pair),
                                   row_bytes=2 * H, recv_tokens_all_ranks=results["dispatch_bf16"]["recv_tokens_all_ranks"])
    if args.profile:  # the loop's one dispatch shows up as its own kernels
        results["combine_bf16"]["kernels_per_rank"] = profile("combine", smap(comb_loop, 3), gx, gi, gw)

    return results


sweep = {}
for i, n in enumerate(int(v) for v in args.num_sms.split(",")):
    sweep[n] = bench(n, with_fp8=(i == 0))
results = sweep[int(args.num_sms.split(",")[0])]

B, PEER = args.hbm_bytes_per_s, args.peer_bytes_per_s
for name, r in results.items():
    nbytes = r["recv_tokens_all_ranks"] * r["row_bytes"]
    r["bytes"] = nbytes
    r["GBps_op"] = nbytes / r["op_s"] / 1e9
    r["GBps_op_loop"] = nbytes / r["op_loop_s"] / 1e9
    r["GBps_jit"] = nbytes / r["jit_s"] / 1e9
    if "jit_pipelined_s" in r:
        r["GBps_jit_pipelined"] = nbytes / r["jit_pipelined_s"] / 1e9
    if B:  # every GPU's HBM is a ceiling of its own
        ceiling = G * (B / 3 if name.startswith("combine") else B / 4)
        r["ceiling_GBps"] = ceiling / 1e9
        r["ratio_to_ceiling_op"] = r["GBps_op"] * 1e9 / ceiling
    if G > 1:  # DeepEP's NVL convention: received bytes per GPU per second (its own rows included)
        r["GBps_op_per_gpu"] = r["GBps_op"] / G
        if PEER:
            r["ratio_to_peer_op"] = r["GBps_op_per_gpu"] * 1e9 / PEER
if rank == 0:
    for n, res in sweep.items():
        for name, r in res.items():
            if "GBps_op" not in r:
                r["GBps_op"] = r["recv_tokens_all_ranks"] * r["row_bytes"] / r["op_s"] / 1e9
    if NODES > 1:  # DeepEP's internode conventions: network ("RDMA") and NVLink ("NVL") bytes per rank
        owner_node = idx // (E // R) // N
        crossings = sum(int(np.sum(np.any(owner_node[s * T:(s + 1) * T] == m, axis=1)))
                        for s in range(R) for m in range(NODES) if m != s // N)
        for name, r in results.items():
            r["network_bytes_per_rank"] = crossings / R * r["row_bytes"]
            r["GBps_network_per_rank"] = r["network_bytes_per_rank"] / r["op_s"] / 1e9
            r["GBps_nvl_per_rank"] = r["GBps_op"] / R
    summary = dict(config=dict(ranks=R, physical_gpus=G, tokens=T, hidden=H, topk=K, experts=E, loop=args.loop,
                               ranks_per_node=N, nodes=NODES, topk_groups=min(args.topk_groups, NODES),
                               sms_visible=visible_sms()),   # rank 0's view (does MPS show the share?)
                   peer_bytes_per_s=PEER or None,
                   sms_sweep={str(n): {k: round(v["GBps_op"], 1) for k, v in res.items()} for n, res in sweep.items()},
                   hbm_copy_bytes_per_s=B, device=jax.devices()[0].device_kind, results=results)
    emit_result(rank, summary, args.out)
log(rank, "done")
