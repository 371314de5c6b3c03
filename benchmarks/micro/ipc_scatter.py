"""The normal-mode dispatch send, alone, across processes: is scattering rows into other processes' CUDA IPC
mappings what makes the R=8 send phase slow?

Measured on one H200 (benchmarks/results/2026-11-29_h200_dispatch_breakdown.json): at R=8 ranks as processes
under MPS the dispatch send's payload stores cost ~2.1 ms per op for bf16 rows and ~1.9 ms for fp8 rows of
half the size (about a third of the copy bandwidth, and not proportional to bytes), while the same scatter
pattern in one process reaches 0.92 x cudaMemcpy (benchmarks/micro/row_scatter.cu). This script runs the
send's pattern -- one warp per token, the row read once (4 x 16-byte loads in flight per lane) and stored to
each destination rank's slot, DeepEP's routing (top-8 of 256 experts, ~5.3 of 8 ranks per token) -- in every
rank at once, with the slots the kernel computes (lower ranks' rows first, then token order), and times:

  push_peers  rows go to the destination ranks' staging buffers through CUDA IPC (what cuda/intranode.cu does);
  push_self   the same rows and slots, but every destination is this rank's own buffer (no IPC mapping);

each with the block's closing fence at system scope (today's kernels), at GPU scope, or none; and the pull
design's receive, every received row read from its source rank's stage (the tokens, copied there once):

  pull_peers  through CUDA IPC;   pull_self  the same rows from this rank's own stage.

Run (one GPU, 8 ranks as processes under MPS; CuPy needed)::

    python -m jax_ep.launch --nproc 8 -- python benchmarks/micro/ipc_scatter.py [--tokens 4096] [--row-bytes 14336]

Rank 0 prints one JSON line per experiment: the slowest rank's kernel time, the rows moved per second and
the HBM traffic (read + write) per second. ``--plan-only`` prints the routing summary without a GPU (used by the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

KERNEL = r"""
extern "C" __global__ void scatter_rows(const int4* __restrict__ src, const unsigned long long* __restrict__ dst_base,
                                        const int* __restrict__ slots, int T, int R, int row_vecs,
                                        long long row_stride_vecs, int fence) {
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int t = blockIdx.x * warps + (threadIdx.x >> 5); t < T; t += gridDim.x * warps) {
    const int slot = lane < R ? slots[t * R + lane] : -1;
    const unsigned mask = __ballot_sync(0xffffffffu, slot >= 0);
    const int4* in = src + (long long)t * row_vecs;
    for (int j0 = 0; j0 < row_vecs; j0 += 128) {
      int4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int j = j0 + u * 32 + lane;
        v[u] = j < row_vecs ? in[j] : make_int4(0, 0, 0, 0);
      }
      unsigned m = mask;
      while (m) {
        const int r = __ffs(m) - 1;
        m &= m - 1;
        const int s = __shfl_sync(0xffffffffu, slot, r);
        int4* out = reinterpret_cast<int4*>(dst_base[r]) + (long long)s * row_stride_vecs;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int j = j0 + u * 32 + lane;
          if (j < row_vecs) out[j] = v[u];
        }
      }
    }
  }
  if (fence == 2) __threadfence_system();
  if (fence == 1) __threadfence();
}

// The pull alternative's receive: slot c's row is read from its source rank's stage (row t of that rank's
// tokens, copied there once by the source) and written to this rank's output; one warp per slot.
extern "C" __global__ void gather_rows(int4* __restrict__ out, const unsigned long long* __restrict__ src_base,
                                       const int* __restrict__ recv_src, int C, int T, int row_vecs) {
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int c = blockIdx.x * warps + (threadIdx.x >> 5); c < C; c += gridDim.x * warps) {
    const int src = recv_src[c], s = src / T, t = src % T;
    const int4* in = reinterpret_cast<const int4*>(src_base[s]) + (long long)t * row_vecs;
    int4* o = out + (long long)c * row_vecs;
    for (int j0 = 0; j0 < row_vecs; j0 += 128) {
      int4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int j = j0 + u * 32 + lane;
        v[u] = j < row_vecs ? in[j] : make_int4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int j = j0 + u * 32 + lane;
        if (j < row_vecs) o[j] = v[u];
      }
    }
  }
}
"""


def membership(ranks: int, tokens: int, topk: int = 8, experts: int = 256, seed: int = 0):
    """DeepEP's benchmark routing, the same draw in every process: bool [source, token, destination]."""
    rng = np.random.default_rng(seed)
    scores = np.abs(rng.standard_normal((ranks * tokens, experts))) + 1.0
    owner = np.argsort(-scores, axis=1)[:, :topk] // (experts // ranks)      # [R*T, K]
    member = np.zeros((ranks * tokens, ranks), bool)
    np.put_along_axis(member, owner, True, axis=1)
    return member.reshape(ranks, tokens, ranks)


def plan(rank: int, member):
    """The sending side, as cuda/intranode.cu lays rows out: this rank's slot at every destination (lower
    sources' rows first, then token order; -1 = not sent) and the rows each rank receives.
    Returns (slots [T, R] int32, received [R])."""
    counts = member.sum(axis=1)                                          # [source, destination]
    base = np.cumsum(counts, axis=0) - counts
    mine = member[rank]
    slots = np.where(mine, np.cumsum(mine, axis=0) - 1 + base[rank], -1).astype(np.int32)
    return slots, counts.sum(axis=0)


def gather_plan(rank: int, member):
    """The receiving side of the same layout: for each of this rank's slots, its source as s * T + t (the
    pull design reads that row from rank s's stage). int32 [rows received]."""
    tokens = member.shape[1]
    src = [s * tokens + np.flatnonzero(member[s, :, rank]) for s in range(member.shape[0])]
    return np.concatenate(src).astype(np.int32)                          # source-major, token order = slot order


class FileBarrier:
    """Ranks meet through files in a directory every process can see (no other channel is needed here)."""

    def __init__(self, root: str, rank: int, ranks: int):
        self.root, self.rank, self.ranks, self.n = root, rank, ranks, 0

    def wait(self, timeout_s: float = 120.0):
        self.n += 1
        open(os.path.join(self.root, f"b{self.n}_{self.rank}"), "w").close()
        t0 = time.time()
        while not all(os.path.exists(os.path.join(self.root, f"b{self.n}_{r}")) for r in range(self.ranks)):
            if time.time() - t0 > timeout_s:
                raise TimeoutError(f"rank {self.rank}: barrier {self.n} incomplete after {timeout_s} s")
            time.sleep(0.001)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--row-bytes", type=int, default=14336, help="bf16 H=7168: 14336; fp8: 7168 (+ scales apart)")
    p.add_argument("--reps", type=int, default=30, help="launches per timing (amortises the file barrier's skew)")
    p.add_argument("--threads", type=int, default=512)
    p.add_argument("--blocks-per-sm", type=int, default=4)
    p.add_argument("--plan-only", action="store_true")
    args = p.parse_args()
    rank = int(os.environ.get("JAX_EP_PROCESS_ID", "0"))
    ranks = int(os.environ.get("JAX_EP_NUM_PROCESSES", "1"))
    T, row = args.tokens, args.row_bytes
    if row % 16:
        sys.exit("--row-bytes must be a multiple of 16")
    member = membership(ranks, T)
    slots, received = plan(rank, member)
    recv_src = gather_plan(rank, member)
    if args.plan_only:
        print(json.dumps(dict(rank=rank, ranks=ranks, rows_sent=int((slots >= 0).sum()),
                              rows_received=received.tolist())))
        return

    import cupy as cp
    root = os.environ.get("IPC_SCATTER_DIR") or "/tmp/ipc_scatter_" + os.environ.get(
        "JAX_EP_COORDINATOR", "local").replace(":", "_").replace(".", "_")
    os.makedirs(root, exist_ok=True)
    barrier = FileBarrier(root, rank, ranks)
    vecs = row // 16

    def shared_rows(n, tag):
        """n rows in their own cudaMalloc (an IPC handle names a whole allocation, so CuPy's pool is avoided),
        and every rank's pointer to every rank's copy (its own included)."""
        mem = cp.cuda.Memory(n * row)
        arr = cp.ndarray((n, vecs, 4), dtype=cp.int32, memptr=cp.cuda.MemoryPointer(mem, 0))
        path = os.path.join(root, f"{tag}{rank}")
        with open(path + ".tmp", "wb") as fh:
            fh.write(cp.cuda.runtime.ipcGetMemHandle(arr.data.ptr))
        os.replace(path + ".tmp", path)
        barrier.wait()
        ptrs = []
        for r in range(ranks):
            if r == rank:
                ptrs.append(arr.data.ptr)
            else:
                with open(os.path.join(root, f"{tag}{r}"), "rb") as fh:
                    ptrs.append(cp.cuda.runtime.ipcOpenMemHandle(
                        fh.read(), getattr(cp.cuda.runtime, "cudaIpcMemLazyEnablePeerAccess", 1)))
        return mem, arr, ptrs

    capacity = int(received.max())
    staging_mem, staging, staging_ptrs = shared_rows(capacity, "staging")   # push: receivers' staging areas
    stage_mem, stage, stage_ptrs = shared_rows(T, "stage")                   # pull: each sender's own token rows
    src = (cp.arange(T * row // 4, dtype=cp.int32) + rank).reshape(T, vecs, 4)   # any bytes will do
    stage[...] = src
    out = cp.empty((len(recv_src), vecs, 4), dtype=cp.int32)
    module = cp.RawModule(code=KERNEL)
    scatter, gather = module.get_function("scatter_rows"), module.get_function("gather_rows")
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    warps = args.threads // 32
    d_slots, d_recv_src = cp.asarray(slots), cp.asarray(recv_src)
    own = lambda ptr: cp.asarray(np.full(ranks, ptr, dtype=np.uint64))      # noqa: E731
    rows_sent, rows_recv = int((slots >= 0).sum()), len(recv_src)

    def timed(name, call, rows_moved, hbm_rows):
        """Every rank runs `call` --reps times after a common barrier; rank 0 prints the slowest rank's time."""
        call()
        cp.cuda.Device().synchronize()
        barrier.wait()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(args.reps):
            call()
        stop.record()
        stop.synchronize()
        seconds = cp.cuda.get_elapsed_time(start, stop) / 1e3 / args.reps
        with open(os.path.join(root, f"t_{name}_{rank}"), "w") as fh:
            fh.write(f"{seconds} {rows_moved} {hbm_rows}")
        barrier.wait()
        if rank == 0:
            per_rank = [open(os.path.join(root, f"t_{name}_{r}")).read().split() for r in range(ranks)]
            slowest = max(float(x[0]) for x in per_rank)
            moved = sum(int(x[1]) for x in per_rank)
            hbm = sum(int(x[2]) for x in per_rank)
            print(json.dumps(dict(experiment=name, ranks=ranks, tokens=T, row_bytes=row, threads=args.threads,
                                  rows_moved_all_ranks=moved, slowest_rank_s=slowest,
                                  rows_GBps=moved * row / slowest / 1e9,
                                  hbm_GBps_read_plus_write=hbm * row / slowest / 1e9)), flush=True)

    # Push (today's send): read each token once, store it into every destination's staging slot.
    grid = min(sms * args.blocks_per_sm, -(-T // warps))
    for target, bases in (("peers", cp.asarray(np.array(staging_ptrs, dtype=np.uint64))),
                          ("self", own(staging.data.ptr))):   # same slots, all in this rank's own buffer
        for fence, fence_name in ((2, "system"), (1, "gpu"), (0, "none")):
            timed(f"push_{target}_fence_{fence_name}",
                  lambda: scatter((grid,), (args.threads,), (src, bases, d_slots, np.int32(T), np.int32(ranks),
                                                             np.int32(vecs), np.int64(vecs), np.int32(fence))),
                  rows_sent, rows_sent + T)
    # Pull (the alternative's receive): every slot's row read from its source's stage into this rank's output.
    grid = min(sms * args.blocks_per_sm, -(-rows_recv // warps))
    for target, bases in (("peers", cp.asarray(np.array(stage_ptrs, dtype=np.uint64))),
                          ("self", own(stage.data.ptr))):      # same rows, all read from this rank's own stage
        timed(f"pull_{target}",
              lambda: gather((grid,), (args.threads,), (out, bases, d_recv_src, np.int32(rows_recv), np.int32(T),
                                                        np.int32(vecs))),
              rows_recv, 2 * rows_recv)
    barrier.wait()
    for ptrs in (staging_ptrs, stage_ptrs):
        for r, ptr in enumerate(ptrs):
            if r != rank:
                cp.cuda.runtime.ipcCloseMemHandle(ptr)
    del staging_mem, stage_mem


if __name__ == "__main__":
    main()
