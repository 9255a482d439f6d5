#!/bin/bash
# Session 10: forward A/B: ov = two Q buffers + next tile's first block during the last P V; pe4 / pe3 = ov with every
# 4th / 3rd softmax exponential on the FMA pipe at d=64; pe4all = every 4th at d <= 128.
REPO=$(pwd); OUT=${OUT:-/tmp/out}; mkdir -p $OUT /tmp/x; T00=$(date +%s); S=$REPO/.bwdtmp/s15
el() { echo "[$(( $(date +%s) - T00 ))s] $*"; }
mkdir -p /tmp/cut && python3 -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); [z.extract(n,'/tmp/cut') for n in z.namelist() if n.startswith(('cutlass_library/source/include/','cutlass_library/source/tools/util/include/'))]" $REPO/.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl
CUT=/tmp/cut/cutlass_library/source
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee $OUT/log.txt
V="main ov pe4 pe3 pe4all"
for t in $V; do
  case $t in main|ov) KS="bf16_64x64 bf16_96x96 bf16_128x128";; pe4|pe3) KS="bf16_64x64";;
    pe4all) KS="bf16_64x64 bf16_96x96 bf16_128x128 fp16_64x64 fp16_96x96 fp16_128x128";; esac
  OUT=/tmp/x/$t BUILD_DIR=/tmp/xb_$t CUTLASS_INC=$CUT/include FWD_ONLY="$KS" JOBS=6 STEPS="build" bash $S/$t/cuda/tests/run_fwd_check.sh > /tmp/x/build_$t.txt 2>&1 &
done
wait; el built | tee -a $OUT/log.txt
for t in $V; do grep -h "spill\|rc=\|wall" /tmp/x/build_$t.txt | sed "s/^/$t /"; done | tee -a $OUT/log.txt
for t in ov pe4 pe3; do echo "$t MUFU.EX2 in bf16_64x64: $(cuobjdump -sass /tmp/xb_$t/k/fwd_bf16_64x64.o | grep -c MUFU.EX2)"; done | tee -a $OUT/log.txt
for r in 1 2 3; do for t in $V; do timeout 100 /tmp/xb_$t/fwd_check --bench-only 2>&1 | grep -i "tflop" | sed "s/^/$t r$r /" >> $OUT/bench.txt; done; done
el bench | tee -a $OUT/log.txt
timeout 240 /tmp/xb_pe4all/fwd_check --no-bench > $OUT/check_pe4all.txt 2>&1; echo "pe4all check rc=$? $(grep -i 'correctness' $OUT/check_pe4all.txt)" | tee -a $OUT/log.txt
grep -i fail $OUT/check_pe4all.txt | head -20 | tee -a $OUT/log.txt
timeout 120 compute-sanitizer --tool memcheck /tmp/xb_pe4all/fwd_check --small --no-bench --filter bf16_64x64 2>&1 | tail -2 | sed "s/^/memcheck pe4all bf16_64x64 /" | tee -a $OUT/log.txt
el done | tee -a $OUT/log.txt
