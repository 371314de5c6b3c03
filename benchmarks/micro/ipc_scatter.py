"""The normal-mode dispatch send, alone, across processes: is scattering rows into other processes' CUDA IPC
mappings what makes the R=8 send phase slow?

Measured on one H200 (benchmarks/results/2026-11-29_h200_dispatch_breakdown.json): at R=8 ranks as processes
under MPS the dispatch send's payload stores cost ~2.1 ms per op for bf16 rows and ~1.9 ms for fp8 rows of
half the size (about a third of the copy bandwidth, and not proportional to bytes), while the same scatter
pattern in one process reaches 0.92 x cudaMemcpy (benchmarks/micro/row_scatter.cu). This script runs the
send's pattern -- one warp per token, the row read once (4 x 16-byte loads in flight per lane) and stored to
each destination rank's slot, DeepEP's routing (top-8 of 256 experts, ~5.3 of 8 ranks per token) -- in every
rank at once, with the slots the kernel computes (lower ranks' rows first, then token order), and times:

  peers  rows go to the destination ranks' staging buffers through CUDA IPC (what cuda/intranode.cu does);
  self   the same rows and slots, but every destination is this rank's own buffer (no IPC mapping);

each with the block's closing fence at system scope (today's kernels), at GPU scope, or none.
Run (one GPU, 8 ranks as processes under MPS; CuPy needed)::

    python -m jax_ep.launch --nproc 8 -- python benchmarks/micro/ipc_scatter.py [--tokens 4096] [--row-bytes 14336]

Rank 0 prints one JSON line per (target, fence): the slowest rank's kernel time and the aggregate bytes
written to staging per second. ``--plan-only`` prints the routing summary without a GPU (used by the tests).
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
"""


def plan(rank: int, ranks: int, tokens: int, topk: int = 8, experts: int = 256, seed: int = 0):
    """Every rank's destinations (DeepEP's benchmark routing, the same draw in every process) and this rank's
    slots: for destination r, the rows of lower ranks first, then this rank's tokens in order; -1 = not sent.
    Returns (slots [T, R] int32, rows received per rank [R])."""
    rng = np.random.default_rng(seed)
    scores = np.abs(rng.standard_normal((ranks * tokens, experts))) + 1.0
    idx = np.argsort(-scores, axis=1)[:, :topk]
    owner = idx // (experts // ranks)                                    # [R*T, K]
    member = np.zeros((ranks * tokens, ranks), bool)
    np.put_along_axis(member, owner, True, axis=1)
    member = member.reshape(ranks, tokens, ranks)                        # [source, token, destination]
    counts = member.sum(axis=1)                                          # [source, destination]
    base = np.cumsum(counts, axis=0) - counts                            # rows of lower sources first
    mine = member[rank]
    slots = np.where(mine, np.cumsum(mine, axis=0) - 1 + base[rank], -1).astype(np.int32)
    return slots, counts.sum(axis=0)


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
    slots, received = plan(rank, ranks, T)
    if args.plan_only:
        print(json.dumps(dict(rank=rank, ranks=ranks, rows_sent=int((slots >= 0).sum()),
                              rows_received=received.tolist())))
        return

    import cupy as cp
    root = os.environ.get("IPC_SCATTER_DIR") or "/tmp/ipc_scatter_" + os.environ.get(
        "JAX_EP_COORDINATOR", "local").replace(":", "_").replace(".", "_")
    os.makedirs(root, exist_ok=True)
    barrier = FileBarrier(root, rank, ranks)
    capacity = int(received.max())
    # Its own cudaMalloc (not CuPy's pool): an IPC handle names a whole allocation, so the pointer must be its base.
    memory = cp.cuda.Memory(capacity * row)
    staging = cp.ndarray((capacity, row // 16, 4), dtype=cp.int32, memptr=cp.cuda.MemoryPointer(memory, 0))
    src = (cp.arange(T * row // 4, dtype=cp.int32) + rank).reshape(T, row // 16, 4)   # any bytes will do
    handle = cp.cuda.runtime.ipcGetMemHandle(staging.data.ptr)
    with open(os.path.join(root, f"h{rank}.tmp"), "wb") as fh:
        fh.write(handle)
    os.replace(os.path.join(root, f"h{rank}.tmp"), os.path.join(root, f"h{rank}"))
    barrier.wait()
    peers = []
    for r in range(ranks):
        if r == rank:
            peers.append(staging.data.ptr)
        else:
            with open(os.path.join(root, f"h{r}"), "rb") as fh:
                peers.append(cp.cuda.runtime.ipcOpenMemHandle(fh.read(), getattr(cp.cuda.runtime, "cudaIpcMemLazyEnablePeerAccess", 1)))
    # "self": same slots, every destination this rank's own buffer, so the same rows land on the same offsets
    # of one buffer (rows of different destinations overlap: only the timing matters here).
    targets = {"peers": cp.asarray(np.array(peers, dtype=np.uint64)),
               "self": cp.asarray(np.full(ranks, staging.data.ptr, dtype=np.uint64))}
    d_slots = cp.asarray(slots)
    kernel = cp.RawKernel(KERNEL, "scatter_rows")
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    grid = min(sms * args.blocks_per_sm, (T + args.threads // 32 - 1) // (args.threads // 32))
    rows_sent = int((slots >= 0).sum())
    results = []
    for target in ("peers", "self"):
        for fence, fence_name in ((2, "system"), (1, "gpu"), (0, "none")):
            call = lambda: kernel((grid,), (args.threads,), (src, targets[target], d_slots, np.int32(T),  # noqa: E731
                                                            np.int32(ranks), np.int32(row // 16),
                                                            np.int64(row // 16), np.int32(fence)))
            call()
            cp.cuda.Device().synchronize()
            barrier.wait()                                               # every rank starts together
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            for _ in range(args.reps):
                call()
            stop.record()
            stop.synchronize()
            seconds = cp.cuda.get_elapsed_time(start, stop) / 1e3 / args.reps
            with open(os.path.join(root, f"t_{target}_{fence}_{rank}"), "w") as fh:
                fh.write(f"{seconds} {rows_sent}")
            barrier.wait()
            if rank == 0:
                per_rank = [open(os.path.join(root, f"t_{target}_{fence}_{r}")).read().split() for r in range(ranks)]
                slowest = max(float(s) for s, _ in per_rank)
                rows = sum(int(n) for _, n in per_rank)
                results.append(dict(target=target, fence=fence_name, ranks=ranks, tokens=T, row_bytes=row,
                                    grid=grid, threads=args.threads, rows_written_all_ranks=rows,
                                    slowest_rank_s=slowest,
                                    staging_write_GBps=rows * row / slowest / 1e9,
                                    hbm_GBps_read_plus_write=(rows + ranks * T) * row / slowest / 1e9))
                print(json.dumps(results[-1]), flush=True)
    barrier.wait()
    for r, ptr in enumerate(peers):
        if r != rank:
            cp.cuda.runtime.ipcCloseMemHandle(ptr)


if __name__ == "__main__":
    main()
