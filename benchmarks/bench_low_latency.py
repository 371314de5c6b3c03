"""Low-latency (decode) dispatch / combine benchmark, one rank per process:
``python -m jax_ep.launch --nproc 8 -- python benchmarks/bench_low_latency.py --hbm-bytes-per-s B``.

Per rank, worst rank reported (max over ranks):
- kernel: device-side time of each kernel (first block's start to last block's end, from the runtime's
  timeline) in dispatch + combine rounds traced straight-line into one jitted function (as the MoE layers of
  one decode step are), so every process queues them back to back: the median over ``--repeats`` calls of
  ``--loop`` rounds, each call's first round left out -- it waits until the last process has started the
  call -- per rank, max over ranks (``kernel_p90_s``: 90th percentiles). Per-launch means next to it:
  ``kernel_steady_mean_s`` ((sums over calls of 3 x ``--loop`` rounds - sums over ``--loop`` rounds) / the
  extra launches) and ``kernel_plain_s`` (the short calls' average, first rounds included). The receive
  kernels include waiting for the slowest sender: that is the op's latency (``*_recv_wait``: from the receive
  kernel's start until the last of its blocks had every signal it waits for).
  ``last_call_timeline_us``: every rank's kernels in the last short call, on the GPU's clock.
- kernel (fori_loop): the same rounds in a ``jax.lax.fori_loop``: between iterations each process's device
  loop may return to its host, and the processes drift apart by whatever their hosts take.
- jit: median wall time of one jitted call of one op, blocking on each (latency, host dispatch included);
- jit_pipelined: per call, of back-to-back calls dispatched without blocking (host dispatch overlapped).
- overlap: send, an independent matmul, recv -- against send, recv, matmul (same work, serial).
- hooked: the straight-line rounds with a GEMM between each send and its receive (DeepEP's low-latency test times
  its kernels so, with return_recv_hook): per-kernel medians (``hooked_kernel_s``) and the last call's timeline.
- one sender (R=2): the straight-line rounds with a routing in which only rank 1 has combine answers to send, as
  many as a rank sends in the standard routing: its send while the other rank waits instead of copying through the
  shared HBM (``one_sender_kernel_s``, per rank).
Bytes follow DeepEP's low-latency convention: per valid (token, expert) selection, H + H/128*4 + 16 bytes
(fp8 dispatch) or 2H (bf16 combine). The HBM floor is what the kernels must read and write, summed over
ranks (listed in ``floor_bytes``), over the HBM copy bandwidth B measured in the same run.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.gpu.harness import (bench_arguments, emit_result, exchange, gather, global_array, log,  # noqa: E402
                               physical_gpus, round_statistics, setup, timed, timed_pipelined, visible_sms)

p = bench_arguments(tokens=128, loop=20)
p.add_argument("--num-sms", type=int, default=0,
               help="the kernels' grid budget (Buffer.num_sms, blocks; 0 = the default, four per visible SM): "
                    "holds the grids while JAX_EP_MPS_SM_PERCENT changes the SMs a rank may use")
args = p.parse_args()

rank, R, mesh, _ = setup()
G = physical_gpus(rank, R)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402
from jax_ep.cuda_backend import runtime  # noqa: E402

DRY = bool(os.environ.get("JAX_EP_DRYRUN"))
T, H, K, E = args.tokens, args.hidden, args.topk, args.experts
E_loc, S = E // R, R * T
rng = np.random.default_rng(0)
scores = np.abs(rng.standard_normal((R * T, E))) + 1.0
idx = np.argsort(-scores, axis=1)[:, :K].astype(np.int32)
idx[rng.random(idx.shape) < 0.02] = -1          # a few masked selections, as DeepEP's test does
w = rng.random((R * T, K)).astype(np.float32)
x = rng.standard_normal((R * T, H)).astype(np.float32)
buf = jax_ep.Buffer(mesh, num_experts=E, hidden=H, max_tokens_per_rank=T, num_topk=K, low_latency=True,
                    backend="reference" if DRY else "cuda", num_sms=args.num_sms or None)
gx, gi, gw = (global_array(mesh, a) for a in (x.astype(jnp.bfloat16), idx, w))
gy = global_array(mesh, np.zeros((R * E_loc, S, H), jnp.bfloat16))   # expert outputs (values do not matter)
mm_n = 256 if DRY else 2048   # a rank's GEMM at R=2 on an H200: ~50 us between send and receive in the hooked rounds
gm = global_array(mesh, rng.standard_normal((R * mm_n, mm_n)).astype(np.float32).astype(jnp.bfloat16))


def one_sender_ids():
    """R=2 routing in which only rank 1 has answers to send back: rank 0's tokens pick K/2 experts of rank 1 and K/2 of
    its own, rank 1's tokens only its own. Rank 1's combine send then moves as many rows as a rank's does in the
    standard routing (T x K/2, the same share masked), while rank 0's send has none and its receive waits: the send
    with no other rank copying through the shared HBM."""
    g = np.random.default_rng(1)
    pick = lambda owner, n: owner * E_loc + g.choice(E_loc, n, replace=False)
    ids = np.stack([g.permutation(np.concatenate([pick(1, K - K // 2), pick(0, K // 2)])) for _ in range(T)] +
                   [pick(1, K) for _ in range(T)]).astype(np.int32)
    ids[g.random(ids.shape) < 0.02] = -1
    return ids


def smap(fn, n_in):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("ep"),) * n_in, out_specs=P("ep")))


def round_body(x, i, w, y, acc):
    out = jax_ep.low_latency_dispatch(buf, x, i)
    z = jax_ep.low_latency_combine(buf, y, i, w, out.handle)
    return acc + out.count[0] + z[0, 0].astype(jnp.int32)


def rounds(x, i, w, y):   # a device loop: XLA may return to the host between iterations
    return jax.lax.fori_loop(0, args.loop, lambda _, acc: round_body(x, i, w, y, acc), i[0, 0] * 0)[None]


def rounds_unrolled_of(n):
    def rounds_unrolled(x, i, w, y):   # straight-line ops, as in one decode step of a model: queued back to back
        acc = i[0, 0] * 0
        for _ in range(n):
            acc = round_body(x, i, w, y, acc)
        return acc[None]
    return rounds_unrolled


def dispatch_once(x, i):
    out = jax_ep.low_latency_dispatch(buf, x, i)
    return out.count


def combine_once(x, i, w, y):   # dispatch outside the timed op would need its handle carried: time both, subtract
    out = jax_ep.low_latency_dispatch(buf, x, i)
    return jax_ep.low_latency_combine(buf, y, i, w, out.handle)[:1]


def between(pending, fn, operand):
    """``fn(operand)`` placed between a send and its receive: the barriers make the operand wait for the send and the
    receive wait for the result (XLA orders custom calls only by data)."""
    pending, operand = jax.lax.optimization_barrier((pending, operand))
    result = fn(operand)
    pending, result = jax.lax.optimization_barrier((pending, result))
    return pending, result


def hooked_rounds_of(n):
    def hooked_rounds(x, i, w, y, m):   # DeepEP's protocol (return_recv_hook): send, a GEMM, then the receive
        acc = i[0, 0] * 0
        for _ in range(n):
            pend, mm = between(jax_ep.low_latency_dispatch_send(buf, x, i), lambda a: jnp.dot(a, a), m)
            out = jax_ep.low_latency_dispatch_recv(buf, pend)
            pend, mm2 = between(jax_ep.low_latency_combine_send(buf, y, out.handle), lambda a: jnp.dot(a, a), m)
            z = jax_ep.low_latency_combine_recv(buf, pend, i, w)
            acc = acc + out.count[0] + z[0, 0].astype(jnp.int32) + (mm[0, 0] + mm2[0, 0]).astype(jnp.int32)
            # The next round's sends after this round's receives: split phases are ordered by data only, and a
            # third send ahead of its receives fails the call.
            x, i, acc = jax.lax.optimization_barrier((x, i, acc))
        return acc[None]
    return hooked_rounds


def overlapped(x, i, m):
    pend = jax_ep.low_latency_dispatch_send(buf, x, i)
    mm = jnp.dot(m, m)
    out = jax_ep.low_latency_dispatch_recv(buf, pend)
    return out.count + mm[0, 0].astype(jnp.int32)


def serial(x, i, m):
    out = jax_ep.low_latency_dispatch(buf, x, i)
    mm = jnp.dot(m, out.count[0].astype(m.dtype) * 0 + m)   # data-dependent: runs after the receive
    return out.count + mm[0, 0].astype(jnp.int32)


def matmul_only(m):
    return jnp.dot(m, m)[:1, :E_loc].astype(jnp.int32)[0]


results = {}


def local_kernel_times(fn, rounds_per_call=0, inputs=None):
    """This rank's device-side seconds per launch of each kernel over ``repeats`` calls of ``fn`` (on ``inputs``,
    by default x, ids, weights, y), and, when ``rounds_per_call`` is given, every call's timeline of its rounds
    ({kernel: [(start, last block start, mid, end), ...]} per call, read after each call)."""
    inputs = inputs or (gx, gi, gw, gy)
    f = smap(fn, len(inputs))
    jax.block_until_ready(f(*inputs))
    rt = runtime.ensure(buf)
    rt.low_latency_kernel_times(reset=True)
    calls = []
    for _ in range(args.repeats):
        jax.block_until_ready(f(*inputs))
        if rounds_per_call:
            calls.append({k: ops[-rounds_per_call:] for k, ops in rt.low_latency_timeline().items()})
    return rt.low_latency_kernel_times(), calls


def kernel_times(fn, tag):
    """Device-side seconds per launch of each kernel (max over ranks) over ``repeats`` calls of ``fn``."""
    if DRY:
        jax.block_until_ready(smap(fn, 4)(gx, gi, gw, gy))
        return None
    return {name: gather(f"k{tag}_{name}", sec, rank, R) for name, sec in local_kernel_times(fn)[0].items()}


def timeline_of_last_call(n, key="ll_timeline"):
    """Every rank's kernels in the last call's ``n`` rounds: per rank, per round, {kernel: [start, last block
    start, mid, end]} in us from the earliest start on any rank (one GPU: one clock; mid: a receive's wait
    end, a send's last block reaching the finish)."""
    mine = {k: ops[-n:] for k, ops in runtime.ensure(buf).low_latency_timeline().items()}
    every = [json.loads(t) for t in exchange(key, json.dumps(mine), rank, R)]
    t0 = min(op[0] for st in every for ops in st.values() for op in ops)
    us = lambda t: round((t - t0) / 1e3, 2) if t else 0.0
    return [[{k: [us(a) for a in ops[r]] for k, ops in st.items() if r < len(ops)} for r in range(n)] for st in every]


# Straight-line rounds, ``repeats`` calls of n rounds. Headline: each kernel's median over rounds (every call's
# first round left out: it waits until the last process has started the call, as the processes' hosts start it
# apart), per rank, max over ranks; p90 next to it. Also the per-launch means: steady, from calls of 3n and n
# rounds ((3n-call sums - n-call sums) over the 2n extra launches), and plain (the n-round calls' average).
n = args.loop
if n < 2:
    p.error("--loop must be at least 2: each call's first round is left out of the medians")
if not DRY:
    window = min(n, 32)   # the timeline holds each kernel's last 32 ops
    short, calls = local_kernel_times(rounds_unrolled_of(n), rounds_per_call=window)
    timeline = timeline_of_last_call(window)
    median, p90 = round_statistics(calls, skip_first=window == n)
    long, _ = local_kernel_times(rounds_unrolled_of(3 * n))
    # A difference swamped by noise (one slow call) falls back to the plain mean, as timed_pipelined_steady does.
    steady = {k: (max((long[k] * 3 * n - short[k] * n) / (2 * n), 0.0) or short[k])
              for k in short if long[k] is not None and short[k] is not None}
    kernel = {name: gather(f"km_{name}", sec, rank, R) for name, sec in median.items()}
    results["kernel_p90_s"] = {name: gather(f"kp_{name}", sec, rank, R) for name, sec in p90.items()}
    results["kernel_steady_mean_s"] = {name: gather(f"ks_{name}", sec, rank, R) for name, sec in steady.items()}
    results["kernel_plain_s"] = {name: gather(f"ku_{name}", sec, rank, R) for name, sec in short.items()}
    results["last_call_timeline_us"] = timeline
else:
    kernel = kernel_times(rounds_unrolled_of(n), "u")
results["kernel_s"] = kernel
if not DRY:
    # The same rounds with a GEMM between each send and its receive, as DeepEP's low-latency test times its send and
    # receive kernels: each receive finds its transfer done, and a send overlaps the other ranks' sends and GEMMs
    # rather than their receives' copies.
    _, hooked_calls = local_kernel_times(hooked_rounds_of(n), rounds_per_call=window, inputs=(gx, gi, gw, gy, gm))
    hooked_median, hooked_p90 = round_statistics(hooked_calls, skip_first=window == n)
    results["hooked_kernel_s"] = {name: gather(f"hm_{name}", sec, rank, R) for name, sec in hooked_median.items()}
    results["hooked_kernel_p90_s"] = {name: gather(f"hp_{name}", sec, rank, R) for name, sec in hooked_p90.items()}
    results["hooked_last_call_timeline_us"] = timeline_of_last_call(window, key="ll_hooked_timeline")
else:
    jax.block_until_ready(smap(hooked_rounds_of(n), 5)(gx, gi, gw, gy, gm))
if R == 2 and E_loc >= K:
    # The straight-line rounds again with only rank 1 sending combine answers (one_sender_ids): its send with the
    # other rank waiting rather than copying. Per rank, not max over ranks: rank 0's send has nothing to send.
    gi_one = global_array(mesh, one_sender_ids())
    if not DRY:
        _, one_calls = local_kernel_times(rounds_unrolled_of(n), rounds_per_call=window, inputs=(gx, gi_one, gw, gy))
        one_median, _ = round_statistics(one_calls, skip_first=window == n)
        results["one_sender_kernel_s"] = {name: [float(v) for v in exchange(f"om_{name}", repr(sec), rank, R)]
                                          for name, sec in sorted(one_median.items())}
        results["one_sender_last_call_timeline_us"] = timeline_of_last_call(window, key="ll_one_sender_timeline")
    else:
        jax.block_until_ready(smap(rounds_unrolled_of(n), 4)(gx, gi_one, gw, gy))
results["kernel_fori_loop_s"] = kernel_times(rounds, "f")
t_dispatch_jit = gather("dispatch_jit", timed(smap(dispatch_once, 2), gx, gi, repeats=args.repeats), rank, R)
t_both_jit = gather("both_jit", timed(smap(combine_once, 4), gx, gi, gw, gy, repeats=args.repeats), rank, R)
results["jit_s"] = dict(dispatch=t_dispatch_jit, combine=t_both_jit - t_dispatch_jit)
t_dispatch_pipe = gather("dispatch_pipe", timed_pipelined(smap(dispatch_once, 2), gx, gi, calls=args.repeats), rank, R)
t_both_pipe = gather("both_pipe", timed_pipelined(smap(combine_once, 4), gx, gi, gw, gy, calls=args.repeats), rank, R)
results["jit_pipelined_s"] = dict(dispatch=t_dispatch_pipe, combine=t_both_pipe - t_dispatch_pipe)
results["overlap_s"] = dict(
    overlapped=gather("ovl", timed(smap(overlapped, 3), gx, gi, gm, repeats=args.repeats), rank, R),
    serial=gather("ser", timed(smap(serial, 3), gx, gi, gm, repeats=args.repeats), rank, R),
    dispatch_alone=t_dispatch_jit,
    matmul_alone=gather("mm", timed(smap(matmul_only, 1), gm, repeats=args.repeats), rank, R))

# Bytes (DeepEP convention) and the HBM floor, per rank then summed.
sel = int(gather("sel", int(np.sum(idx.reshape(R, T, K)[rank] >= 0)), rank, R, reduce=sum))
fp8_msg, bf16_msg = H + H // 128 * 4 + 16, 2 * H
floor_dispatch = R * T * 2 * H + 3 * sel * fp8_msg      # read x; write + read staging; write the valid rows
floor_combine = 3 * sel * bf16_msg + R * T * 2 * H      # read y rows; write + read staging; write out
B = args.hbm_bytes_per_s * G   # the floor's bytes spread over every GPU's HBM
summary = dict(config=dict(ranks=R, physical_gpus=G, tokens=T, hidden=H, topk=K, experts=E, loop=args.loop, selections=sel,
                           sms_visible=visible_sms(), num_sms=args.num_sms or None,
                           mps_sm_percent=os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")),  # None: no MPS cap
               device=jax.devices()[0].device_kind, hbm_copy_bytes_per_s=args.hbm_bytes_per_s, results=results,
               floor_bytes=dict(dispatch=floor_dispatch, combine=floor_combine))
if kernel and all(v is not None for v in kernel.values()):
    # An op's kernel time: its send and receive kernels' times, any overlap counted once (round_statistics); the
    # sum of the two where only per-kernel figures exist (the loop and per-launch means).
    op_time = lambda k, op: k[op] if op in k else k[op + "_send"] + k[op + "_recv"]
    t_d, t_c = op_time(kernel, "dispatch"), op_time(kernel, "combine")
    summary["latency_us"] = dict(dispatch=t_d * 1e6, combine=t_c * 1e6, dispatch_send=kernel["dispatch_send"] * 1e6,
                                 combine_send=kernel["combine_send"] * 1e6,
                                 # of the receive kernels' time, how long the slowest block waited for peers
                                 dispatch_recv_wait=kernel["dispatch_recv_wait"] * 1e6,
                                 combine_recv_wait=kernel["combine_recv_wait"] * 1e6)
    for op in ("dispatch", "combine"):   # send start to receive end, launch gap included
        if op + "_span" in kernel:
            summary["latency_us"][op + "_span"] = kernel[op + "_span"] * 1e6
    def op_us(k):   # {dispatch, combine, their receive waits} in us from per-kernel seconds
        return dict(dispatch=op_time(k, "dispatch") * 1e6, combine=op_time(k, "combine") * 1e6,
                    dispatch_recv_wait=k["dispatch_recv_wait"] * 1e6, combine_recv_wait=k["combine_recv_wait"] * 1e6)
    summary["latency_p90_us"] = op_us(results["kernel_p90_s"])
    hooked = results.get("hooked_kernel_s")
    if hooked and all(v is not None for v in hooked.values()):   # each phase's kernel time; the spans hold the GEMMs
        summary["latency_hooked_us"] = {k: v * 1e6 for k, v in hooked.items() if not k.endswith("_span")}
    if "one_sender_kernel_s" in results:   # per rank; rank 1 is the sender
        summary["latency_one_sender_us"] = {k: [round(v * 1e6, 2) for v in per_rank]
                                            for k, per_rank in results["one_sender_kernel_s"].items()}
    summary["latency_steady_mean_us"] = op_us(results["kernel_steady_mean_s"])
    summary["latency_plain_us"] = op_us(results["kernel_plain_s"])
    summary["latency_fori_loop_us"] = op_us(results["kernel_fori_loop_s"])
    summary["GBps_per_rank"] = dict(dispatch=sel / R * fp8_msg / t_d / 1e9, combine=sel / R * bf16_msg / t_c / 1e9)
    if B:
        summary["ratio_to_hbm_floor"] = dict(dispatch=t_d / (floor_dispatch / B), combine=t_c / (floor_combine / B))
emit_result(rank, summary, args.out)
log(rank, "done")
