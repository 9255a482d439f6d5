#!/bin/bash
# Session 8: store_tile_rows helper (tile) vs main. fwd_check + bwd_check at d=64 / 128 (+ fwd 256: one CTA per tile),
# correctness + memcheck on tile, 3 interleaved benchmark rounds. Carry .whl/nvidia_cutlass... + .bwdtmp/s10.
set -o pipefail
REPO=$(pwd); OUT=${OUT:-/tmp/out}; mkdir -p $OUT; T00=$(date +%s); S=$REPO/.bwdtmp/s10
el() { echo "[$(( $(date +%s) - T00 ))s] $*"; }
mkdir -p /tmp/cutf && python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" $REPO/.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl /tmp/cutf
export CUTLASS_INC=/tmp/cutf/cutlass_library/source/include CUT=/tmp/cutf/cutlass_library/source
export BASEF="-gencode arch=compute_90a,code=sm_90a -O3 --use_fast_math --expt-relaxed-constexpr --expt-extended-lambda -std=c++17 -DNDEBUG -DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED -DCUTLASS_ENABLE_GDC_FOR_SM90 -DCUTLASS_DEBUG_TRACE_LEVEL=0 -lineinfo -Xptxas=-v -I$CUT/include -I$CUT/tools/util/include -I$REPO/third_party/xla_ffi_0.11.0"
rm -f /tmp/jobs
for t in main tile; do
  B=/tmp/bw_$t; mkdir -p $B; LIST="#pragma once
#define FA3_JAX_BWD_KERNELS(X)"
  for hd in 128x128 64x64; do d=${hd%x*}
    sed -e "s/@FA3_ELEMENT@/cutlass::bfloat16_t/" -e "s/@FA3_HDIM@/$d/" -e "s/@FA3_HDIMV@/$d/" $REPO/cuda/kernels/bwd.cu.in > $B/bwd_bf16_$hd.cu
    LIST="$LIST X(cutlass::bfloat16_t, bf16, $d, $d)"; echo "$B/bwd_bf16_$hd.cu $S/$t/cuda/include $B/bwd_bf16_$hd.o" >> /tmp/jobs
  done
  echo "$LIST" > $B/fa3_kernel_list.h
  echo "$REPO/cuda/tests/bwd_check.cu $S/$t/cuda/include $B/check.o" >> /tmp/jobs
  echo "$REPO/cuda/ffi/bwd.cu $S/$t/cuda/include $B/ffi.o" >> /tmp/jobs
done
( cat /tmp/jobs | xargs -P 8 -L 1 bash -c 'nvcc $BASEF -I$1 -I$(dirname $2) -Xcompiler -fopenmp -c $0 -o $2 > $2.log 2>&1 || { echo "FAILED $0 -> $2"; grep -m5 error $2.log; }' ) &
for t in main tile; do
  OUT=/tmp/fw_$t BUILD_DIR=/tmp/fwb_$t FWD_ONLY="bf16_128x128 bf16_64x64 bf16_256x256" JOBS=3 STEPS="build" bash $S/$t/cuda/tests/run_fwd_check.sh > /tmp/fwbuild_$t.txt 2>&1 &
done
wait
for t in main tile; do nvcc -gencode arch=compute_90a,code=sm_90a -Xcompiler -fopenmp /tmp/bw_$t/check.o /tmp/bw_$t/ffi.o /tmp/bw_$t/bwd_*.o -lgomp -o /tmp/bw_$t/bwd_check || echo "LINK FAILED $t"; done
el built | tee -a $OUT/log.txt
{ grep -h "spill" /tmp/fwbuild_*.txt | sort | uniq -c; for t in main tile; do for f in /tmp/bw_$t/bwd_*.o.log; do echo "$t $(basename $f) $(grep -A2 'Function properties for .*bwd_kernel' $f | grep spill | tr -s ' ')"; done; done; } | tee -a $OUT/log.txt
for r in 1 2 3; do for t in main tile; do
  timeout 60 /tmp/fwb_$t/fwd_check --bench-only 2>&1 | grep -i "tflop" | sed "s/^/$t r$r /" >> $OUT/bench.txt
  for c in 128,2048,1,0 128,8192,0,0 64,2048,1,0; do timeout 20 /tmp/bw_$t/bwd_check --bench-case $c 2>&1 | grep -E "^bench|error" | sed "s/^/$t r$r /" >> $OUT/bench.txt; done
done; done
el bench | tee -a $OUT/log.txt
timeout 150 /tmp/fwb_tile/fwd_check --no-bench > /tmp/fcheck.txt 2>&1; echo "fwd_check tile rc=$?" | tee -a $OUT/log.txt; grep -i "correctness" /tmp/fcheck.txt | tee -a $OUT/log.txt
for hd in 128 64; do OMP_NUM_THREADS=16 timeout 60 /tmp/bw_tile/bwd_check --hd $hd 2>&1 | grep -E "SUMMARY|cases" | sed "s/^/hd=$hd /" | tee -a $OUT/log.txt; done
el check | tee -a $OUT/log.txt
timeout 60 compute-sanitizer --tool memcheck /tmp/bw_tile/bwd_check --sanitize --hd 128 2>&1 | tail -2 | tee -a $OUT/log.txt
timeout 60 compute-sanitizer --tool memcheck /tmp/bw_tile/bwd_check --sanitize --hd 64 2>&1 | tail -2 | tee -a $OUT/log.txt
for kn in bf16_128x128 bf16_256x256; do timeout 60 compute-sanitizer --tool memcheck /tmp/fwb_tile/fwd_check --small --no-bench --filter $kn 2>&1 | tail -2 | tee -a $OUT/log.txt; done
el done | tee -a $OUT/log.txt
