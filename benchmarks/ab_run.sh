#!/usr/bin/env bash
# A/B pass on the device: for every variant built by benchmarks/ab_build.sh (.dev/variants/NAME/), copy the
# checkout, apply the variant's patch (its Python changes included), drop in its extension and run
# benchmarks/device_run.sh there. Results: $OUT/NAME/{summary.txt,all.tgz}.
# Usage (repo root on the device, .dev carried): PARTS="ll bench_ll" bash benchmarks/ab_run.sh [ranks...]
# VARIANTS picks and orders the variants. A variant dir may hold so_from (another variant's name: use its build,
# with this variant's env) instead of its own extension. Every variant runs the carried checkout's Python: an
# extension built from an older commit fails where the FFI calls changed since (build the base from HEAD).
# A variant's env file (one NAME=value per line) may set its own PARTS, overriding the outer one.
set -uo pipefail
OUT=${OUT:-/tmp/out}
ROOT=$(pwd)
for name in ${VARIANTS:-$(ls "$ROOT"/.dev/variants)}; do   # VARIANTS="a b": only these, in this order
  dir="$ROOT/.dev/variants/$name/"
  work=/tmp/ab_${name}_$$   # per run: two runs of one variant (one per GPU) must not share a copy
  rm -rf "$work" && mkdir -p "$work"
  (cd "$ROOT" && tar cf - --exclude=./.dev/variants --exclude=./.whl .) | (cd "$work" && tar xf -)
  patch=$(cat "$dir/patch" 2>/dev/null || true)
  if [ -n "$patch" ]; then
    (cd "$work" && (git apply "$patch" 2>/dev/null || patch -s -p1 < "$patch")) || { echo "$name: patch failed"; rm -rf "$work"; continue; }
  fi
  so_dir=$dir; [ -f "$dir/so_from" ] && so_dir="$ROOT/.dev/variants/$(cat "$dir/so_from")/"   # a variant may reuse another's build
  cp "$so_dir"/_C*.so "$work/jax_ep/"
  mkdir -p "$work/.dev" && echo "$(cat "$dir/commit" 2>/dev/null) + ${patch:-no patch} (variant $name)" > "$work/.dev/commit"
  env_lines=$(grep -v '^$' "$dir/env" 2>/dev/null | tr '\n' ' ' || true)
  echo "=== variant $name (commit $(cat "$dir/commit" 2>/dev/null), patch: ${patch:-none}, env: ${env_lines:-none}) ==="
  (cd "$work" && while IFS= read -r line; do [ -z "$line" ] || export "$line"; done < <(cat "$dir/env" 2>/dev/null) \
     && OUT="$OUT/$name" bash benchmarks/device_run.sh "$@" 2>&1 | grep -v -E "GRPC|WatchTasks|UNAVAILABLE" | tail -40)
  rm -rf "$work"
done
