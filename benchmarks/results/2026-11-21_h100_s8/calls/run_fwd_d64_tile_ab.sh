#!/bin/bash
# Session 8: forward d=64 with 192-row tiles (3 consumer warpgroups, uniform descriptor slicing) vs HEAD.
REPO=$(pwd); OUT=${OUT:-/tmp/out}; mkdir -p $OUT /tmp/x; T00=$(date +%s); S=$REPO/.bwdtmp/s11
el() { echo "[$(( $(date +%s) - T00 ))s] $*"; }
mkdir -p /tmp/cutf && python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" $REPO/.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl /tmp/cutf
export CUTLASS_INC=/tmp/cutf/cutlass_library/source/include
KS="bf16_64x64 fp16_64x64"
for t in main v192; do
  OUT=/tmp/x/$t BUILD_DIR=/tmp/xb_$t FWD_ONLY="$KS" JOBS=2 STEPS="build" bash $S/$t/cuda/tests/run_fwd_check.sh > /tmp/x/build_$t.txt 2>&1 &
done
wait; el built | tee -a $OUT/log.txt
for t in main v192; do grep -h "spill" /tmp/x/build_$t.txt | sed "s/^/$t /"; done | tee -a $OUT/log.txt
for r in 1 2 3 4 5; do for t in main v192; do timeout 100 /tmp/xb_$t/fwd_check --bench-only 2>&1 | grep -i "tflop" | sed "s/^/$t r$r /" >> $OUT/bench.txt; done; done
el bench | tee -a $OUT/log.txt
timeout 200 /tmp/xb_v192/fwd_check --no-bench > /tmp/x/check.txt 2>&1; echo "v192 check rc=$?" | tee -a $OUT/log.txt
grep -i "correctness" /tmp/x/check.txt | tee -a $OUT/log.txt; grep -i "fail" /tmp/x/check.txt | head -5 | tee -a $OUT/log.txt
timeout 100 compute-sanitizer --tool memcheck /tmp/xb_v192/fwd_check --small --no-bench --filter bf16_64x64 2>&1 | tail -2 | tee -a $OUT/log.txt
timeout 100 compute-sanitizer --tool racecheck /tmp/xb_v192/fwd_check --tiny --no-bench --filter bf16_64x64 2>&1 | tail -2 | tee -a $OUT/log.txt
timeout 100 compute-sanitizer --tool synccheck /tmp/xb_v192/fwd_check --tiny --no-bench --filter bf16_64x64 2>&1 | tail -2 | tee -a $OUT/log.txt
el done | tee -a $OUT/log.txt
