#!/bin/bash
# Stall reasons of the d=64 non-causal 2k forward: ours (per SASS instruction) and cuDNN's (totals).
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
export XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 150 ncu --target-processes all -k regex:'fwd_kernel' -c 1 --section WarpStateStats --section SourceCounters \
  --section SpeedOfLight -o /tmp/ours -f python3 .bwdtmp/s16/jax_fwd.py fa3_jax 64 2048 0 > $OUT/log_ours.txt 2>&1; echo "ours rc=$?"
timeout 150 ncu --target-processes all -k regex:'sdpa' -c 1 --section WarpStateStats --section SourceCounters \
  --section SpeedOfLight -o /tmp/cudnn -f python3 .bwdtmp/s16/jax_fwd.py cudnn 64 2048 0 > $OUT/log_cudnn.txt 2>&1; echo "cudnn rc=$?"
for r in ours cudnn; do
  ncu --import /tmp/$r.ncu-rep --page raw --csv > $OUT/raw_$r.csv 2>&1
  ncu --import /tmp/$r.ncu-rep --page source --print-source sass --csv 2>&1 | gzip > $OUT/sass_$r.csv.gz
  ls -la $OUT
done
tail -3 $OUT/log_*.txt
