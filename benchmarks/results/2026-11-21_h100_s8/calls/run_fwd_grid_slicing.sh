#!/bin/bash
# Session 8 experiment: forward d <= 128, grid of one work item per CTA (items) and uniform descriptor slicing (unif)
# vs HEAD (main). fwd_check benchmarks, 5 interleaved rounds.
REPO=$(pwd); OUT=${OUT:-/tmp/out}; mkdir -p $OUT /tmp/x; T00=$(date +%s)
el() { echo "[$(( $(date +%s) - T00 ))s] $*"; }
mkdir -p /tmp/cutf && python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" $REPO/.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl /tmp/cutf
export CUTLASS_INC=/tmp/cutf/cutlass_library/source/include
KS="bf16_64x64 bf16_128x128 bf16_96x96 fp16_64x64"
for t in main items unif; do
  OUT=/tmp/x/$t BUILD_DIR=/tmp/xb_$t FWD_ONLY="$KS" JOBS=5 STEPS="build" bash $REPO/.bwdtmp/s9/$t/cuda/tests/run_fwd_check.sh > /tmp/x/build_$t.txt 2>&1 &
done
wait; el built | tee -a $OUT/log.txt
grep -h "spill\|FAIL" /tmp/x/build_*.txt | sort | uniq -c | tee -a $OUT/log.txt
for r in 1 2 3 4 5; do for t in main items unif; do timeout 100 /tmp/xb_$t/fwd_check --bench-only 2>&1 | grep -i "tflop" | sed "s/^/$t r$r /" >> $OUT/bench.txt; done; done
el bench | tee -a $OUT/log.txt
timeout 200 /tmp/xb_items/fwd_check --no-bench > /tmp/x/check_items.txt 2>&1; echo "items check rc=$?" | tee -a $OUT/log.txt
grep -i "correctness" /tmp/x/check_items.txt | tee -a $OUT/log.txt
el done | tee -a $OUT/log.txt
