#!/bin/bash
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for c in "2048 0" "4096 1"; do for impl in cudnn fa3_jax; do
  set -- $c
  timeout 100 ncu --target-processes all -k regex:'fwd_kernel|sdpa' -c 1 \
    --section SpeedOfLight --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis \
    --csv --page details python3 .bwdtmp/s16/jax_fwd.py $impl 64 $1 $2 > $OUT/ncu_${impl}_64_$1_$2.csv 2> /tmp/err.txt
  echo "$impl $c rc=$?"; grep -c "^\"" $OUT/ncu_${impl}_64_$1_$2.csv; grep -v "^\"" $OUT/ncu_${impl}_64_$1_$2.csv | head -5; tail -2 /tmp/err.txt
done; done
