#!/usr/bin/env bash
# One whole GPU pass on the device machine (correctness + benchmarks), logs and JSON under $OUT.
# Usage (repo root there): [PARTS="..."] bash benchmarks/device_run.sh [ranks...]   (default ranks: 2 4 8)
# PARTS (default all): normal (pytest + multi-rank checks + timeout check), flax (MoE layer on the cuda
# backend, command buffers on), ll (low-latency pytest + checks),
# bench_normal (R=8, DeepEP's normal config), bench_ll (R=2 and R=8, DeepEP's low-latency config),
# micro (benchmarks/micro/row_scatter.cu, prebuilt by nvcc as .dev/row_scatter: the device may have no nvcc),
# micro_ipc (benchmarks/micro/ipc_scatter.py: the send's scatter in 8 processes, IPC peers vs own memory),
# micro_copy (benchmarks/micro/row_copy.py: the low-latency combine send's row copy on one GPU, against memcpy),
# limits (peer/NVLink copy bandwidth between the GPUs, benchmarks/peer_copy.py), pytest (the whole
# `pytest -m gpu`: single-process tests use every visible GPU), sweep (benchmarks/bench.py in one process over
# every GPU, with the XLA baselines), sweep_mp (the same through jax_ep.launch, SWEEP_RANKS ranks).
# normal_mp / ll_mp: only the multi-rank checks of normal / ll. internode (INTERNODE="R:N ...": the normal
# check on virtual nodes), bench_internode (bench_normal on 8 ranks as nodes of each of BENCH_RANKS_PER_NODE, default "4 2").
# BENCH_NORMAL_RANKS (default 8), BENCH_NORMAL_ARGS (extra bench_normal.py options, e.g. --profile), BENCH_LL (default
# "2:256 8:256 8:288", ranks:experts) and BENCH_LL_ARGS (extra bench_low_latency.py options, e.g. --num-sms 264) pick the
# benchmarks.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_EP_TIMEOUT_S=${JAX_EP_TIMEOUT_S:-20}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PARTS=${PARTS:-normal flax ll bench_normal bench_ll}
CMDBUF="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
has() { [[ " $PARTS " == *" $1 "* ]]; }
if ls .whl/jax_ep-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/jax_ep-*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  cp /tmp/site/jax_ep/_C*.so jax_ep/   # the checkout's jax_ep shadows /tmp/site when run from the root
fi
RANKS=${RANKS_OVERRIDE:-${*:-2 4 8}}   # a variant env (ab_run.sh) may pin its own
{
  echo "commit: $(cat .dev/commit 2>/dev/null || git rev-parse HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -m jax_ep info 2>&1 | tail -3
} > "$OUT/summary.txt"
python3 benchmarks/hbm_copy.py > "$OUT/hbm.json"; cat "$OUT/hbm.json" >> "$OUT/summary.txt"
B=$(python3 -c "import json;print(json.load(open('$OUT/hbm.json'))['hbm_copy_bytes_per_s'])")
PEER=0
if has limits; then
  timeout 300 python3 benchmarks/peer_copy.py > "$OUT/peer.json" 2> "$OUT/peer.log"; echo "peer_copy exit $?" >> "$OUT/summary.txt"
  cat "$OUT/peer.json" >> "$OUT/summary.txt"
  PEER=$(python3 -c "import json;print(json.load(open('$OUT/peer.json')).get('sm_push_all_to_all',{}).get('bytes_per_s',0))" 2>/dev/null || echo 0)
fi
MP_TIMEOUT=${MP_TIMEOUT:-200}   # seconds per multi-rank check (the launcher gets 20 s less)
mp_check() {  # mp_check NAME R SCRIPT [XLA_FLAGS]
  local t0=$SECONDS rc
  XLA_FLAGS="${4:-}" JAX_EP_RESULT=$OUT/$1_R$2.json timeout "$MP_TIMEOUT" python3 -m jax_ep.launch --nproc "$2" \
    --timeout $((MP_TIMEOUT - 20)) -- python3 "$3" > "$OUT/$1_R$2.log" 2>&1
  rc=$?; echo "$1 R=$2 exit $rc ($((SECONDS - t0)) s)"; grep -E "checks passed|FAIL|Error|timed out" "$OUT/$1_R$2.log" | sort | uniq -c | head -12
}
{
if has normal; then
  timeout 240 python3 -m pytest -q tests/test_gpu_layout.py "tests/test_gpu_normal.py::test_single_process_matches_reference" -x -p no:cacheprovider 2>&1 | tail -3
  for R in $RANKS; do mp_check normal "$R" tests/gpu/mp_normal_check.py; done
  JAX_EP_TIMEOUT_S=3 timeout 150 python3 -m jax_ep.launch --nproc 2 --timeout 120 -- python3 tests/gpu/mp_timeout_check.py \
    > "$OUT/timeout_check.log" 2>&1
  echo "timeout check exit $? (0 = the waiting rank failed naming rank 1)"; grep -E "failed after|ERROR" "$OUT/timeout_check.log" | head -3
fi
if has pytest; then
  # PYTEST_CMDBUF=0: without XLA command buffers; PYTEST_FILES: a subset of tests/. The whole suite takes
  # ~9 minutes on one H200 (507 s for 63 tests on 2026-11-29, plus the R=8 normal check since): give it a
  # device call of its own, or split it with PYTEST_FILES.
  XLA_FLAGS="$([ "${PYTEST_CMDBUF:-1}" = 1 ] && echo "$CMDBUF")" timeout "${PYTEST_TIMEOUT:-575}" \
    python3 -m pytest -m gpu -v ${PYTEST_FILES:-tests} -p no:cacheprovider -rs --durations=25 > "$OUT/pytest.log" 2>&1
  echo "pytest -m gpu exit $?"; grep -E "PASSED|FAILED|ERROR|SKIPPED" "$OUT/pytest.log" | grep -v "^tests.*PASSED" | tail -20
  tail -3 "$OUT/pytest.log"
fi
if has flax; then
  XLA_FLAGS="$CMDBUF" timeout 240 python3 -m pytest -q tests/test_gpu_flax.py -p no:cacheprovider 2>&1 | tail -3
fi
if has normal_mp; then for R in $RANKS; do mp_check normal "$R" tests/gpu/mp_normal_check.py; done; fi
if has ll_mp; then for R in $RANKS; do mp_check ll "$R" tests/gpu/mp_low_latency_check.py "$CMDBUF"; done; fi
if has internode; then  # virtual nodes: R ranks as NVSHMEM PEs, N per node (R:N pairs)
  for cfg in ${INTERNODE:-4:2 8:4 8:2}; do
    set -- ${cfg/:/ }
    JAX_EP_RANKS_PER_NODE=$2 mp_check "internode_N$2" "$1" tests/gpu/mp_normal_check.py
  done
fi
if has ll; then
  timeout 240 python3 -m pytest -q tests/test_gpu_low_latency.py -k "single_process or third" -p no:cacheprovider 2>&1 | tail -15
  for R in $RANKS; do
    if [ "$R" = 8 ]; then mp_check ll "$R" tests/gpu/mp_low_latency_check.py "$CMDBUF"; else mp_check ll "$R" tests/gpu/mp_low_latency_check.py; fi
  done
fi
if has micro; then
  if [ -x .dev/row_scatter ]; then .dev/row_scatter > "$OUT/row_scatter.log" 2>&1; echo "row_scatter exit $?"; cat "$OUT/row_scatter.log";
  else echo "micro: no .dev/row_scatter (nvcc -O3 -std=c++17 -arch=sm_90 benchmarks/micro/row_scatter.cu -o .dev/row_scatter)"; fi
fi
if has micro_ipc; then  # the dispatch send's scatter across 8 processes: into peers' IPC mappings vs own memory
  for rb in 14336 7168; do
    JAX_EP_MPS_SM_PERCENT=100 timeout 150 python3 -m jax_ep.launch --nproc 8 --timeout 130 -- \
      python3 benchmarks/micro/ipc_scatter.py --row-bytes "$rb" > "$OUT/ipc_scatter_$rb.log" 2>&1
    echo "ipc_scatter row_bytes=$rb exit $?"; grep -E '^\{|Error' "$OUT/ipc_scatter_$rb.log" | head -8
  done
fi
if has micro_copy; then  # the low-latency combine send's row copy on one whole GPU (cupy): its pattern vs memcpy
  timeout 150 python3 benchmarks/micro/row_copy.py > "$OUT/row_copy.json" 2> "$OUT/row_copy.log"
  echo "row_copy exit $?"; cat "$OUT/row_copy.json"
fi
if has bench_normal; then
  for R in ${BENCH_NORMAL_RANKS:-8}; do
    # Normal-mode kernels never spin on a grid (one-block waits), so every rank may use every SM under MPS.
    JAX_EP_MPS_SM_PERCENT="${BENCH_NORMAL_SM_PERCENT:-100}" \
    timeout 220 python3 -m jax_ep.launch --nproc "$R" --timeout 200 -- python3 benchmarks/bench_normal.py \
      --hbm-bytes-per-s "$B" --peer-bytes-per-s "$PEER" --out "$OUT/bench_normal_R$R.json" --num-sms "${NUM_SMS:-0}" \
      ${BENCH_NORMAL_ARGS:-} \
      > "$OUT/bench_normal_R$R.log" 2>&1
    echo "bench_normal R=$R exit $?"; grep -E "BENCH|Error|timed out" "$OUT/bench_normal_R$R.log" | head -5
  done
fi
if has bench_internode; then  # DeepEP's internode configuration on virtual nodes: 8 ranks as nodes of N ranks,
  # each token's experts on the top min(nodes, 4) nodes (DeepEP's test_internode), fp8 and bf16 dispatch
  # Same SM share as bench_normal, so the two compare (the internode waits are one-block kernels too).
  for N in ${BENCH_RANKS_PER_NODE:-4 2}; do
    JAX_EP_MPS_SM_PERCENT="${BENCH_NORMAL_SM_PERCENT:-100}" timeout 220 python3 -m jax_ep.launch --nproc 8 --timeout 200 -- python3 benchmarks/bench_normal.py \
      --hbm-bytes-per-s "$B" --ranks-per-node "$N" --topk-groups 4 \
      --out "$OUT/bench_internode_R8_N$N.json" > "$OUT/bench_internode_R8_N$N.log" 2>&1
    echo "bench_internode R=8 N=$N exit $?"; grep -E "BENCH|Error|timed out" "$OUT/bench_internode_R8_N$N.log" | head -5
  done
fi
if has bench_ll; then
  for cfg in ${BENCH_LL:-2:256 8:256 8:288}; do
    set -- ${cfg/:/ }
    timeout 200 python3 -m jax_ep.launch --nproc "$1" --timeout 180 -- python3 benchmarks/bench_low_latency.py \
      --experts "$2" --hbm-bytes-per-s "$B" ${BENCH_LL_ARGS:-} --out "$OUT/bench_ll_R$1_E$2.json" > "$OUT/bench_ll_R$1_E$2.log" 2>&1
    echo "bench_ll R=$1 E=$2 exit $?"; grep -E "BENCH|Error|error|timed out" "$OUT/bench_ll_R$1_E$2.log" | head -5
  done
fi
if has sweep_mp; then  # the same sweep in the launcher harness: one rank per process (several per GPU under MPS)
  for R in ${SWEEP_RANKS:-8}; do
    timeout 420 python3 -m jax_ep.launch --nproc "$R" --timeout 400 -- python3 benchmarks/bench.py \
      --tokens "${SWEEP_TOKENS:-128,1024,4096}" --hidden 7168 --topk 8 --experts 256 --hbm-bytes-per-s "$B" \
      --no-progress --check --out "$OUT/sweep_mp_R$R.json" --plot > "$OUT/sweep_mp_R$R.log" 2>&1
    echo "sweep_mp R=$R exit $?"; grep -v -E "GRPC|WatchTasks" "$OUT/sweep_mp_R$R.log" | tail -30
  done
fi
if has sweep; then
  timeout 420 python3 benchmarks/bench.py --tokens "${SWEEP_TOKENS:-128,1024,4096}" --hidden 7168 --topk 8 --experts 256 \
    --hbm-bytes-per-s "$B" --no-progress --check --out "$OUT/sweep.json" --plot > "$OUT/sweep.log" 2>&1
  echo "sweep exit $?"; tail -40 "$OUT/sweep.log"
fi
} 2>&1 | tee -a "$OUT/summary.txt"
# At most 8 files come back from the device tool: the summary, and everything else in one archive.
(cd "$OUT" && tar czf all.tgz $(ls *.json *.log *.png 2>/dev/null) && rm -f *.json *.log *.png)
ls "$OUT"
