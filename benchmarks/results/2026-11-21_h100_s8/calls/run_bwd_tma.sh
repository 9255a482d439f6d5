#!/bin/bash
# Prepared in session 7 for session 8 (not run yet): main (2460381) vs tma (wip/bwd-tma-store-epilogue, ba6fef6);
# correctness + sanitizers on tma. Trees: .bwdtmp/s8/{main,tma}/cuda (git archive). Carry .whl/nvidia_cutlass... + .bwdtmp/s8.
set -o pipefail
REPO=$(pwd); OUT=${OUT:-/tmp/out}; mkdir -p $OUT; T00=$(date +%s)
el() { echo "[$(( $(date +%s) - T00 ))s] $*"; }
mkdir -p /tmp/cut && python3 -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); [z.extract(n,'/tmp/cut') for n in z.namelist() if n.startswith(('cutlass_library/source/include/','cutlass_library/source/tools/util/include/'))]" $REPO/.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl
CUT=/tmp/cut/cutlass_library/source
export BASEF="-gencode arch=compute_90a,code=sm_90a -O3 --use_fast_math --expt-relaxed-constexpr --expt-extended-lambda -std=c++17 -DNDEBUG -DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED -DCUTLASS_ENABLE_GDC_FOR_SM90 -DCUTLASS_DEBUG_TRACE_LEVEL=0 -lineinfo -Xptxas=-v -I$CUT/include -I$CUT/tools/util/include -I$REPO/third_party/xla_ffi_0.11.0"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee $OUT/log.txt
rm -f /tmp/jobs
prep() {  # $1 dir, $2 include root, $3 "dt:hd ..."
  local B=$1 LIST="#pragma once
#define FA3_JAX_BWD_KERNELS(X)"; mkdir -p $B
  for c in $3; do dt=${c%:*}; hd=${c#*:}; d=${hd%x*}; dv=${hd#*x}
    [ $dt = bf16 ] && EL=cutlass::bfloat16_t || EL=cutlass::half_t
    sed -e "s/@FA3_ELEMENT@/$EL/" -e "s/@FA3_HDIM@/$d/" -e "s/@FA3_HDIMV@/$dv/" $REPO/cuda/kernels/bwd.cu.in > $B/bwd_${dt}_$hd.cu
    LIST="$LIST X($EL, $dt, $d, $dv)"; echo "$B/bwd_${dt}_$hd.cu $2 $B/bwd_${dt}_$hd.o" >> /tmp/jobs
  done
  echo "$LIST" > $B/fa3_kernel_list.h
  echo "$REPO/cuda/tests/bwd_check.cu $2 $B/check.o" >> /tmp/jobs
  echo "$REPO/cuda/ffi/bwd.cu $2 $B/ffi.o" >> /tmp/jobs
}
S7=$REPO/.bwdtmp/s8
prep /tmp/main $S7/main/cuda/include "bf16:128x128 bf16:256x256 bf16:64x64"
prep /tmp/tma $S7/tma/cuda/include "bf16:128x128 fp16:128x128 bf16:256x256 bf16:64x64 bf16:96x96 bf16:192x192 bf16:192x128"
V="main tma"
{ grep -E "/bwd_(bf16|fp16)_(256|192)" /tmp/jobs; grep -E "/bwd_(bf16|fp16)_" /tmp/jobs | grep -vE "_(256|192)"; grep -vE "/bwd_(bf16|fp16)_" /tmp/jobs; } | xargs -P 16 -L 1 bash -c 'nvcc $BASEF -I$1 -I$(dirname $2) -Xcompiler -fopenmp -c $0 -o $2 > $2.log 2>&1 || { echo "FAILED $0 -> $2"; grep -m5 error $2.log; }'
for B in $V; do nvcc -gencode arch=compute_90a,code=sm_90a -Xcompiler -fopenmp /tmp/$B/check.o /tmp/$B/ffi.o /tmp/$B/bwd_*.o -lgomp -o /tmp/$B/bwd_check || echo "LINK FAILED $B"; done
for B in $V; do for f in /tmp/$B/bwd_*.o.log; do echo "$B $(basename $f) $(grep -A2 'Function properties for .*bwd_kernel' $f | grep -E 'spill|Used' | tr -s ' ' | tr '\n' ' ')"; grep -iE "C75" $f; done; done | tee $OUT/ptxas.txt
el built | tee -a $OUT/log.txt
bench() { for c in $2; do for v in $1; do timeout 20 /tmp/$v/bwd_check --bench-case $c 2>&1 | grep -E "^bench|HANG|error" | sed "s/^/$v /"; done; done | tee -a $OUT/bench.txt; }
CASES="128,2048,1,0 128,4096,1,0 128,8192,1,0 128,2048,0,0 128,8192,0,0 256,2048,1,0 256,4096,1,0 256,8192,0,0 64,2048,1,0"
for r in 1 2 3; do bench "main tma" "$CASES"; done
el bench | tee -a $OUT/log.txt
mkdir -p /tmp/profout
cd /tmp/tma
for hd in 128 256 64 96 192x192 192x128; do OMP_NUM_THREADS=16 timeout 60 ./bwd_check --hd $hd 2>&1 | grep -vE "^ok " | tail -4 | sed "s/^/hd=$hd /" | tee -a $OUT/check_tma.txt; done
el check | tee -a $OUT/log.txt
timeout 60 compute-sanitizer --tool memcheck ./bwd_check --sanitize --hd 128 2>&1 | tail -4 | tee $OUT/san.txt
timeout 60 compute-sanitizer --tool memcheck ./bwd_check --sanitize --hd 256 2>&1 | tail -4 | tee -a $OUT/san.txt
timeout 60 compute-sanitizer --tool memcheck ./bwd_check --sanitize --hd 96 2>&1 | tail -4 | tee -a $OUT/san.txt
timeout 40 compute-sanitizer --tool racecheck ./bwd_check --sanitize --hd 128 2>&1 | tail -4 | tee -a $OUT/san.txt
el sanitize | tee -a $OUT/log.txt
cd /tmp
NCU="ncu --clock-control none --metrics gpu__time_duration.sum --csv"
for c in 128,2048,1,0 256,2048,1,0; do timeout 40 $NCU --launch-skip 6 --launch-count 3 /tmp/tma/bwd_check --bench-case $c > /tmp/profout/ncu_tma_${c//,/_}.csv 2>&1; done
el ncu-tma | tee -a $OUT/log.txt
tar czf $OUT/prof.tgz -C /tmp/profout .
cat $OUT/check_tma.txt $OUT/san.txt > $OUT/checks.txt; rm -f $OUT/check_tma.txt $OUT/san.txt
el done | tee -a $OUT/log.txt
