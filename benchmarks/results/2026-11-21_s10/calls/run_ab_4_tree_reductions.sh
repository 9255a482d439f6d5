#!/bin/bash
# Session 10: forward A/B of the softmax reductions: mx = row max / sum as 4 interleaved partial chains (all rows'
# maxima before the exponentials), mx8 = 8 chains, ovmx = mx on top of the tile-boundary overlap (ov).
REPO=$(pwd); OUT=${OUT:-/tmp/out}; mkdir -p $OUT /tmp/x; T00=$(date +%s); S=$REPO/.bwdtmp/s15
el() { echo "[$(( $(date +%s) - T00 ))s] $*"; }
mkdir -p /tmp/cut && python3 -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); [z.extract(n,'/tmp/cut') for n in z.namelist() if n.startswith(('cutlass_library/source/include/','cutlass_library/source/tools/util/include/'))]" $REPO/.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl
CUT=/tmp/cut/cutlass_library/source
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee $OUT/log.txt
V="main mx mx8 ovmx"
for t in $V; do
  KS="bf16_64x64 bf16_96x96 bf16_128x128"; [ $t = mx ] && KS="$KS bf16_256x256 fp16_64x64 fp16_128x128"
  OUT=/tmp/x/$t BUILD_DIR=/tmp/xb_$t CUTLASS_INC=$CUT/include FWD_ONLY="$KS" JOBS=6 STEPS="build" bash $S/$t/cuda/tests/run_fwd_check.sh > /tmp/x/build_$t.txt 2>&1 &
done
wait; el built | tee -a $OUT/log.txt
for t in $V; do grep -h "spill\|rc=\|wall\|C75" /tmp/x/build_$t.txt | grep -v " 0 bytes spill" | sed "s/^/$t /"; done | tee -a $OUT/log.txt
for r in 1 2 3 4 5; do for t in $V; do timeout 100 /tmp/xb_$t/fwd_check --bench-only 2>&1 | grep -i "tflop" | sed "s/^/$t r$r /" >> $OUT/bench.txt; done; done
el bench | tee -a $OUT/log.txt
timeout 240 /tmp/xb_mx/fwd_check --no-bench > $OUT/check_mx.txt 2>&1; echo "mx check rc=$? $(grep -i 'correctness' $OUT/check_mx.txt)" | tee -a $OUT/log.txt
grep -i fail $OUT/check_mx.txt | head -20 | tee -a $OUT/log.txt
timeout 120 compute-sanitizer --tool memcheck /tmp/xb_mx/fwd_check --small --no-bench --filter bf16_64x64 2>&1 | tail -1 | sed "s/^/memcheck mx bf16_64x64 /" | tee -a $OUT/log.txt
el done | tee -a $OUT/log.txt
