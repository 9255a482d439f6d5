#!/bin/bash
# Prepared in session 7 for session 8 (not run yet): forward main (2460381) vs fwdov (wip/fwd-overlap-all-head-dims,
# 99687e4: intra-warpgroup overlap at every head dim, warp-uniform SMEM descriptor slicing). Builds both trees'
# fwd_check for the kernels below in parallel, then correctness (fwdov), interleaved benchmarks (3 rounds), sanitizers
# (fwdov d=256 and d=128). Carry .whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl and .bwdtmp/s8. Results: $OUT/fwd.tgz.
REPO=$(pwd); OUT=${OUT:-/tmp/out}; mkdir -p $OUT /tmp/fwdres; T00=$(date +%s)
el() { echo "[$(( $(date +%s) - T00 ))s] $*"; }
mkdir -p /tmp/cutf && python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" $REPO/.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl /tmp/cutf
export CUTLASS_INC=/tmp/cutf/cutlass_library/source/include
KS="bf16_256x256 bf16_192x192 bf16_192x128 bf16_128x128 bf16_64x64 bf16_96x96 fp16_256x256"
for t in main fwdov; do
  OUT=/tmp/fwdres/$t BUILD_DIR=/tmp/fwdb_$t FWD_ONLY="$KS" JOBS=8 STEPS="build" bash $REPO/.bwdtmp/s8/$t/cuda/tests/run_fwd_check.sh > /tmp/fwdres/build_$t.txt 2>&1 &
done
wait; el built | tee -a $OUT/log.txt
grep -h "spill\|C75\|FAIL" /tmp/fwdres/build_*.txt | sort | uniq -c | tee -a $OUT/log.txt
for r in 1 2 3; do for t in main fwdov; do timeout 150 /tmp/fwdb_$t/fwd_check --bench-only 2>&1 | grep -i "tflop" | sed "s/^/$t r$r /" >> /tmp/fwdres/bench.txt; done; done
el bench | tee -a $OUT/log.txt
timeout 300 /tmp/fwdb_fwdov/fwd_check --no-bench > /tmp/fwdres/check_fwdov.txt 2>&1; echo "check rc=$?" | tee -a $OUT/log.txt
grep -c "^ok" /tmp/fwdres/check_fwdov.txt | tee -a $OUT/log.txt; grep -i "fail\|summary\|correctness" /tmp/fwdres/check_fwdov.txt | head -20 | tee -a $OUT/log.txt
el check | tee -a $OUT/log.txt
for kn in bf16_256x256 bf16_128x128; do
  timeout 100 compute-sanitizer --tool memcheck /tmp/fwdb_fwdov/fwd_check --small --no-bench --filter $kn 2>&1 | tail -3
  timeout 100 compute-sanitizer --tool racecheck /tmp/fwdb_fwdov/fwd_check --tiny --no-bench --filter $kn 2>&1 | tail -3
done | tee /tmp/fwdres/sanitize.txt | tee -a $OUT/log.txt
el done | tee -a $OUT/log.txt
tar czf $OUT/fwd.tgz -C /tmp/fwdres .
