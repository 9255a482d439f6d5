#!/bin/bash
# Build the forward TUs and fwd_check (CMake target, FA3_JAX_BUILD_CHECKS) on a GPU machine, then: correctness, benchmark, compute-sanitizer
# (memcheck on small shapes, racecheck + synccheck on tiny ones), SASS facts. Logs go to $OUT (default ./fwd_out),
# at most 8 files.
#   CUTLASS_INC=<cutlass include dir>  (default: unpacked from .whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl)
#   FWD_ONLY="bf16_128x128 ..."        (default: all 12 (dtype, head dim) pairs)
#   STEPS="build check bench sanitize sass"  (default: all; "build" can run on a machine without a GPU, and the
#                                      other steps then reuse BUILD_DIR, e.g. carried to the GPU machine)
#   JOBS=16                            (parallel nvcc jobs)   BUILD_DIR: the CMake build folder
#   SANITIZE="bf16_128x128 ..."        (kernels the sanitizers run; default: bf16_128x128 and the first of FWD_ONLY)
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$ROOT/fwd_out}
B=${BUILD_DIR:-/tmp/fa3fwd_build}
KS_ALL="bf16_64x64 bf16_96x96 bf16_128x128 bf16_192x192 bf16_256x256 bf16_192x128 fp16_64x64 fp16_96x96 fp16_128x128 fp16_192x192 fp16_256x256 fp16_192x128"
KS=${FWD_ONLY:-$KS_ALL}
STEPS=${STEPS:-"build check bench sanitize sass"}
JOBS=${JOBS:-16}
mkdir -p "$B" "$OUT"
if [[ " $STEPS " == *" build "* ]]; then
if [ -z "${CUTLASS_INC:-}" ]; then
  python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
    "$ROOT/.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl" "$B/cutlass" || exit 1
  CUTLASS_INC=$B/cutlass/cutlass_library/source/include
fi
# The kernels and fwd_check through CMake (target fwd_check, FA3_JAX_BUILD_CHECKS): the extension's flags and
# instantiations. The (dtype, head dim) pairs of $KS become CMake's dtype and head-dim lists (their product).
dtypes=$(printf '%s\n' $KS | sed 's/_.*//' | sort -u | paste -sd';')
dims=$(printf '%s\n' $KS | sed 's/^[a-z0-9]*_//; s/^\([0-9]*\)x\1$/\1/' | sort -u | paste -sd';')
t0=$(date +%s)
cmake -S "$ROOT" -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFA3_JAX_CUDA=ON -DFA3_JAX_BUILD_CHECKS=ON \
  -DFA3_JAX_DIRECTIONS=fwd -DFA3_JAX_DTYPES="$dtypes" -DFA3_JAX_HEAD_DIMS="$dims" \
  -DFA3_JAX_CUTLASS_INCLUDE_DIR="$CUTLASS_INC" -DPython_EXECUTABLE="$(command -v python3)" > "$OUT/build.log" 2>&1 &&
  ninja -C "$B" -j "$JOBS" fwd_check >> "$OUT/build.log" 2>&1
echo "build wall time: $(( $(date +%s) - t0 )) s" >> "$OUT/build.log"
grep -h "error\|wall\|registers\|spill\|C75" "$OUT/build.log" | head -80
fi  # build
[ -x "$B/fwd_check" ] || { echo "BUILD FAILED"; tail -50 "$OUT/build.log"; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1

for step in $STEPS; do case $step in
check) timeout 300 "$B/fwd_check" --no-bench > "$OUT/check.log" 2>&1; echo "check rc=$?"; grep -c "^ok" "$OUT/check.log"; grep "FAIL\|correctness\|error" "$OUT/check.log" | head -40 ;;
bench) timeout 120 "$B/fwd_check" --bench-only > "$OUT/bench.log" 2>&1; echo "bench rc=$?"; cat "$OUT/bench.log" ;;
sanitize)
  SAN=${SANITIZE:-$(printf '%s\n' bf16_128x128 $(echo $KS | awk '{print $1}') | sort -u)}
  for kn in $SAN; do
    { timeout 100 compute-sanitizer --tool memcheck "$B/fwd_check" --small --no-bench --filter $kn; echo "memcheck $kn rc=$?"
      timeout 100 compute-sanitizer --tool racecheck "$B/fwd_check" --tiny --no-bench --filter $kn; echo "racecheck $kn rc=$?"
      timeout 100 compute-sanitizer --tool synccheck "$B/fwd_check" --tiny --no-bench --filter $kn; echo "synccheck $kn rc=$?"
    } > "$OUT/sanitizer.log.$kn" 2>&1 &
  done
  wait
  cat $OUT/sanitizer.log.* > "$OUT/sanitizer.log"; rm -f $OUT/sanitizer.log.*
  grep -h "rc=\|ERROR SUMMARY\|RACECHECK SUMMARY\|correctness" "$OUT/sanitizer.log" ;;
sass)
  for kname in $KS; do
    cuobjdump -sass "$B/CMakeFiles/fa3_kernels.dir/kernels/fwd_$kname.cu.o" > "$B/sass_$kname.txt" 2>/dev/null
    echo "$kname: $(grep -c HGMMA "$B/sass_$kname.txt") HGMMA [$(grep -o 'HGMMA\.[0-9x]*' "$B/sass_$kname.txt" | sort | uniq -c | tr '\n' ' ')] LDL/STL: $(grep -c 'LDL\|STL' "$B/sass_$kname.txt") MUFU.EX2: $(grep -c MUFU.EX2 "$B/sass_$kname.txt") USETMAXREG: $(grep -c USETMAXREG "$B/sass_$kname.txt") WARPGROUP.DEPBAR: $(grep -c WARPGROUP.DEPBAR "$B/sass_$kname.txt")"
  done > "$OUT/sass.txt"; cat "$OUT/sass.txt"
  k1=$(echo $KS | awk '{print $1}'); cp "$B/sass_bf16_128x128.txt" "$OUT/sass_bf16_128x128.txt" 2>/dev/null || cp "$B/sass_$k1.txt" "$OUT/" ;;
esac; done
