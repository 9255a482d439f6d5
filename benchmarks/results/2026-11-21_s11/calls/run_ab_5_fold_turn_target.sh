#!/bin/bash
# fold = HEAD with the turn target written as (wg + 1) % warpgroups for every warpgroup count (was 1 - wg for two);
# v9b = HEAD. A/B, then fwd_check + racecheck / synccheck of fold.
S=.bwdtmp/s18
OUT=$OUT FWD_ONLY="bf16_64x64 bf16_128x128" ROUNDS=${ROUNDS:-3} bash cuda/tests/run_fwd_ab.sh $S/v9b $S/fold 2>&1 | tail -10
B=/tmp/fwd_ab_build/fold
timeout 200 $B/fwd_check --no-bench > $OUT/check_fold.txt 2>&1; echo "check rc=$? $(grep correctness $OUT/check_fold.txt)"
for kn in bf16_64x64 bf16_128x128; do for tool in racecheck synccheck; do
  timeout 100 compute-sanitizer --tool $tool $B/fwd_check --tiny --no-bench --filter $kn 2>&1 | tail -1 | sed "s/^/$tool $kn /"
done; done
