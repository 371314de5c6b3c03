#!/usr/bin/env bash
# One whole GPU pass on the device machine (correctness + benchmark), logs and JSON under $OUT.
# Usage (repo root there): bash benchmarks/device_run.sh [ranks...]   (default: 2 4 8)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_EP_TIMEOUT_S=${JAX_EP_TIMEOUT_S:-20}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/jax_ep-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/jax_ep-*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  cp /tmp/site/jax_ep/_C*.so jax_ep/   # the checkout's jax_ep shadows /tmp/site when run from the root
fi
RANKS=${*:-2 4 8}
{
  echo "commit: $(cat .dev/commit 2>/dev/null || git rev-parse HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -m jax_ep info 2>&1 | tail -3
} | tee "$OUT/env.txt"
python3 benchmarks/hbm_copy.py | tee "$OUT/hbm.json"
B=$(python3 -c "import json;print(json.load(open('$OUT/hbm.json'))['hbm_copy_bytes_per_s'])")
timeout 240 python3 -m pytest -q tests/test_gpu_layout.py "tests/test_gpu_normal.py::test_single_process_matches_reference" -x -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest_gpu_single.txt"
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1" \
  timeout 240 python3 -m pytest -q tests/test_gpu_flax.py -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/pytest_gpu_flax.txt"
for R in $RANKS; do
  JAX_EP_RESULT=$OUT/check_R$R.json timeout 170 python3 -m jax_ep.launch --nproc "$R" --timeout 150 -- \
    python3 tests/gpu/mp_normal_check.py > "$OUT/check_R$R.log" 2>&1
  echo "R=$R check exit $?"; grep -E "checks passed|FAIL|Error|timed out" "$OUT/check_R$R.log" | sort | uniq -c | head -20
done
JAX_EP_TIMEOUT_S=3 timeout 150 python3 -m jax_ep.launch --nproc 2 --timeout 120 -- python3 tests/gpu/mp_timeout_check.py \
  > "$OUT/timeout_check.log" 2>&1
echo "timeout check exit $? (0 = the waiting rank failed naming rank 1)"; grep -E "failed after|ERROR" "$OUT/timeout_check.log" | head -3
if [ "${BENCH:-1}" != 0 ]; then
  timeout 220 python3 -m jax_ep.launch --nproc 8 --timeout 200 -- python3 benchmarks/bench_normal.py \
    --hbm-bytes-per-s "$B" --out "$OUT/bench_R8.json" --num-sms "${NUM_SMS:-0}" > "$OUT/bench_R8.log" 2>&1
  echo "bench exit $?"; grep -E "BENCH|Error|timed out" "$OUT/bench_R8.log" | head -5
fi
