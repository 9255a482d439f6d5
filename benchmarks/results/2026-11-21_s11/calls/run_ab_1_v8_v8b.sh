#!/bin/bash
# Session 11: v8 = single-tile items on the persistent grid when tile costs are equal; v8b = v8 + the 192-row tile
# from 1024 queries / keys. A/B against main, then correctness + sanitizers of v8.
S=.bwdtmp/s18
OUT=$OUT FWD_ONLY="bf16_64x64 bf16_128x128" ROUNDS=${ROUNDS:-5} bash cuda/tests/run_fwd_ab.sh $S/main $S/v8 $S/v8b 2>&1 | tail -30
B=/tmp/fwd_ab_build/v8
timeout 200 $B/fwd_check --no-bench > $OUT/check_v8.txt 2>&1; echo "check rc=$? $(grep correctness $OUT/check_v8.txt)"
for tool in memcheck racecheck; do
  timeout 100 compute-sanitizer --tool $tool $B/fwd_check --tiny --no-bench --filter bf16_64x64 2>&1 | tail -1 | sed "s/^/$tool /"
done
