"""Peer (NVLink) copy bandwidth between this machine's GPUs: the limit the multi-GPU targets are set against.

Run in one process that sees every GPU (needs CuPy)::

    python benchmarks/peer_copy.py [--mib 1024] > peer.json

What it measures, every figure in bytes of payload per second (each byte counted once, as it crosses):

- ``copy_engine_one_way``: cudaMemcpyPeerAsync GPU 0 -> GPU 1 alone;
- ``copy_engine_both_ways``: 0 -> 1 and 1 -> 0 at once, per direction;
- ``sm_push_one_way`` / ``sm_pull_one_way``: a copy kernel on GPU 0 storing into (loading from) GPU 1's memory
  through its peer pointer -- what load/store kernels such as ours can reach;
- ``sm_push_all_to_all``: every GPU's kernel stores an equal slice into every other GPU at once (for 2 GPUs:
  both directions), per GPU and direction (bytes each GPU sends / time) -- the limit for dispatch/combine;
- ``hbm_copy``: a copy kernel on GPU 0 within its own memory (read + write bytes, as DESIGN.md counts B).

SM kernels are tried at a few grid sizes; the best is reported with the grid it used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

_KERNELS = r"""
extern "C" __global__ void copy_to_peers(const int4* __restrict__ src, const unsigned long long* __restrict__ dsts,
                                         int num_dsts, long long vecs_per_dst) {
  // Blocks are dealt round-robin over the destinations; each destination gets its own slice of src.
  const int d = blockIdx.x % num_dsts;
  const long long blocks_per_dst = gridDim.x / num_dsts;
  const long long first = (blockIdx.x / num_dsts) * blockDim.x + threadIdx.x;
  const long long stride = blocks_per_dst * blockDim.x;
  int4* __restrict__ dst = reinterpret_cast<int4*>(dsts[d]);
  const int4* __restrict__ s = src + d * vecs_per_dst;
  long long i = first;
  for (; i + 3 * stride < vecs_per_dst; i += 4 * stride) {   // four loads in flight before the stores
    int4 a = s[i], b = s[i + stride], c = s[i + 2 * stride], e = s[i + 3 * stride];
    dst[i] = a; dst[i + stride] = b; dst[i + 2 * stride] = c; dst[i + 3 * stride] = e;
  }
  for (; i < vecs_per_dst; i += stride) dst[i] = s[i];
}
"""


def _median_wall(run, sync, repeats):
    run()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def measure(mib: int = 1024, repeats: int = 10, blocks_per_sm=(1, 2, 4), threads: int = 512) -> dict:
    import cupy as cp
    rt = cp.cuda.runtime
    n = rt.getDeviceCount()
    nbytes = mib * 2**20
    out = dict(gpus=n, bytes_per_transfer=nbytes, repeats=repeats, threads_per_block=threads,
               device=rt.getDeviceProperties(0)["name"].decode(), method=__doc__.split("\n\n")[2].strip())
    bufs, kernels, streams, sms = [], [], [], []
    for d in range(n):
        with cp.cuda.Device(d):
            for peer in range(n):
                if peer != d and rt.deviceCanAccessPeer(d, peer):
                    try:
                        rt.deviceEnablePeerAccess(peer)
                    except cp.cuda.runtime.CUDARuntimeError as exc:  # already enabled is fine
                        if "AlreadyEnabled" not in str(exc) and "already" not in str(exc).lower():
                            raise
            bufs.append((cp.random.random(nbytes // 4, dtype=cp.float32), cp.empty(nbytes // 4, cp.float32)))
            kernels.append(cp.RawKernel(_KERNELS, "copy_to_peers"))
            streams.append(cp.cuda.Stream(non_blocking=True))
            sms.append(rt.getDeviceProperties(d)["multiProcessorCount"])

    def sync():
        for d in range(n):
            with cp.cuda.Device(d):
                streams[d].synchronize()

    def copier(d, src_ptr, nbytes_src, dst_ptrs, grid):
        """A launch of GPU d's copy kernel: src (nbytes_src at src_ptr, any GPU d reaches) split into equal
        slices, one per destination pointer. The pointer table is built (and synchronised) now, not timed."""
        vecs = nbytes_src // 16 // len(dst_ptrs)
        with cp.cuda.Device(d):
            table = cp.asarray(dst_ptrs, dtype=cp.uint64)
            cp.cuda.Device(d).synchronize()
        args = (cp.uint64(src_ptr), table, cp.int32(len(dst_ptrs)), cp.int64(vecs))

        def run():
            with cp.cuda.Device(d), streams[d]:  # RawKernel launches on the current stream
                kernels[d]((grid,), (threads,), args)
        return run

    def best_grid(make_run, moved_bytes):
        best = None
        for k in blocks_per_sm:
            t = _median_wall(make_run(k), sync, repeats)
            if best is None or moved_bytes / t > best["bytes_per_s"]:
                best = dict(bytes_per_s=moved_bytes / t, seconds=t, blocks_per_sm=k)
        return best

    # HBM: a copy kernel within GPU 0 (read + write bytes, DESIGN.md's B).
    with cp.cuda.Device(0):
        out["hbm_copy"] = best_grid(lambda k: copier(0, bufs[0][0].data.ptr, nbytes, [bufs[0][1].data.ptr],
                                                     k * sms[0]), 2 * nbytes)
    if n < 2:
        out["note"] = "one GPU: no peer copy"
        return out
    can = [[d == p or bool(rt.deviceCanAccessPeer(d, p)) for p in range(n)] for d in range(n)]
    out["peer_access"] = can
    if not can[0][1]:
        out["note"] = "GPU 0 cannot reach GPU 1 by load/store"
        return out

    def ce_copy(pairs):
        def run():
            for src_dev, dst_dev in pairs:
                with cp.cuda.Device(src_dev):
                    rt.memcpyPeerAsync(bufs[dst_dev][1].data.ptr, dst_dev, bufs[src_dev][0].data.ptr, src_dev, nbytes,
                                       streams[src_dev].ptr)
        return run
    t = _median_wall(ce_copy([(0, 1)]), sync, repeats)
    out["copy_engine_one_way"] = dict(bytes_per_s=nbytes / t, seconds=t)
    t = _median_wall(ce_copy([(0, 1), (1, 0)]), sync, repeats)
    out["copy_engine_both_ways"] = dict(bytes_per_s=nbytes / t, seconds=t, note="per direction")

    out["sm_push_one_way"] = best_grid(
        lambda k: copier(0, bufs[0][0].data.ptr, nbytes, [bufs[1][1].data.ptr], k * sms[0]), nbytes)
    out["sm_pull_one_way"] = best_grid(  # GPU 0's kernel loads GPU 1's source, stores locally
        lambda k: copier(0, bufs[1][0].data.ptr, nbytes, [bufs[0][1].data.ptr], k * sms[0]), nbytes)

    reach = [[p for p in range(n) if p != d and can[d][p]] for d in range(n)]

    def all_to_all(k):
        # each destination gets its sources' slices side by side (no two GPUs write the same bytes)
        slice_bytes = nbytes // max(len(r) for r in reach) // 16 * 16
        slot = lambda d, p: d if d < p else d - 1  # noqa: E731  (d's place among p's n-1 sources)
        runs = [copier(d, bufs[d][0].data.ptr, slice_bytes * len(reach[d]),
                       [bufs[p][1].data.ptr + slice_bytes * slot(d, p) for p in reach[d]],
                       k * sms[d] // len(reach[d]) * len(reach[d])) for d in range(n) if reach[d]]

        def run():
            for r in runs:
                r()
        return run
    res = best_grid(all_to_all, nbytes // max(len(r) for r in reach) // 16 * 16 * max(len(r) for r in reach))
    res["note"] = "bytes each GPU sends (to all its peers at once) per second"
    out["sm_push_all_to_all"] = res
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=1024, help="bytes per transfer, MiB")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.mib, args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
