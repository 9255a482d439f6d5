#!/bin/bash
# Build the backward TUs and the standalone checker cuda/tests/bwd_check.cu (CMake target, FA3_JAX_BUILD_CHECKS) on a
# GPU machine, then: correctness grid per head dim, timing, compute-sanitizer memcheck + racecheck on small shapes.
# Logs go to $OUT (default /tmp/out). BUILD_DIR (default /tmp/bwdb): the CMake build folder.
#   DTYPES="bf16 fp16"  HDIMS="64x64 96x96 128x128 192x192 256x256 192x128"  CHECK_HDS="128 64 ..."
#   NCU="128,8192,0,0": also profile the main kernel of that bench case (D,S,CAUSAL,DET) with Nsight Compute.
# Run from the repository root; the CUTLASS headers are unpacked from .whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl.
set -o pipefail
REPO=$(pwd)
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
mkdir -p /tmp/cut && python3 -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); [z.extract(n,'/tmp/cut') for n in z.namelist() if n.startswith(('cutlass_library/source/include/','cutlass_library/source/tools/util/include/'))]" $REPO/.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl
CUT=/tmp/cut/cutlass_library/source
B=${BUILD_DIR:-/tmp/bwdb}; mkdir -p $B
DTYPES=${DTYPES:-"bf16 fp16"}
HDIMS=${HDIMS:-"64x64 96x96 128x128 192x192 256x256 192x128"}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
nvcc --version | tail -1
# The kernels and bwd_check through CMake (target bwd_check, FA3_JAX_BUILD_CHECKS): the extension's flags and
# instantiations.
T0=$(date +%s)
dims=$(printf '%s\n' $HDIMS | sed 's/^\([0-9]*\)x\1$/\1/' | paste -sd';')
cmake -S $REPO -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DFA3_JAX_CUDA=ON -DFA3_JAX_BUILD_CHECKS=ON \
  -DFA3_JAX_DIRECTIONS=bwd -DFA3_JAX_DTYPES="$(echo $DTYPES | tr ' ' ';')" -DFA3_JAX_HEAD_DIMS="$dims" \
  -DFA3_JAX_CUTLASS_INCLUDE_DIR=$CUT/include -DPython_EXECUTABLE="$(command -v python3)" > $OUT/build.txt 2>&1 &&
  ninja -C $B -j 16 bwd_check >> $OUT/build.txt 2>&1 || { grep -B2 -A8 error $OUT/build.txt | head -60; exit 1; }
echo "build wall $(( $(date +%s) - T0 ))s" | tee -a $OUT/build.txt
grep -E "spill|registers|C75" $OUT/build.txt > $OUT/ptxas.txt
cat $OUT/ptxas.txt | head -60
cuobjdump -sass $B/CMakeFiles/fa3_kernels.dir/kernels/bwd_bf16_128x128.cu.o > $B/sass.txt 2>&1
{ grep -o "HGMMA\.[0-9x]*\.[A-Z0-9.]*" $B/sass.txt | sort | uniq -c; echo "LDL/STL: $(grep -cE 'LDL|STL' $B/sass.txt)"; grep -oE "REDG\.[A-Z0-9._]*|RED\.[A-Z0-9._]*" $B/sass.txt | sort | uniq -c; grep -oE "USETMAXREG[^;]*" $B/sass.txt | sort | uniq -c; } | tee -a $OUT/ptxas.txt
cd $B
T1=$(date +%s)
for hd in ${CHECK_HDS:-128 64 96 192x192 256 192x128}; do
  OMP_NUM_THREADS=16 timeout ${TCHECK:-45} ./bwd_check --hd $hd $CHECK_ARGS 2>&1 | tee -a $OUT/check.log
  echo "check hd=$hd rc=$?" | tee -a $OUT/check.log
done
echo "check wall $(( $(date +%s) - T1 ))s"
timeout ${TBENCH:-45} ./bwd_check --bench-only 2>&1 | tee $OUT/bench.log
echo "bench rc=$?"
timeout ${TSAN:-40} compute-sanitizer --tool memcheck ./bwd_check --sanitize --hd 128 2>&1 | tail -12 | tee $OUT/san.txt
timeout 30 compute-sanitizer --tool racecheck ./bwd_check --sanitize --hd 128 2>&1 | tail -6 | tee -a $OUT/san.txt
if [ -n "$NCU" ]; then
  timeout 150 ncu --clock-control none -k regex:bwd_kernel -c 1 --section SpeedOfLight --section WarpStateStats \
    --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section SourceCounters \
    --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active --import-source yes \
    -o $OUT/prof ./bwd_check --bench-case $NCU > /dev/null 2>&1
  ncu -i $OUT/prof.ncu-rep --page details > $OUT/ncu_details.txt 2>&1
  # Per-SASS-instruction stall samples (what NOTES_bwd.md's profile breakdown was computed from).
  ncu -i $OUT/prof.ncu-rep --page source --csv --print-source sass 2>&1 | gzip > $OUT/ncu_source.csv.gz
fi
