#!/bin/bash
# Session 10: d=64 pingpong A/B. ring3 = turn ring over the 3 consumer warpgroups of the 192-row tile; tall = the
# 192-row tile for every d=64 call; ring3tall = both. Then correctness + sanitizers of ring3tall.
S=.bwdtmp/s17
OUT=$OUT FWD_ONLY="bf16_64x64" ROUNDS=5 bash cuda/tests/run_fwd_ab.sh $S/main $S/ring3 $S/tall $S/ring3tall 2>&1 | tail -12
B=/tmp/fwd_ab_build/ring3tall
timeout 200 $B/fwd_check --no-bench --filter bf16_64x64 > $OUT/check_ring3tall.txt 2>&1; echo "check rc=$? $(grep correctness $OUT/check_ring3tall.txt)"
for tool in memcheck racecheck synccheck; do
  timeout 150 compute-sanitizer --tool $tool $B/fwd_check --tiny --no-bench --filter bf16_64x64 2>&1 | tail -1 | sed "s/^/$tool /"
done
