#!/bin/bash
# Session 9: backward d=256 with double-buffered P / dS (one consumer barrier less per iteration) vs main.
set -o pipefail
REPO=$(pwd); OUT=${OUT:-/tmp/out}; mkdir -p $OUT; T00=$(date +%s); S=$REPO/.bwdtmp/s14
el() { echo "[$(( $(date +%s) - T00 ))s] $*"; }
mkdir -p /tmp/cut && python3 -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); [z.extract(n,'/tmp/cut') for n in z.namelist() if n.startswith(('cutlass_library/source/include/','cutlass_library/source/tools/util/include/'))]" $REPO/.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl
CUT=/tmp/cut/cutlass_library/source
export BASEF="-gencode arch=compute_90a,code=sm_90a -O3 --use_fast_math --expt-relaxed-constexpr --expt-extended-lambda -std=c++17 -DNDEBUG -DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED -DCUTLASS_ENABLE_GDC_FOR_SM90 -DCUTLASS_DEBUG_TRACE_LEVEL=0 -lineinfo -Xptxas=-v -I$CUT/include -I$CUT/tools/util/include -I$REPO/third_party/xla_ffi_0.11.0"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee $OUT/log.txt
rm -f /tmp/jobs
prep() {  # $1 build dir, $2 tree, $3 "dt:hd ..."
  local B=$1 T=$2 LIST="#pragma once
#define FA3_JAX_BWD_KERNELS(X)"; mkdir -p $B
  for c in $3; do dt=${c%:*}; hd=${c#*:}; d=${hd%x*}; dv=${hd#*x}
    [ $dt = bf16 ] && EL=cutlass::bfloat16_t || EL=cutlass::half_t
    sed -e "s/@FA3_ELEMENT@/$EL/" -e "s/@FA3_HDIM@/$d/" -e "s/@FA3_HDIMV@/$dv/" $T/cuda/kernels/bwd.cu.in > $B/bwd_${dt}_$hd.cu
    LIST="$LIST X($EL, $dt, $d, $dv)"; echo "$B/bwd_${dt}_$hd.cu $T/cuda/include $B/bwd_${dt}_$hd.o" >> /tmp/jobs
  done
  echo "$LIST" > $B/fa3_kernel_list.h
  echo "$T/cuda/tests/bwd_check.cu $T/cuda/include $B/check.o" >> /tmp/jobs
  echo "$T/cuda/ffi/bwd.cu $T/cuda/include $B/ffi.o" >> /tmp/jobs
}
prep /tmp/bmain $S/main "bf16:256x256"
prep /tmp/bpds $S/pds "bf16:256x256 fp16:256x256"
cat /tmp/jobs | xargs -P 14 -L 1 bash -c 'nvcc $BASEF -I$1 -I$(dirname $2) -Xcompiler -fopenmp -c $0 -o $2 > $2.log 2>&1 || { echo "FAILED $0 -> $2"; grep -m5 error $2.log; }'
for B in bmain bpds; do nvcc -gencode arch=compute_90a,code=sm_90a -Xcompiler -fopenmp /tmp/$B/check.o /tmp/$B/ffi.o /tmp/$B/bwd_*.o -lgomp -o /tmp/$B/bwd_check || echo "LINK FAILED $B"; done
for B in bmain bpds; do for f in /tmp/$B/bwd_*.o.log; do echo "$B $(basename $f) $(grep -A2 'Function properties for .*bwd_kernel' $f | grep -E 'spill|Used|smem' | tr -s ' ' | tr '\n' ' ')"; done; done | tee $OUT/ptxas.txt
el built | tee -a $OUT/log.txt
CASES="256,2048,1,0 256,4096,1,0 256,8192,1,0 256,2048,0,0 256,8192,0,0 256,8192,1,1"
for r in 1 2 3; do for c in $CASES; do for v in bmain bpds; do timeout 20 /tmp/$v/bwd_check --bench-case $c 2>&1 | grep -E "^bench|HANG|error" | sed "s/^/$v r$r /"; done; done; done | tee $OUT/bench_bwd.txt
el bench | tee -a $OUT/log.txt
cd /tmp/bpds
OMP_NUM_THREADS=16 timeout 120 ./bwd_check --hd 256 2>&1 | grep -vE "^ok " | tail -6 | sed "s/^/pds /" | tee -a $OUT/checks.txt
timeout 90 compute-sanitizer --tool memcheck ./bwd_check --sanitize --hd 256 2>&1 | tail -3 | sed "s/^/memcheck 256 /" | tee -a $OUT/checks.txt
timeout 120 compute-sanitizer --tool racecheck ./bwd_check --sanitize --hd 256 2>&1 | tail -3 | sed "s/^/racecheck 256 /" | tee -a $OUT/checks.txt
timeout 90 compute-sanitizer --tool synccheck ./bwd_check --sanitize --hd 256 2>&1 | tail -3 | sed "s/^/synccheck 256 /" | tee -a $OUT/checks.txt
el done | tee -a $OUT/log.txt
