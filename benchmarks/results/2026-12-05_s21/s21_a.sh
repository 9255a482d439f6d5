#!/bin/bash
# Session 21, call A (correctness; binaries built on the CPU machine and carried in .ab/bin): the split-kv tree
# (bwd decomposition + split-KV) in .ab/sk: JAX GPU tests, bwd_check grid of the branch, sanitizers.
set -uo pipefail
OUT=${OUT:-/tmp/out}; L=/tmp/logs_a; mkdir -p $OUT $L; S=$L/summary.txt
T0=$(date +%s); mark(){ echo "== $1 $(( $(date +%s) - T0 )) s" | tee -a $S; cp $S $OUT/summary_a.txt; tar czf $OUT/logs_a.tgz -C /tmp logs_a 2>/dev/null; }
left(){ echo $(( 570 - ($(date +%s) - T0) )); }
A=$PWD/.ab; BIN=$A/bin
cd $A/sk && cp $BIN/_fa3_jax_cuda*.so fa3_jax/
export PYTHONPATH=$A/sk PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv >> $S 2>&1
python3 -c "from fa3_jax import _extension as e; print('ext', e.module is not None, e.import_error, sorted(e.compiled_kernels('fwd')))" 2>&1 | tee -a $S
XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 280 python3 -m pytest -q -n 8 -rs tests/gpu > $L/tests.txt 2>&1; echo "tests rc=$?" >> $S
grep -E "passed|failed|FAILED|Error|error" $L/tests.txt | tail -30 >> $S
mark tests
for hd in 128 64 256; do
  [ $(left) -gt 60 ] && { OMP_NUM_THREADS=16 timeout 45 $BIN/br_bwd_check --hd $hd >> $L/br_bwd_check.log 2>&1; echo "bwd_check hd=$hd rc=$?" | tee -a $S; }
done
grep -E "SUMMARY|failed" $L/br_bwd_check.log | tail -8 >> $S
mark bwd_check
[ $(left) -gt 40 ] && timeout 35 compute-sanitizer --tool racecheck $BIN/br_bwd_check --sanitize --hd 128 2>&1 | tail -4 > $L/san_bwd.txt
[ $(left) -gt 40 ] && timeout 35 compute-sanitizer --tool memcheck $BIN/br_bwd_check --sanitize --hd 128 2>&1 | tail -4 >> $L/san_bwd.txt
[ $(left) -gt 40 ] && timeout 35 compute-sanitizer --tool racecheck $BIN/br_fwd_check --tiny --no-bench --filter bf16_128x128 2>&1 | tail -4 > $L/san_fwd.txt
for smoke in split_smoke varlen_smoke; do for tool in memcheck racecheck; do
  [ $(left) -gt 50 ] && XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 45 compute-sanitizer --tool $tool --kernel-name kns=fa3 --print-limit 20 python3 $A/$smoke.py > $L/san_${smoke}_$tool.txt 2>&1
  pkill -9 -f $smoke; sleep 1
done; done
for f in $L/san_*.txt; do echo "$(basename $f): $(grep -hE 'ERROR SUMMARY|RACECHECK SUMMARY|smoke ok' $f | tr '\n' ' ')" >> $S; done
mark end
