#!/bin/bash
# Build every backward TU and the standalone checker cuda/tests/bwd_check.cu on a GPU machine, then: correctness grid
# per head dim, timing, compute-sanitizer memcheck + racecheck on small shapes. Logs go to $OUT (default /tmp/out).
#   DTYPES="bf16 fp16"  HDIMS="64x64 96x96 128x128 192x192 256x256 192x128"  CHECK_HDS="128 64 ..."
#   NCU="128,8192,0,0": also profile the main kernel of that bench case (D,S,CAUSAL,DET) with Nsight Compute.
# Run from the repository root; the CUTLASS headers are unpacked from .whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl.
set -o pipefail
REPO=$(pwd)
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
mkdir -p /tmp/cut && python3 -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); [z.extract(n,'/tmp/cut') for n in z.namelist() if n.startswith(('cutlass_library/source/include/','cutlass_library/source/tools/util/include/'))]" $REPO/.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl
CUT=/tmp/cut/cutlass_library/source
B=/tmp/bwdb; mkdir -p $B
FLAGS="-gencode arch=compute_90a,code=sm_90a -O3 --use_fast_math --expt-relaxed-constexpr --expt-extended-lambda -std=c++17 -DNDEBUG -DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED -DCUTLASS_ENABLE_GDC_FOR_SM90 -DCUTLASS_DEBUG_TRACE_LEVEL=0 -lineinfo -Xptxas=-v -I$REPO/cuda/include -I$CUT/include -I$CUT/tools/util/include -I$REPO/third_party/xla_ffi_0.11.0 -I$B"
DTYPES=${DTYPES:-"bf16 fp16"}
HDIMS=${HDIMS:-"64x64 96x96 128x128 192x192 256x256 192x128"}
for dt in $DTYPES; do
  [ $dt = bf16 ] && EL=cutlass::bfloat16_t || EL=cutlass::half_t
  for hd in $HDIMS; do
    d=${hd%x*}; dv=${hd#*x}
    sed -e "s/@FA3_ELEMENT@/$EL/" -e "s/@FA3_HDIM@/$d/" -e "s/@FA3_HDIMV@/$dv/" cuda/kernels/bwd.cu.in > $B/bwd_${dt}_$hd.cu
  done
done
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
nvcc --version | tail -1
T0=$(date +%s)
export FLAGS
ls $B/bwd_*.cu | xargs -P 14 -I{} bash -c 'S=$(date +%s); nvcc $FLAGS -c {} -o {}.o > {}.log 2>&1; echo "{} rc=$? $(( $(date +%s) - S ))s"' | tee $OUT/build.txt
# Kernel list = the TUs that built (a failed TU must not take the whole check down).
LIST="#pragma once
#define FA3_JAX_BWD_KERNELS(X)"
OBJS=""
for dt in $DTYPES; do
  [ $dt = bf16 ] && EL=cutlass::bfloat16_t || EL=cutlass::half_t
  for hd in $HDIMS; do
    d=${hd%x*}; dv=${hd#*x}
    if [ -f $B/bwd_${dt}_$hd.cu.o ]; then LIST="$LIST X($EL, $dt, $d, $dv)"; OBJS="$OBJS $B/bwd_${dt}_$hd.cu.o"; else echo "BUILD FAILED: $dt $hd"; grep -m5 error $B/bwd_${dt}_$hd.cu.log; fi
  done
done
echo "$LIST" > $B/fa3_kernel_list.h
nvcc $FLAGS -Xcompiler -fopenmp -c cuda/tests/bwd_check.cu -o $B/check.o > $B/check.log 2>&1 || { cat $B/check.log; exit 1; }
nvcc $FLAGS -c cuda/ffi/bwd.cu -o $B/ffi.o > $B/ffi.log 2>&1 || { cat $B/ffi.log; exit 1; }
nvcc -gencode arch=compute_90a,code=sm_90a -Xcompiler -fopenmp $B/check.o $B/ffi.o $OBJS -lgomp -o $B/bwd_check || exit 1
echo "build wall $(( $(date +%s) - T0 ))s" | tee -a $OUT/build.txt
for f in $B/bwd_*.cu.log; do echo "== $(basename $f)"; grep -A2 "Function properties for .*bwd_kernel" $f | grep -E "spill|Used"; grep -iE "warning|C75" $f; done > $OUT/ptxas.txt 2>&1
cat $OUT/ptxas.txt | head -60
cuobjdump -sass $B/bwd_bf16_128x128.cu.o > $B/sass.txt 2>&1
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
