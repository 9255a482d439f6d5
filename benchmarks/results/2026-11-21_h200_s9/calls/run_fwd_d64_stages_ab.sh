#!/bin/bash
# Session 9: forward d=64 with 3 / 4 K-V pipeline stages vs main (2).
REPO=$(pwd); OUT=${OUT:-/tmp/out}; mkdir -p $OUT /tmp/x; T00=$(date +%s); S=$REPO/.bwdtmp/s13
el() { echo "[$(( $(date +%s) - T00 ))s] $*"; }
mkdir -p /tmp/cut && python3 -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); [z.extract(n,'/tmp/cut') for n in z.namelist() if n.startswith(('cutlass_library/source/include/','cutlass_library/source/tools/util/include/'))]" $REPO/.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl
CUT=/tmp/cut/cutlass_library/source
V="main s3 s4"
for t in $V; do
  OUT=/tmp/x/$t BUILD_DIR=/tmp/xb_$t CUTLASS_INC=$CUT/include FWD_ONLY="bf16_64x64" JOBS=2 STEPS="build" bash $S/$t/cuda/tests/run_fwd_check.sh > /tmp/x/build_$t.txt 2>&1 &
done
wait; el built | tee -a $OUT/log.txt
for t in $V; do grep -h "spill\|rc=" /tmp/x/build_$t.txt | sed "s/^/$t /"; done | tee -a $OUT/log.txt
for r in 1 2 3 4 5; do for t in $V; do timeout 100 /tmp/xb_$t/fwd_check --bench-only 2>&1 | grep -i "tflop" | sed "s/^/$t r$r /" >> $OUT/bench.txt; done; done
el bench | tee -a $OUT/log.txt
for t in s3 s4; do timeout 150 /tmp/xb_$t/fwd_check --no-bench > /tmp/x/check_$t.txt 2>&1; echo "$t check rc=$? $(grep -i 'correctness' /tmp/x/check_$t.txt)" | tee -a $OUT/log.txt; done
for t in s3 s4; do
timeout 100 compute-sanitizer --tool memcheck /tmp/xb_$t/fwd_check --small --no-bench --filter bf16_64x64 2>&1 | tail -2 | sed "s/^/$t memcheck /" | tee -a $OUT/log.txt
timeout 100 compute-sanitizer --tool racecheck /tmp/xb_$t/fwd_check --tiny --no-bench --filter bf16_64x64 2>&1 | tail -2 | sed "s/^/$t racecheck /" | tee -a $OUT/log.txt
done
el done | tee -a $OUT/log.txt
