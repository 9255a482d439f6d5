#!/bin/bash
# Build every forward TU and fwd_check on a GPU machine, then: correctness, benchmark, compute-sanitizer
# (memcheck on small shapes, racecheck + synccheck on tiny ones), SASS facts. Logs go to $OUT (default ./fwd_out),
# at most 8 files.
#   CUTLASS_INC=<cutlass include dir>  (default: unpacked from .whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl)
#   FWD_ONLY="bf16_128x128 ..."        (default: all 12 (dtype, head dim) pairs)
#   STEPS="build check bench sanitize sass"  (default: all; "build" can run on a machine without a GPU, and the
#                                      other steps then reuse BUILD_DIR, e.g. carried to the GPU machine)
#   JOBS=16                            (parallel nvcc jobs)
#   SANITIZE="bf16_128x128 ..."        (kernels the sanitizers run; default: bf16_128x128 and the first of FWD_ONLY)
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$ROOT/fwd_out}
B=${BUILD_DIR:-/tmp/fa3fwd_build}
KS_ALL="bf16_64x64 bf16_96x96 bf16_128x128 bf16_192x192 bf16_256x256 bf16_192x128 fp16_64x64 fp16_96x96 fp16_128x128 fp16_192x192 fp16_256x256 fp16_192x128"
KS=${FWD_ONLY:-$KS_ALL}
STEPS=${STEPS:-"build check bench sanitize sass"}
JOBS=${JOBS:-16}
mkdir -p "$B/k" "$OUT"
if [[ " $STEPS " == *" build "* ]]; then
if [ -z "${CUTLASS_INC:-}" ]; then
  python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
    "$ROOT/.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl" "$B/cutlass" || exit 1
  CUTLASS_INC=$B/cutlass/cutlass_library/source/include
fi
FLAGS="-gencode arch=compute_90a,code=sm_90a -O3 --use_fast_math --expt-relaxed-constexpr --expt-extended-lambda
 -std=c++17 -DNDEBUG -DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED -DCUTLASS_ENABLE_GDC_FOR_SM90 -DCUTLASS_DEBUG_TRACE_LEVEL=0
 -lineinfo -Xptxas=-v -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_HALF2_OPERATORS__
 -U__CUDA_NO_BFLOAT16_CONVERSIONS__ -I$ROOT/cuda/include -I$B -I$CUTLASS_INC -I$CUTLASS_INC/../tools/util/include"
list="#define FA3_JAX_FWD_KERNELS(X)"
for kname in $KS; do
  dt=${kname%%_*}; dims=${kname#*_}; d=${dims%x*}; dv=${dims#*x}
  el=cutlass::bfloat16_t; [ "$dt" = fp16 ] && el=cutlass::half_t
  sed -e "s/@FA3_ELEMENT@/$el/" -e "s/@FA3_HDIM@/$d/" -e "s/@FA3_HDIMV@/$dv/" "$ROOT/cuda/kernels/fwd.cu.in" > "$B/k/fwd_$kname.cu"
done

export FLAGS B; rm -f "$B/times.txt" "$B"/k/*.o
t0=$(date +%s)
printf '%s\n' $KS | xargs -P $JOBS -I{} bash -c 's=$(date +%s.%N); nvcc $FLAGS -c $B/k/fwd_{}.cu -o $B/k/fwd_{}.o > $B/k/fwd_{}.log 2>&1; rc=$?; e=$(date +%s.%N); echo "TU fwd_{} rc=$rc $(awk "BEGIN{print $e - $s}") s" >> $B/times.txt'
# Only the TUs that compiled go into the kernel list: one broken instantiation must not hide the others' results.
for kname in $KS; do
  [ -f "$B/k/fwd_$kname.o" ] || { echo "TU fwd_$kname FAILED to compile"; continue; }
  dt=${kname%%_*}; dims=${kname#*_}; d=${dims%x*}; dv=${dims#*x}
  el=cutlass::bfloat16_t; [ "$dt" = fp16 ] && el=cutlass::half_t
  list="$list X($el, $dt, $d, $dv)"; objs="${objs:-} $B/k/fwd_$kname.o"
done
printf '#pragma once\n%s\n#define FA3_JAX_BWD_KERNELS(X)\n' "$list" > "$B/fa3_kernel_list.h"
nvcc $FLAGS -c "$ROOT/cuda/tests/fwd_check.cu" -o "$B/fwd_check.o" > "$B/check_build.log" 2>&1 &&
  nvcc -gencode arch=compute_90a,code=sm_90a "$B/fwd_check.o" $objs -o "$B/fwd_check" >> "$B/check_build.log" 2>&1
echo "build wall time: $(( $(date +%s) - t0 )) s" >> "$B/times.txt"
{ cat "$B/times.txt"; for f in $B/k/*.log; do echo "== $f"; grep -v "^$" "$f" | grep -iv "bytes gmem\|Compile time\|Function properties" ; done; cat "$B/check_build.log"; } > "$OUT/build.log" 2>&1
grep -h "rc=\|wall\|registers\|spill\|C75\|error" "$OUT/build.log" | head -80
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
    cuobjdump -sass "$B/k/fwd_$kname.o" > "$B/sass_$kname.txt" 2>/dev/null
    echo "$kname: $(grep -c HGMMA "$B/sass_$kname.txt") HGMMA [$(grep -o 'HGMMA\.[0-9x]*' "$B/sass_$kname.txt" | sort | uniq -c | tr '\n' ' ')] LDL/STL: $(grep -c 'LDL\|STL' "$B/sass_$kname.txt") MUFU.EX2: $(grep -c MUFU.EX2 "$B/sass_$kname.txt") USETMAXREG: $(grep -c USETMAXREG "$B/sass_$kname.txt") WARPGROUP.DEPBAR: $(grep -c WARPGROUP.DEPBAR "$B/sass_$kname.txt")"
  done > "$OUT/sass.txt"; cat "$OUT/sass.txt"
  k1=$(echo $KS | awk '{print $1}'); cp "$B/sass_bf16_128x128.txt" "$OUT/sass_bf16_128x128.txt" 2>/dev/null || cp "$B/sass_$k1.txt" "$OUT/" ;;
esac; done
