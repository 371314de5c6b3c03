"""The gaps between consecutive low-latency kernels of a rank, from the timelines that ``bench_low_latency.py`` records
(``last_call_timeline_us``): a kernel's end stamp to the next kernel's start. A send's figure ends at its last signal
and a receive's at its last block's end stamp, before that block raises the done flags and adds up the timing; the
kernel exits after that tail, so the gap after a receive holds the tail plus the launch gap, and the gap after a send
is the reference for what a launch alone costs.

    python benchmarks/ll_gaps.py <bench_ll JSON files or dirs>... [--rounds straight|hooked|one_sender]

Per file: for each gap, the median over the last call's rounds per rank, max over ranks (every round of the call; the
first round's wait for the last process to start is inside its receive, not in these gaps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from ll_overlap import bench_files

# (name, kernel whose end stamp opens the gap, kernel whose start closes it, whether that one is the next round's)
GAPS = (("dispatch_send_end_to_recv", "dispatch_send", "dispatch_recv", False),
        ("dispatch_recv_end_to_combine_send", "dispatch_recv", "combine_send", False),
        ("combine_send_end_to_recv", "combine_send", "combine_recv", False),
        ("combine_recv_end_to_next_dispatch_send", "combine_recv", "dispatch_send", True))


def kernel_gaps(timeline):
    """{gap: us} from ``timeline`` = [rank][round]{kernel: [start, latest block start, mid, end]}: per rank the median
    over rounds, then the max over ranks. Gaps with no round on some rank are left out."""
    per_rank = []
    for rounds in timeline:
        mine = {}
        for name, ends, starts, next_round in GAPS:
            pairs = zip(rounds, rounds[1:]) if next_round else zip(rounds, rounds)
            values = [b[starts][0] - a[ends][3] for a, b in pairs if a.get(ends) and b.get(starts)]
            if values:
                mine[name] = statistics.median(values)
        per_rank.append(mine)
    return {name: round(max(r[name] for r in per_rank), 2) for name, *_ in GAPS if all(name in r for r in per_rank)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="bench_low_latency JSON files, or directories searched for them")
    p.add_argument("--rounds", choices=("straight", "hooked", "one_sender"), default="straight")
    args = p.parse_args(argv)
    key = ("" if args.rounds == "straight" else args.rounds + "_") + "last_call_timeline_us"
    shown = 0
    for f in bench_files(args.paths):
        timeline = json.load(open(f)).get("results", {}).get(key)
        if timeline:
            print(os.path.relpath(f), kernel_gaps(timeline))
            shown += 1
    if not shown:
        raise SystemExit(f"no {key} in the given files")


if __name__ == "__main__":
    main()
