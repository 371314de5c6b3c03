#!/usr/bin/env bash
# Which SMs N MPS clients at P % each run on (device machine; cupy). Starts a private MPS daemon, runs N processes
# of benchmarks/micro/smid_probe.py at once (a grid of GRID blocks each, spinning 300 us, five launches), stops the
# daemon and prints, per launch, each client's SM count and range and the union. On driver 580.159.04 (2026-11-30)
# every client ran on the first SMs of its share: N=2 at 50 %, SMs 0-65 for both; N=8 at 13 %, SMs 0-15 for all.
# Usage (repo root): bash benchmarks/micro/mps_sm_placement.sh OUTDIR [N=8] [PERCENT=13] [GRID=80]
set -u
ROOT=$(pwd); O=$1; N=${2:-8}; PCT=${3:-13}; GRID=${4:-80}
mkdir -p "$O"; cd "$O" || exit 1
P=$(mktemp -d); export CUDA_MPS_PIPE_DIRECTORY=$P/pipe CUDA_MPS_LOG_DIRECTORY=$P/log; mkdir -p "$P/pipe" "$P/log"
timeout 20 nvidia-cuda-mps-control -d || exit 1
for i in $(seq 0 $((N - 1))); do
  CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$PCT timeout 90 python3 "$ROOT/benchmarks/micro/smid_probe.py" "$i" "$GRID" 300 "n$N" &
done
wait
echo quit | timeout 20 nvidia-cuda-mps-control; sleep 1; rm -rf "$P"
python3 - "$N" <<'PY'
import glob, json, sys
n = sys.argv[1]
runs = [json.load(open(f)) for f in sorted(glob.glob(f"n{n}_r*.json"))]
for it in range(min(len(r) for r in runs)):
    sets = [set(r[it]["sms"]) for r in runs]
    print("launch", it, "SMs per client", [len(s) for s in sets], "union", len(set().union(*sets)),
          "ranges", [(min(s), max(s)) for s in sets])
PY
