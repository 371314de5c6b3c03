"""Which SMs does an MPS client's kernel run on? One process of benchmarks/micro/mps_sm_placement.sh (cupy).

Launches `grid` blocks of 256 threads five times, each block spinning `spin_us` and recording %smid and its start
and end %globaltimer, every launch at the next 100 ms tick of the wall clock so that the clients launch together.
Writes <tag>_r<rank>.json: per launch the sorted SM ids and each block's start and end (ns).

    python benchmarks/micro/smid_probe.py RANK GRID SPIN_US TAG
"""
import json
import sys
import time

import cupy as cp

SOURCE = r'''
extern "C" __global__ void probe(unsigned long long* out, unsigned long long spin_ns) {
  unsigned smid; asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
  unsigned long long t0, t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  if (threadIdx.x == 0) {
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < spin_ns);
    out[blockIdx.x * 3] = smid; out[blockIdx.x * 3 + 1] = t0; out[blockIdx.x * 3 + 2] = t;
  }
  __syncthreads();
}'''


def main():
    rank, grid, spin_us, tag = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    kernel = cp.RawKernel(SOURCE, "probe")
    out = cp.zeros(grid * 3, dtype=cp.uint64)
    kernel((1,), (256,), (out, cp.uint64(1000)))  # compile and load before the timed launches
    cp.cuda.Device().synchronize()
    launches = []
    for _ in range(5):
        start = (int(time.time() * 10) + 3) / 10.0  # the next 100 ms tick at least 0.2 s away
        while time.time() < start:
            pass
        kernel((grid,), (256,), (out, cp.uint64(int(spin_us * 1000))))
        cp.cuda.Device().synchronize()
        a = out.get().reshape(grid, 3)
        launches.append(dict(sms=sorted({int(x) for x in a[:, 0]}), t0=[int(x) for x in a[:, 1]],
                             t1=[int(x) for x in a[:, 2]]))
    with open(f"{tag}_r{rank}.json", "w") as f:
        json.dump(launches, f)


if __name__ == "__main__":
    main()
