#!/bin/bash
# Session 10 final: harness d=64 grid of the built extension (same machine as the build), then fwd_check A/B of the
# final tree against main (both d=64 kernels, both dtypes).
mkdir -p $OUT
BENCH_HEAD_DIMS=64 OUT=/tmp/o scripts/gpu_run.sh bench 2>&1 | tail -3
cd /tmp/o && tar czf $OUT/bench_d64.tgz bench bench.log gpu.txt && cd - > /dev/null
OUT=/tmp/ab FWD_ONLY="bf16_64x64 fp16_64x64" ROUNDS=5 bash cuda/tests/run_fwd_ab.sh .bwdtmp/s17/main .bwdtmp/s17/final 2>&1 | tail -10
cp /tmp/ab/summary.txt /tmp/ab/bench.txt $OUT/
