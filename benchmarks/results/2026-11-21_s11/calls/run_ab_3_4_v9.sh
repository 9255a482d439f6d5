#!/bin/bash
# v9b = the same with two compiled copies of the first block's softmax instead of a runtime branch around the mask.
# v9 = the first block of a tile skips the mask when it is mask-free; base9 = HEAD (9adb6e7) with the same fwd_check
# (512 added to the benchmark lengths). Then fwd_check + sanitizers of v9.
S=.bwdtmp/s18
OUT=$OUT FWD_ONLY="bf16_64x64 bf16_128x128" ROUNDS=${ROUNDS:-5} bash cuda/tests/run_fwd_ab.sh $S/base9 $S/v9 $S/v9b 2>&1 | tail -12
B=/tmp/fwd_ab_build/v9b
timeout 200 $B/fwd_check --no-bench > $OUT/check_v9b.txt 2>&1; echo "check rc=$? $(grep correctness $OUT/check_v9b.txt)"
for kn in bf16_64x64 bf16_128x128; do
  timeout 100 compute-sanitizer --tool memcheck $B/fwd_check --small --no-bench --filter $kn 2>&1 | tail -1 | sed "s/^/memcheck $kn /"
  timeout 100 compute-sanitizer --tool racecheck $B/fwd_check --tiny --no-bench --filter $kn 2>&1 | tail -1 | sed "s/^/racecheck $kn /"
done
