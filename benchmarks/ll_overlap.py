"""How long a low-latency send takes against how long other ranks were copying during it, from the timelines that
``bench_low_latency.py`` records (``last_call_timeline_us``: every rank's kernels on one clock when the ranks share a
GPU). With several ranks on one H200 their copies share one HBM; this shows how a send's time goes with what the others
were doing meanwhile.

    python benchmarks/ll_overlap.py <bench_ll JSON files or dirs>... [--send combine] [--by fraction] [--ranks 2]
        [--rounds straight|hooked|one_sender]

A rank's send in a round (its first instruction to its end stamp: its last signal since 9fb575a, before that the last
block's count) is binned by how long another rank was in a send, or in a receive after its wait (the receive's copy),
during it: in microseconds, or as a fraction of the send (--by fraction; absolute bins favour long sends, which have
more time to be overlapped). Per bin: rounds, median send time, min and max. Each call's first round is left out (it
waits for the last process to start the call). Only runs with every rank on one GPU count: there the ranks share the
HBM and the clock. A correlation: it does not by itself say what the send waits for.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics


def overlap(a, b):
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def send_samples(timeline, send):
    """(busy us, send us) per rank and round: ``timeline`` is [rank][round]{kernel: [start, latest block start, mid,
    end]} with mid a receive's wait end."""
    samples = []
    rounds = min(len(per_rank) for per_rank in timeline)
    for i in range(1, rounds):
        for me, per_rank in enumerate(timeline):
            mine = per_rank[i].get(f"{send}_send")
            if not mine:
                continue
            window, busy = (mine[0], mine[3]), 0.0
            for other, theirs in enumerate(timeline):
                if other == me:
                    continue
                ops = theirs[i]
                for kernel in ("dispatch_send", "combine_send"):
                    if ops.get(kernel):
                        busy += overlap(window, (ops[kernel][0], ops[kernel][3]))
                for kernel in ("dispatch_recv", "combine_recv"):
                    if ops.get(kernel):
                        busy += overlap(window, (ops[kernel][2], ops[kernel][3]))
            samples.append((busy, mine[3] - mine[0]))
    return samples


def bench_files(paths):
    """The bench_low_latency JSON files named, or found under the directories named."""
    files = []
    for path in paths:
        if not os.path.exists(path):
            raise SystemExit(f"{path}: no such file or directory")
        files += sorted(glob.glob(os.path.join(path, "**", "bench_ll_*.json"), recursive=True)) if os.path.isdir(path) else [path]
    return files


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="bench_low_latency JSON files, or directories searched for them")
    p.add_argument("--send", choices=("dispatch", "combine"), default="combine")
    p.add_argument("--by", choices=("us", "fraction"), default="us", help="overlap in us, or as a fraction of the send")
    p.add_argument("--ranks", type=int, default=None, help="only runs with this many ranks")
    p.add_argument("--rounds", choices=("straight", "hooked", "one_sender"), default="straight",
                   help="which of the benchmark's rounds: straight-line, a GEMM between each send and its receive, "
                   "or the R=2 routing in which only rank 1 sends combine answers")
    p.add_argument("--bins", default=None, help="bin edges (the last bin is open); default 0,3,5,7,9 us or "
                   "0,0.4,0.6,0.7,0.8,0.9")
    args = p.parse_args(argv)
    files = bench_files(args.paths)
    samples, used = [], 0
    for f in files:
        run = json.load(open(f))
        key = ("" if args.rounds == "straight" else args.rounds + "_") + "last_call_timeline_us"
        config, timeline = run.get("config", {}), run.get("results", {}).get(key)
        if config.get("physical_gpus", 1) != 1 or (args.ranks and config.get("ranks") != args.ranks):
            continue
        if timeline and len(timeline) > 1:
            samples += send_samples(timeline, args.send)
            used += 1
    if not samples:
        raise SystemExit("no multi-rank timelines of ranks sharing one GPU in the given files")
    bins = args.bins or ("0,3,5,7,9" if args.by == "us" else "0,0.4,0.6,0.7,0.8,0.9")
    edges = [float(x) for x in bins.split(",")] + [float("inf")]
    unit = " us" if args.by == "us" else " of it"
    print(f"{args.send} send, {len(samples)} rank-rounds from {used} of {len(files)} files")
    for lo, hi in zip(edges, edges[1:]):
        times = [t for busy, t in samples if lo <= (busy if args.by == "us" else busy / max(t, 1e-9)) < hi]
        if times:
            print(f"  others copying {lo:g}-{hi:g}{unit}: {len(times):4d} rounds, median {statistics.median(times):.2f} us "
                  f"(min {min(times):.2f}, max {max(times):.2f})")


if __name__ == "__main__":
    main()
