#!/bin/bash
# Session 10: forward A/B: qs2 = two Q buffers; ov = two Q buffers + next tile's first block during the last P V; ov3 = ov with 3 K/V stages at d <= 96.
REPO=$(pwd); OUT=${OUT:-/tmp/out}; mkdir -p $OUT /tmp/x; T00=$(date +%s); S=$REPO/.bwdtmp/s15
el() { echo "[$(( $(date +%s) - T00 ))s] $*"; }
mkdir -p /tmp/cut && python3 -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); [z.extract(n,'/tmp/cut') for n in z.namelist() if n.startswith(('cutlass_library/source/include/','cutlass_library/source/tools/util/include/'))]" $REPO/.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl
CUT=/tmp/cut/cutlass_library/source
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee $OUT/log.txt
V="main qs2 ov ov3"
for t in $V; do
  KS="bf16_64x64 bf16_96x96 bf16_128x128"; [ $t = ov ] && KS="$KS fp16_64x64 bf16_256x256 fp16_128x128"
  OUT=/tmp/x/$t BUILD_DIR=/tmp/xb_$t CUTLASS_INC=$CUT/include FWD_ONLY="$KS" JOBS=5 STEPS="build" bash $S/$t/cuda/tests/run_fwd_check.sh > /tmp/x/build_$t.txt 2>&1 &
done
wait; el built | tee -a $OUT/log.txt
for t in $V; do grep -h "spill\|rc=\|wall" /tmp/x/build_$t.txt | sed "s/^/$t /"; done | tee -a $OUT/log.txt
for r in 1 2 3; do for t in $V; do timeout 100 /tmp/xb_$t/fwd_check --bench-only 2>&1 | grep -i "tflop" | sed "s/^/$t r$r /" >> $OUT/bench.txt; done; done
el bench | tee -a $OUT/log.txt
timeout 240 /tmp/xb_ov/fwd_check --no-bench > $OUT/check_ov.txt 2>&1; echo "ov check rc=$? $(grep -i 'correctness' $OUT/check_ov.txt)" | tee -a $OUT/log.txt
grep -i fail $OUT/check_ov.txt | head -20 | tee -a $OUT/log.txt
el checked | tee -a $OUT/log.txt
for kn in bf16_64x64 bf16_128x128; do
 { timeout 120 compute-sanitizer --tool memcheck /tmp/xb_ov/fwd_check --small --no-bench --filter $kn 2>&1 | tail -2 | sed "s/^/memcheck $kn /"
   timeout 120 compute-sanitizer --tool racecheck /tmp/xb_ov/fwd_check --tiny --no-bench --filter $kn 2>&1 | tail -2 | sed "s/^/racecheck $kn /"
   timeout 120 compute-sanitizer --tool synccheck /tmp/xb_ov/fwd_check --tiny --no-bench --filter $kn 2>&1 | tail -2 | sed "s/^/synccheck $kn /"; } > /tmp/x/san_$kn.txt &
done
wait; cat /tmp/x/san_*.txt | tee -a $OUT/log.txt
el done | tee -a $OUT/log.txt
