#!/bin/bash
# Session 9 A/B: backward SS path dQ-first (ss) vs main at d=192/256; forward d=64 128x192 tile (n192) vs main.
# Then correctness + sanitizers on the variants, then ncu kernel durations of the JAX fwd+bwd (ours vs FA3).
set -o pipefail
REPO=$(pwd); OUT=${OUT:-/tmp/out}; mkdir -p $OUT; T00=$(date +%s); S=$REPO/.bwdtmp/s12
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
prep /tmp/bmain $S/main "bf16:256x256 bf16:192x192 bf16:192x128"
prep /tmp/bss $S/ss "bf16:256x256 fp16:256x256 bf16:192x192 bf16:192x128"
for t in main n192; do
  OUT=/tmp/f_$t BUILD_DIR=/tmp/fb_$t CUTLASS_INC=$CUT/include FWD_ONLY="bf16_64x64" JOBS=2 STEPS="build" bash $S/$t/cuda/tests/run_fwd_check.sh > /tmp/fbuild_$t.txt 2>&1 &
done
{ grep -E "/bwd_(bf16|fp16)_" /tmp/jobs; grep -vE "/bwd_(bf16|fp16)_" /tmp/jobs; } | xargs -P 14 -L 1 bash -c 'nvcc $BASEF -I$1 -I$(dirname $2) -Xcompiler -fopenmp -c $0 -o $2 > $2.log 2>&1 || { echo "FAILED $0 -> $2"; grep -m5 error $2.log; }'
for B in bmain bss; do nvcc -gencode arch=compute_90a,code=sm_90a -Xcompiler -fopenmp /tmp/$B/check.o /tmp/$B/ffi.o /tmp/$B/bwd_*.o -lgomp -o /tmp/$B/bwd_check || echo "LINK FAILED $B"; done
wait
for B in bmain bss; do for f in /tmp/$B/bwd_*.o.log; do echo "$B $(basename $f) $(grep -A2 'Function properties for .*bwd_kernel' $f | grep -E 'spill|Used' | tr -s ' ' | tr '\n' ' ')"; done; done | tee $OUT/ptxas.txt
for t in main n192; do grep -h "spill\|FAIL\|rc=" /tmp/fbuild_$t.txt | sed "s/^/fwd $t /"; done | tee -a $OUT/ptxas.txt
el built | tee -a $OUT/log.txt
CASES="256,2048,1,0 256,4096,1,0 256,8192,1,0 256,8192,0,0 256,8192,1,1 192,2048,1,0 192,8192,1,0 192,8192,0,0"
for r in 1 2 3; do for c in $CASES; do for v in bmain bss; do timeout 20 /tmp/$v/bwd_check --bench-case $c 2>&1 | grep -E "^bench|HANG|error" | sed "s/^/$v r$r /"; done; done; done | tee $OUT/bench_bwd.txt
el bench-bwd | tee -a $OUT/log.txt
for r in 1 2 3; do for t in main n192; do timeout 100 /tmp/fb_$t/fwd_check --bench-only 2>&1 | grep -i "tflop" | sed "s/^/$t r$r /" >> $OUT/bench_fwd.txt; done; done
el bench-fwd | tee -a $OUT/log.txt
cd /tmp/bss
for hd in 256 192x192 192x128; do OMP_NUM_THREADS=16 timeout 90 ./bwd_check --hd $hd 2>&1 | grep -vE "^ok " | tail -4 | sed "s/^/ss hd=$hd /" | tee -a $OUT/checks.txt; done
el check-bwd | tee -a $OUT/log.txt
timeout 150 /tmp/fb_n192/fwd_check --no-bench > /tmp/fcheck.txt 2>&1; echo "n192 fwd check rc=$? ok=$(grep -c '^ok' /tmp/fcheck.txt)" | tee -a $OUT/checks.txt
grep -i "correctness\|fail" /tmp/fcheck.txt | head -5 | tee -a $OUT/checks.txt
el check-fwd | tee -a $OUT/log.txt
timeout 60 compute-sanitizer --tool memcheck ./bwd_check --sanitize --hd 256 2>&1 | tail -3 | sed "s/^/memcheck 256 /" | tee -a $OUT/checks.txt
timeout 60 compute-sanitizer --tool racecheck ./bwd_check --sanitize --hd 192 2>&1 | tail -3 | sed "s/^/racecheck 192 /" | tee -a $OUT/checks.txt
el sanitize | tee -a $OUT/log.txt
cd $REPO
for w in $REPO/.whl/*.whl; do python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$w" >/dev/null 2>&1; done
export PYTHONPATH=$REPO:/tmp/site XLA_FLAGS=--xla_gpu_autotune_level=0
for cfg in "128 8192 0" "128 2048 1"; do set -- $cfg; for impl in fa3_jax flash_attn3_jax; do
  timeout 80 ncu --clock-control none --metrics gpu__time_duration.sum --csv python3 .bwdtmp/s12/jax_kernels.py $impl $1 $2 $3 > /tmp/ncu_${impl}_$1_$2_$3.csv 2>/tmp/ncu_err.txt; echo "ncu $impl $cfg rc=$?" | tee -a $OUT/log.txt
done; done
tar czf $OUT/ncu.tgz -C /tmp ncu_fa3_jax_128_8192_0.csv ncu_fa3_jax_128_2048_1.csv ncu_flash_attn3_jax_128_8192_0.csv ncu_flash_attn3_jax_128_2048_1.csv 2>/dev/null
el done | tee -a $OUT/log.txt
