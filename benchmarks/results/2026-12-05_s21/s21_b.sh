#!/bin/bash
# Session 21, call B (performance): decode benchmark of the split-kv tree vs FA3 and cuDNN; interleaved A/Bs of the
# standalone checkers: bwd main vs bwd-decomposition, fwd main vs split-kv.
set -uo pipefail
OUT=${OUT:-/tmp/out}; L=/tmp/logs_b; mkdir -p $OUT $L; S=$L/summary.txt
T0=$(date +%s); mark(){ echo "== $1 $(( $(date +%s) - T0 )) s" | tee -a $S; cp $S $OUT/summary_b.txt; tar czf $OUT/logs_b.tgz -C /tmp logs_b 2>/dev/null; }
left(){ echo $(( 570 - ($(date +%s) - T0) )); }
A=$PWD/.ab; BIN=$A/bin
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $A/whl/*.whl > $L/pip.txt 2>&1
cd $A/sk && cp $BIN/_fa3_jax_cuda*.so fa3_jax/
export PYTHONPATH=$A/sk:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv >> $S 2>&1
timeout 260 python3 benchmarks/bench_decode.py --out $OUT/decode > $L/decode.log 2>&1; echo "decode rc=$?" >> $S
cat $OUT/decode/results.md >> $S 2>/dev/null || tail -20 $L/decode.log >> $S
mark decode
for r in 1 2; do for t in main br; do
  [ $(left) -gt 60 ] && timeout 45 $BIN/${t}_bwd_check --bench-only 2>&1 | grep TFLOP | sed "s/^/$t r$r /" >> $L/bwd_ab.txt
done; done
mark bwd_ab
for r in 1 2; do for t in main sk; do
  [ $(left) -gt 30 ] && timeout 30 $BIN/${t}_fwd_check --bench-only 2>&1 | grep "TFLOP/s" | sed "s/^/$t r$r /" >> $L/fwd_ab.txt
done; done
python3 cuda/tests/fwd_ab.py $L/fwd_ab.txt > $L/fwd_ab_summary.txt 2>&1; cat $L/fwd_ab_summary.txt >> $S
mark end
