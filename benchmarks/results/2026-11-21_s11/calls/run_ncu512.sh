#!/bin/bash
# ncu of the d=64 forward at short sequences, ours against cuDNN (harness inputs: 16k tokens, hidden 2048, bf16).
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for c in "512 0" "512 1" "1024 0"; do for impl in cudnn fa3_jax; do
  set -- $c
  timeout 120 ncu --target-processes all -k regex:'fwd_kernel|sdpa|cudnn' -c 1 \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --csv --page details python3 .bwdtmp/s18/jax_fwd.py $impl 64 $1 $2 > $OUT/ncu_${impl}_64_$1_$2.csv 2> /tmp/err.txt
  echo "$impl $c rc=$? rows=$(grep -c '^\"' $OUT/ncu_${impl}_64_$1_$2.csv)"; tail -2 /tmp/err.txt
  grep -E '"Duration"|"Registers Per Thread"|"Block Size"|"Grid Size"|"Executed Ipc Active"|"Compute \(SM\) Throughput"|"Memory Throughput"' $OUT/ncu_${impl}_64_$1_$2.csv | awk -F'","' '{print "   ", $(NF-2), $(NF-1), $NF}'
done; done
cd $OUT && tar czf ncu.tgz *.csv && rm -f *.csv
