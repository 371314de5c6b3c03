#!/usr/bin/env bash
# Build the extension for an A/B device run: one variant per call, the checkout plus an optional pending
# patch, compiled here (the device machine may have no nvcc) into .dev/variants/NAME/.
# Usage (repo root, a Python with jax < 0.11 and nanobind for the build): 
#   PYTHON=/path/to/python3.12 bash benchmarks/ab_build.sh base
#   PYTHON=/path/to/python3.12 bash benchmarks/ab_build.sh split-waits docs/pending/split-waits.patch
#   PYTHON=... bash benchmarks/ab_build.sh nvshmem docs/pending/nvshmem-transport.patch JAX_EP_TRANSPORT=nvshmem
# (arguments after the patch: environment settings the variant runs with)
# Then on the device: PARTS="..." bash benchmarks/ab_run.sh 2 8   (carry .dev).
set -euo pipefail
NAME=${1:?variant name}
PATCH=${2:-}
shift $(( $# < 2 ? $# : 2 ))
PYTHON=${PYTHON:-python3}
ROOT=$(pwd)
WORK=$(mktemp -d /tmp/ab_build_XXXX)
git worktree add -q --detach "$WORK" HEAD
trap 'git -C "$ROOT" worktree remove --force "$WORK"' EXIT
if [ -n "$PATCH" ]; then git -C "$WORK" apply "$ROOT/$PATCH"; fi
"$PYTHON" -m pip wheel -q --no-deps -w "$WORK/.whl" "$WORK"
OUTDIR="$ROOT/.dev/variants/$NAME"
rm -rf "$OUTDIR" && mkdir -p "$OUTDIR"
(cd "$OUTDIR" && "$PYTHON" -m zipfile -e "$WORK"/.whl/jax_ep-*.whl unpacked && mv unpacked/jax_ep/_C*.so . && rm -rf unpacked)
echo "${PATCH}" > "$OUTDIR/patch"
printf '%s\n' "$@" > "$OUTDIR/env"
git -C "$ROOT" rev-parse --short HEAD > "$OUTDIR/commit"
ls -la "$OUTDIR"
