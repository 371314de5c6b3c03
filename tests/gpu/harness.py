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


class Checks:
    """Named comparisons of GPU results against the reference; failures are logged as they happen."""

    def __init__(self, rank):
        self.rank = rank
        self.results = []    # (name, ok)
        self.failures = []   # "name: detail"

    def __call__(self, name, got, want, exact=True, rtol=1e-5, atol=1e-5):
        import numpy as np
        got, want = np.asarray(got), np.asarray(want)
        if got.dtype != want.dtype or got.shape != want.shape:
            ok, detail = False, f"dtype/shape {got.dtype}{got.shape} vs {want.dtype}{want.shape}"
        elif exact:
            a = got.view(np.uint8) if got.dtype.itemsize == 1 else got
            b = want.view(np.uint8) if want.dtype.itemsize == 1 else want
            ok = np.array_equal(a, b)
            detail = "" if ok else f"{int(np.sum(a != b))} elements differ"
        else:
            g, w = got.astype(np.float64), want.astype(np.float64)
            err = float(np.max(np.abs(g - w) / (atol + rtol * np.abs(w)))) if g.size else 0.0
            ok = err <= 1.0
            detail = f"max scaled err {err:.3g}, max abs diff {float(np.max(np.abs(g - w))) if g.size else 0:.3g}"
        self.results.append((name, bool(ok)))
        if not ok:
            self.failures.append(f"{name}: {detail}")
            log(self.rank, "FAIL", name, detail)
        return ok

    def finish(self, elapsed, **extra):
        """Log the tally, write rank 0's JSON to $JAX_EP_RESULT, and return the process exit code."""
        import json
        passed = sum(ok for _, ok in self.results)
        log(self.rank, f"{passed}/{len(self.results)} checks passed in {elapsed:.1f} s")
        if self.rank == 0 and os.environ.get("JAX_EP_RESULT"):
            with open(os.environ["JAX_EP_RESULT"], "w") as fh:
                json.dump(dict(checks=[dict(name=n, ok=o) for n, o in self.results], failures=self.failures,
                               seconds=elapsed, **extra), fh, indent=1)
        return 1 if self.failures else 0


def routing(rng, num_ranks, T, K, E, invalid=False, duplicates=False):
    """Random top-k routing for num_ranks x T tokens: distinct experts per token, 20% -1 entries, a -1
    tail of uneven length per rank; optionally out-of-range ids (must count as -1) and repeated ids."""
    import numpy as np
    idx = np.stack([rng.permutation(E)[:K] for _ in range(num_ranks * T)]).astype(np.int32)
    idx[rng.random(idx.shape) < 0.2] = -1
    for r in range(num_ranks):
        n = rng.integers(T // 2, T + 1)
        idx[r * T + n:(r + 1) * T] = -1
    if invalid:
        idx[rng.random(idx.shape) < 0.02] = E + 5
        idx[rng.random(idx.shape) < 0.01] = -7
    if duplicates and K > 1:
        rows = rng.random(idx.shape[0]) < 0.1
        idx[rows, K - 1] = idx[rows, 0]
    w = rng.random(idx.shape).astype(np.float32)
    return idx, w


def bench_arguments(tokens, loop):
    """The benchmark workers' shared options (DeepEP's configuration by default; tokens per rank and the
    ops per timed loop differ between modes)."""
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=tokens)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--loop", type=int, default=loop)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--hbm-bytes-per-s", type=float, default=0.0)
    p.add_argument("--out", default="")
    return p


def uniform_inputs(seed, num_ranks, T, H, K, E):
    """Single-process GPU tests' inputs: ids uniform in [-1, E) (-1 = none, repeats allowed), weights in
    [0, 1), bf16 tokens; all ranks' rows stacked [R*T, ...]."""
    import jax.numpy as jnp
    import numpy as np
    rng = np.random.default_rng(seed)
    idx = rng.integers(-1, E, (num_ranks * T, K)).astype(np.int32)
    w = rng.random((num_ranks * T, K)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((num_ranks * T, H)), jnp.bfloat16)
    return idx, w, x


def timed(f, *args, repeats=10):
    """Median wall seconds of ``f(*args)`` (compiled and warmed up first)."""
    import time

    import jax
    import numpy as np
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def timed_pipelined(f, *args, calls=20):
    """Wall seconds per call of ``calls`` back-to-back calls of ``f(*args)`` dispatched without waiting (as
    a training or decode loop runs them: host dispatch overlaps the device work), blocking once at the end."""
    return timed_pipelined_issue(f, *args, calls=calls)[0]


def timed_pipelined_issue(f, *args, calls=20):
    """(wall, issue) seconds per call of ``timed_pipelined``'s run; issue: until the host had dispatched the
    last call. Issue close to wall means the host, not the device, sets the pace."""
    import time

    import jax
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    outs = [f(*args) for _ in range(calls)]
    t_issue = time.perf_counter() - t0
    jax.block_until_ready(outs)
    return (time.perf_counter() - t0) / calls, t_issue / calls


def round_statistics(calls, skip_first=True):
    """Low-latency benchmark: this rank's median and 90th percentile (seconds) of each kernel's time, and of
    the receive kernels' wait (start to mid), over every round but each call's first (which waits for the last
    process to start the call; ``skip_first=False`` when the rounds given are not the call's first ones).
    Per op ("dispatch", "combine"), round by round: the time its send and receive kernels ran (any overlap counted
    once: a receive that starts before its send has ended, as with programmatic dependent launch, is not double
    counted) and "<op>_span", send start to receive end (the launch gap between them included).
    ``calls``: per call, {kernel: [(start, last block start, mid, end) ns, ...]}."""
    import statistics
    samples, first = {}, (1 if skip_first else 0)
    for tl in calls:
        for k, ops in tl.items():
            for start, _, mid, end in ops[first:]:
                samples.setdefault(k, []).append((end - start) * 1e-9)
                if k.endswith("_recv"):
                    samples.setdefault(k + "_wait", []).append(max(mid - start, 0) * 1e-9)
        for op in ("dispatch", "combine"):   # each list's own first round is dropped before they are lined up
            sends, recvs = tl.get(op + "_send", [])[first:], tl.get(op + "_recv", [])[first:]
            m = min(len(sends), len(recvs))   # the newest m ops of each: the same ops
            for (s0, _, _, s1), (r0, _, _, r1) in zip(sends[len(sends) - m:], recvs[len(recvs) - m:]):
                overlap = max(0, min(s1, r1) - max(s0, r0))
                samples.setdefault(op, []).append(((s1 - s0) + (r1 - r0) - overlap) * 1e-9)
                samples.setdefault(op + "_span", []).append(max(r1 - s0, 0) * 1e-9)
    p90 = lambda v: sorted(v)[min(len(v) - 1, int(0.9 * len(v)))]
    return ({k: statistics.median(v) for k, v in samples.items()}, {k: p90(v) for k, v in samples.items()})


def visible_sms():
    """SMs the first device reports to this process (None where it does not say): under MPS, whether the
    client's share shows here decides how the kernels' grids are sized."""
    import jax
    try:
        return int(jax.devices()[0].core_count)
    except Exception:   # CPU devices have no core_count; never fail a benchmark over a label
        return None


def timed_pipelined_steady(f, *args, calls=20):
    """(steady, plain, issue) seconds per call of back-to-back calls. steady = (time of 3 x ``calls`` - time
    of ``calls``) / (2 x ``calls``), so what a run pays once (the processes starting it apart, the final wait)
    cancels out; plain = the ``calls``-call run divided by ``calls``; issue: host dispatch per call in the
    long run (``timed_pipelined_issue``)."""
    short, _ = timed_pipelined_issue(f, *args, calls=calls)
    long, issue = timed_pipelined_issue(f, *args, calls=3 * calls)
    diff = (long * 3 * calls - short * calls) / (2 * calls)
    return (diff if diff > 0 else short), short, issue   # timing noise (CPU rehearsals): the plain figure


def kernel_profile(f, *args, ops=1, trace_dir=None):
    """GPU kernel time per kernel name for one call of ``f(*args)`` (which runs ``ops`` ops), from a JAX
    profiler trace of this process: {name: {"us_per_op": ..., "calls_per_op": ...}} plus "_span_us_per_op"
    (first kernel start to last kernel end). Kernels of other processes sharing the GPU are not in it; a
    rank's wait kernels show how long it waited for its peers."""
    import glob
    import tempfile

    import jax
    from jax.profiler import ProfileData
    jax.block_until_ready(f(*args))
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="jax_ep_prof_")
    jax.profiler.start_trace(trace_dir)
    try:
        jax.block_until_ready(f(*args))
    finally:
        jax.profiler.stop_trace()
    traces = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not traces:
        raise RuntimeError(f"kernel_profile: the JAX profiler wrote no trace under {trace_dir}")
    path = traces[-1]
    totals, first, last = {}, None, None
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):  # "XLA Ops" / "XLA Modules" lines repeat the same time
                continue
            for e in line.events:
                t = totals.setdefault(e.name, [0.0, 0])
                t[0] += e.duration_ns
                t[1] += 1
                first = e.start_ns if first is None else min(first, e.start_ns)
                last = e.start_ns + e.duration_ns if last is None else max(last, e.start_ns + e.duration_ns)
    out = {name: dict(us_per_op=round(ns / ops / 1e3, 1), calls_per_op=round(n / ops, 2))
           for name, (ns, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])}
    out["_span_us_per_op"] = round((last - first) / ops / 1e3, 1) if first is not None else None
    return out


def exchange(name, text, rank, num_ranks):
    """Every rank's ``text`` (a str), in rank order, through the distributed key-value store."""
    from jax._src.distributed import global_state
    client = global_state.client
    client.key_value_set(f"bench/{name}/{rank}", text)
    return [client.blocking_key_value_get(f"bench/{name}/{r}", 600_000) for r in range(num_ranks)]


def gather(name, value, rank, num_ranks, reduce=max):
    """``reduce`` over every rank's ``value`` (a float), through the distributed key-value store."""
    return reduce(float(v) for v in exchange(name, repr(value), rank, num_ranks))


def physical_gpus(rank, num_ranks):
    """How many distinct GPUs the launched ranks run on (the launcher pins each to CUDA_VISIBLE_DEVICES): the
    (host, first visible GPU) pairs, compared by a checksum that is the same in every process (str hash is not)."""
    import platform
    import zlib
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "?").split(",")[0].strip()
    key = float(zlib.crc32(f"{platform.node()}:{gpu}".encode()))
    return int(gather("physical_gpus", key, rank, num_ranks, reduce=lambda ids: len(set(ids))))


def emit_result(rank, summary, out_path):
    """Rank 0 prints a benchmark's summary as one ``BENCH {json}`` line and writes it to ``out_path`` (if set)."""
    import json
    if rank != 0:
        return
    line = json.dumps(summary)
    print("BENCH", line, flush=True)
    if out_path:
        with open(out_path, "w") as fh:
            fh.write(line + "\n")


def cuda_devices():
    """This process's CUDA devices ([] without a GPU backend)."""
    import jax
    try:
        return jax.devices("cuda")
    except RuntimeError:
        return []


def run_multi_rank(script, ranks, timeout_s=300, env=None):
    """pytest side: run tests/gpu/<script> as ``ranks`` processes through ``jax_ep.launch`` (several per GPU
    under MPS) and fail with its output unless every rank exits 0. Skips without a GPU, or without MPS
    when ranks outnumber GPUs."""
    import shutil
    import subprocess

    import pytest
    gpus = cuda_devices()
    if not gpus:
        pytest.skip("no GPU")
    if ranks > len(gpus) and shutil.which("nvidia-cuda-mps-control") is None:
        pytest.skip("several ranks per GPU need CUDA MPS")
    cmd = [sys.executable, "-m", "jax_ep.launch", "--nproc", str(ranks), "--timeout", str(timeout_s - 20), "--",
           sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                          env=dict(os.environ, JAX_EP_TIMEOUT_S="20", **(env or {})))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
