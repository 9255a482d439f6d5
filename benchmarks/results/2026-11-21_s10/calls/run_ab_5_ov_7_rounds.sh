#!/bin/bash
# Session 10: decisive forward A/B, main vs ov (two Q buffers + the next tile's first block during the last P V),
# 7 interleaved rounds.
REPO=$(pwd); OUT=${OUT:-/tmp/out}; mkdir -p $OUT /tmp/x; T00=$(date +%s); S=$REPO/.bwdtmp/s15
el() { echo "[$(( $(date +%s) - T00 ))s] $*"; }
mkdir -p /tmp/cut && python3 -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); [z.extract(n,'/tmp/cut') for n in z.namelist() if n.startswith(('cutlass_library/source/include/','cutlass_library/source/tools/util/include/'))]" $REPO/.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl
CUT=/tmp/cut/cutlass_library/source
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee $OUT/log.txt
V="main ov"
for t in $V; do
  OUT=/tmp/x/$t BUILD_DIR=/tmp/xb_$t CUTLASS_INC=$CUT/include FWD_ONLY="bf16_64x64 bf16_96x96 bf16_128x128 fp16_128x128" JOBS=8 STEPS="build" bash $S/$t/cuda/tests/run_fwd_check.sh > /tmp/x/build_$t.txt 2>&1 &
done
wait; el built | tee -a $OUT/log.txt
for t in $V; do grep -h "spill\|rc=\|wall\|C75" /tmp/x/build_$t.txt | grep -v " 0 bytes spill" | sed "s/^/$t /"; done | tee -a $OUT/log.txt
for r in 1 2 3 4 5 6 7; do for t in $V; do timeout 100 /tmp/xb_$t/fwd_check --bench-only 2>&1 | grep -i "tflop" | sed "s/^/$t r$r /" >> $OUT/bench.txt; done; done
el bench | tee -a $OUT/log.txt
