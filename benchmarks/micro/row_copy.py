"""How fast can the combine send's row copy be? (one GPU, cupy)

The R=2 combine send copies ~512 answers of 2H bytes from y [E_loc, R*T_max, H] (a rank's ~4 answers per expert at
the start of 128 expert regions 3.7 MB apart) to slots [t][k] of the peer's staging. This times, on one whole GPU,
the same 512 rows copied:
  warp_chunks   the send's pattern: 256 blocks of 256 threads, rows dealt two per block, each warp a 2 KB chunk per
                round (row addresses from device arrays, as the send reads the handle);
  block_rows    the same rows, every thread of a block loading all its share of the block's rows before storing;
  linear        the same bytes as one contiguous copy (grid-stride, four 16-byte loads in flight per thread);
  memcpy        cudaMemcpyAsync of the same bytes;
  empty         an empty kernel (launch cost).
from a spread source (y's layout) and a packed one. Before each timed launch a one-block kernel spins ~30 us so
that the host's launch overhead is not timed; when `thrash`, a kernel first reads 4 GB at a 64 KB stride (evicts
address translations and L2 lines, as the rest of a decode step would). Prints JSON: median microseconds (events).
"""
import json
import sys

import cupy as cp
import numpy as np

H, E_LOC, S, ROWS_PER_EXPERT = 7168, 128, 256, 4
ROW = 2 * H
SRC = r'''
extern "C" __global__ void warp_chunks(const char* __restrict__ src, char* __restrict__ dst, const long long* rows_in,
                                       const long long* rows_out, int n_rows, int rows_per_block, int row_bytes) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, chunks = (row_bytes + 2047) / 2048;
  const int first = blockIdx.x * rows_per_block;
  const int mine = min(rows_per_block, n_rows - first);
  for (int item = warp; item < mine * chunks; item += 8) {
    const int r = first + item / chunks, c = item % chunks;
    const int n = row_bytes / 16;
    const int4* in = reinterpret_cast<const int4*>(src + rows_in[r] * row_bytes);
    int4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int j = c * 128 + lane + 32 * u;
      if (j < n) v[u] = __ldg(in + j);
    }
    int4* out = reinterpret_cast<int4*>(dst + rows_out[r] * row_bytes);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int j = c * 128 + lane + 32 * u;
      if (j < n) out[j] = v[u];
    }
  }
}
// rows_per_block rows, all of each thread's int4s of them loaded before any store (row_bytes/16 * rows <= 256 * 8).
extern "C" __global__ void block_rows(const char* __restrict__ src, char* __restrict__ dst, const long long* rows_in,
                                      const long long* rows_out, int n_rows, int rows_per_block, int row_bytes) {
  const int first = blockIdx.x * rows_per_block, mine = min(rows_per_block, n_rows - first), n = row_bytes / 16;
  int4 v[8];
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    const int i = threadIdx.x + 256 * u, r = i / n, j = i % n;
    if (r < mine) v[u] = __ldg(reinterpret_cast<const int4*>(src + rows_in[first + r] * row_bytes) + j);
  }
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    const int i = threadIdx.x + 256 * u, r = i / n, j = i % n;
    if (r < mine) reinterpret_cast<int4*>(dst + rows_out[first + r] * row_bytes)[j] = v[u];
  }
}
extern "C" __global__ void linear(const int4* __restrict__ src, int4* __restrict__ dst, long long n) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n; i += 4 * stride) {
    int4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) if (i + u * stride < n) v[u] = __ldg(src + i + u * stride);
#pragma unroll
    for (int u = 0; u < 4; ++u) if (i + u * stride < n) dst[i + u * stride] = v[u];
  }
}
extern "C" __global__ void empty() {}
extern "C" __global__ void spin(long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < static_cast<unsigned long long>(ns));
}
extern "C" __global__ void thrash(const int* __restrict__ p, long long words, long long stride, int* sink) {
  long long i = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) * stride;
  int acc = 0;
  for (; i < words; i += static_cast<long long>(gridDim.x) * blockDim.x * stride) acc += p[i];
  if (acc == 0x7fffffff) sink[0] = acc;
}
'''


def main():
    mod = cp.RawModule(code=SRC, options=("-std=c++17",))
    f = {name: mod.get_function(name) for name in ("warp_chunks", "block_rows", "linear", "empty", "spin", "thrash")}
    y = cp.zeros(E_LOC * S * ROW, dtype=cp.uint8)
    y[:] = 1
    stage = cp.zeros(2 * 128 * 8 * ROW, dtype=cp.uint8)
    big = cp.ones((4 << 30) // 4, dtype=cp.int32)
    sink = cp.zeros(1, dtype=cp.int32)
    n = E_LOC * ROWS_PER_EXPERT
    rng = np.random.default_rng(0)
    spread = np.array([e * S + j for e in range(E_LOC) for j in range(ROWS_PER_EXPERT)], np.int64)
    packed = np.arange(n, dtype=np.int64)
    out = cp.asarray(rng.permutation(128 * 8)[:n].astype(np.int64))  # slots [t][k], scattered over the area
    sm = cp.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
    start, end = cp.cuda.Event(), cp.cuda.Event()

    def timed(launch, thrash):
        times = []
        for it in range(50):
            if thrash:
                f["thrash"]((2 * sm,), (256,), (big, np.int64(big.size), np.int64((64 << 10) // 4), sink))
            f["spin"]((1,), (1,), (np.int64(30000),))
            start.record()
            launch()
            end.record()
            end.synchronize()
            if it >= 10:
                times.append(cp.cuda.get_elapsed_time(start, end) * 1e3)
        return round(float(np.median(times)), 2)

    results = {}
    for thrash in (False, True):
        tag = "thrash" if thrash else "warm"
        results[f"empty/{tag}"] = timed(lambda: f["empty"]((1,), (32,), ()), thrash)
        nbytes = n * ROW
        results[f"memcpy/{tag}"] = timed(lambda: cp.cuda.runtime.memcpyAsync(stage.data.ptr, y.data.ptr, nbytes, 3,
                                                                             cp.cuda.get_current_stream().ptr), thrash)
        for grid in (sm * 4, sm * 2):
            results[f"linear_grid{grid}/{tag}"] = timed(
                lambda: f["linear"]((grid,), (256,), (y, stage, np.int64(nbytes // 16))), thrash)
        for src_name, rows in (("spread", spread), ("packed", packed)):
            rin = cp.asarray(rows)
            for kernel in ("warp_chunks", "block_rows"):
                for per_block in (2, 4):
                    grid = -(-n // per_block)
                    if kernel == "block_rows" and per_block * ROW // 16 > 256 * 8:
                        continue
                    results[f"{kernel}_{per_block}rows/{src_name}/{tag}"] = timed(
                        lambda: f[kernel]((grid,), (256,), (y, stage, rin, out, np.int32(n), np.int32(per_block),
                                                             np.int32(ROW))), thrash)
    json.dump(dict(config=dict(hidden=H, local_experts=E_LOC, rows=n, row_bytes=ROW, threads=256, sms=sm,
                               device=cp.cuda.runtime.getDeviceProperties(0)["name"].decode()),
                   median_us=results), sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
