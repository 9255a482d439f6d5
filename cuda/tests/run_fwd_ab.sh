#!/bin/bash
# Forward A/B on a GPU machine: build fwd_check from several source trees and time them in interleaved rounds (the
# GPU's clock and the machine drift by a few per cent between runs; interleaving pairs each round's cells).
#   cuda/tests/run_fwd_ab.sh TREE...   each TREE a source tree (cuda/, third_party/, CMakeLists.txt: a git worktree,
#                                     or a copy carried to the device); the first is the baseline; variant name =
#                                     basename of TREE
#   FWD_ONLY="bf16_64x64 ..."  kernels (default bf16_64x64 bf16_128x128)   ROUNDS=5   JOBS (nvcc jobs per tree, 8)
# Writes $OUT/bench.txt (every round), $OUT/summary.txt (cuda/tests/fwd_ab.py) and build logs; run from the
# repository root (CUTLASS comes from .whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl).
set -uo pipefail
REPO=$(pwd); OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ $# -ge 2 ] || { echo "usage: $0 BASELINE_TREE VARIANT_TREE..."; exit 2; }
mkdir -p /tmp/cut && python3 -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); [z.extract(n,'/tmp/cut') for n in z.namelist() if n.startswith(('cutlass_library/source/include/','cutlass_library/source/tools/util/include/'))]" "$REPO/.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader > "$OUT/gpu.txt"
for tree in "$@"; do
  name=$(basename "$tree")
  OUT=/tmp/fwd_ab_logs/$name BUILD_DIR=/tmp/fwd_ab_build/$name CUTLASS_INC=/tmp/cut/cutlass_library/source/include \
    FWD_ONLY="${FWD_ONLY:-bf16_64x64 bf16_128x128}" JOBS=${JOBS:-8} STEPS=build \
    bash "$tree/cuda/tests/run_fwd_check.sh" > "$OUT/build_$name.txt" 2>&1 &
done
wait
for tree in "$@"; do
  name=$(basename "$tree")
  [ -x "/tmp/fwd_ab_build/$name/fwd_check" ] || { echo "$name: BUILD FAILED"; tail -20 "$OUT/build_$name.txt"; exit 1; }
  echo "$name: $(grep -h 'spill' "$OUT/build_$name.txt" | grep -v ' 0 bytes spill' | sort -u | tr -s ' ' | tr '\n' ';')"
done
rm -f "$OUT/bench.txt"
for r in $(seq 1 "${ROUNDS:-5}"); do
  for tree in "$@"; do
    name=$(basename "$tree")
    timeout 200 "/tmp/fwd_ab_build/$name/fwd_check" --bench-only 2>&1 | grep "TFLOP/s" | sed "s/^/$name r$r /" >> "$OUT/bench.txt"
  done
done
python3 "$REPO/cuda/tests/fwd_ab.py" "$OUT/bench.txt" | tee "$OUT/summary.txt"
