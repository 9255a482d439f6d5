#!/usr/bin/env bash
# Build + GPU tests + benchmark on a Hopper machine, in one go (the device tool lends one for a few minutes).
# (cuda/tests/run_fwd_check.sh and run_bwd_check.sh build and run the kernels' standalone checkers, without JAX;
# cuda/tests/run_fwd_ab.sh times the forward of several source trees in interleaved rounds.)
#
#   scripts/gpu_run.sh [build] [check] [sanitize] [test] [example] [bench] [bench-quick] [bench-variants] [readme]
#   (default: build check test bench; readme installs as the README says, removing stage build's in-place module)
#
# Environment: OUT (results folder, default ./gpu_out), FA3_JAX_HEAD_DIMS / FA3_JAX_DTYPES / FA3_JAX_DIRECTIONS
# (kernel subset, default all), WHEELS (folder with nvidia_cutlass-4.2.0.0 and optional peers such as flash_attn3_jax, default ./.whl),
# BENCH_HEAD_DIMS (default "64 128 256"), PYTEST_K (a pytest -k expression), PYTEST_ARGS (extra pytest arguments),
# PYTEST_WORKERS (default 8).
# Wheels are installed into /tmp/site (no network needed); the extension is built in place
# (fa3_jax/_fa3_jax_cuda*.so) so that a later call can carry it instead of rebuilding.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
WHEELS=${WHEELS:-$PWD/.whl}
mkdir -p "$OUT"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build check test bench)
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# For the GPU tests: XLA's GEMM autotuning only speeds up the reference's own matmuls (our kernels are custom calls)
# and costs compile time in every case (~16 s each). Not for timing: XLA's own attention is slow without it. (The
# checks of fa3_jax.testing, which `python -m fa3_jax` runs, compile without it by themselves.)
NO_AUTOTUNE="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
status=0

# A warm machine keeps /tmp/site from an earlier call, which may have carried fewer wheels: install each wheel whose
# stamp is missing (a call that carried only CUTLASS once left the next call's benchmark without its FA3 peer).
if [ -d "$WHEELS" ]; then
  for whl in "$WHEELS"/*.whl; do
    stamp=/tmp/site/.installed_$(basename "$whl")
    [ -f "$stamp" ] && continue
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$whl" \
      && touch "$stamp" || exit 1
  done
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv \
  > "$OUT/gpu.txt" 2>&1

for stage in "${stages[@]}"; do
  case $stage in
  build)
    start=$(date +%s)
    cutlass=$(python3 -c "import cutlass_library, pathlib; print(pathlib.Path(cutlass_library.__file__).parent / 'source' / 'include')")
    cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DFA3_JAX_CUDA=ON \
      -DFA3_JAX_HEAD_DIMS="${FA3_JAX_HEAD_DIMS:-64;96;128;192;256;192x128}" \
      -DFA3_JAX_DTYPES="${FA3_JAX_DTYPES:-bf16;fp16}" -DFA3_JAX_DIRECTIONS="${FA3_JAX_DIRECTIONS:-fwd;bwd}" \
      -DFA3_JAX_CUTLASS_INCLUDE_DIR="$cutlass" \
      -DPython_EXECUTABLE="$(command -v python3)" > "$OUT/build.log" 2>&1 \
      && ninja -C build/gpu -j 16 >> "$OUT/build.log" 2>&1 \
      && cp build/gpu/_fa3_jax_cuda*.so fa3_jax/ && cp build/gpu/_fa3_jax_cuda*.so "$OUT/" \
      || { echo "BUILD FAILED"; grep -B2 -A8 "error" "$OUT/build.log" | head -80; exit 1; }
    echo "build: $(( $(date +%s) - start )) s (FA3_JAX_HEAD_DIMS=${FA3_JAX_HEAD_DIMS:-all}, 16 jobs)" | tee "$OUT/build_time.txt"
    grep -E "ptxas (info|warning)|Potential Performance Loss|spill" "$OUT/build.log" | sort | uniq -c | sort -rn \
      | head -40 > "$OUT/ptxas_summary.txt"
    grep -iE "warning.*(C75|serializ|spill)|bytes spill" "$OUT/build.log" | head -20
    ;;
  check)
    # Correctness only; timing belongs to the bench stages.
    python3 -m fa3_jax --no-timing ${MAIN_ARGS:-} 2>&1 | tee "$OUT/selfcheck.txt" || status=1
    ;;
  sanitize)
    # compute-sanitizer memcheck + racecheck on small shapes, through the standalone forward checker.
    OUT="$OUT/sanitize" FWD_ONLY=bf16_128x128 STEPS="build sanitize" JOBS=16 cuda/tests/run_fwd_check.sh || status=1
    ;;
  test)
    XLA_FLAGS="$NO_AUTOTUNE" XLA_PYTHON_CLIENT_PREALLOCATE=false timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -n ${PYTEST_WORKERS:-8} tests/gpu ${PYTEST_K:+-k "$PYTEST_K"} ${PYTEST_ARGS:-} \
      --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25 || status=1
    ;;
  example)
    # The Flax training example with our kernels and with jax.nn.dot_product_attention: loss curves must agree.
    { python3 examples/train_lm.py --compare \
      && python3 examples/train_lm.py --compare --dim 512 --heads 4 --kv-heads 2 --seq 1024 --depth 4 --steps 200; } \
      2>&1 | tr '\r' '\n' | sed -n '/^\[/!p; /step \([0-9]*\)\/\1 /p' > "$OUT/train_lm.txt" || status=1
    cat "$OUT/train_lm.txt"
    ;;
  bench)
    python3 benchmarks/bench_attention.py --head-dims ${BENCH_HEAD_DIMS:-64 128 256} --out "$OUT/bench" ${BENCH_ARGS:-} \
      > "$OUT/bench.log" 2>&1 || status=1
    tail -5 "$OUT/bench.log"
    ;;
  bench-quick)
    python3 benchmarks/bench_attention.py --head-dims ${BENCH_HEAD_DIMS:-128} --seqlens 2048 8192 --repeats 3 \
      --out "$OUT/bench" > "$OUT/bench.log" 2>&1 || status=1
    cat "$OUT/bench/results.md"
    ;;
  bench-variants)
    # Sinks against the plain call, chunks against the matching sliding window (benchmarks/bench_variants.py).
    python3 benchmarks/bench_variants.py --out "$OUT/variants" ${VARIANTS_ARGS:-} > "$OUT/variants.log" 2>&1 || status=1
    cat "$OUT/variants/results.md"
    ;;
  readme)
    # The README's Hopper install and first result as a new user types them, in the image's Python (which has jax,
    # the build tools and the test packages; offline, so pip reads the nvidia-cutlass wheel from $WHEELS), timed
    # (target: python -m fa3_jax under 60 s). Without PYTHONPATH, which would show /tmp/site's CUTLASS to the build.
    rm -rf build/cutlass fa3_jax/_fa3_jax_cuda*.so  # a new user's checkout: no CUTLASS yet, no in-place module
    (
      unset PYTHONPATH
      set -eo pipefail
      start=$(date +%s)
      python3 -m pip install -q --no-index --find-links "$WHEELS" scikit-build-core nanobind cmake ninja
      python3 -m pip install -q --no-index --find-links "$WHEELS" --no-deps --target build/cutlass \
        nvidia-cutlass==4.2.0.0
      FA3_JAX_CUDA=ON python3 -m pip install -q --no-index --no-build-isolation -e ".[test]" 2>&1 \
        | tee "$OUT/readme_pip.txt"
      echo "install: $(( $(date +%s) - start )) s (FA3_JAX_HEAD_DIMS=${FA3_JAX_HEAD_DIMS:-all})"
      python3 -c "from fa3_jax import _extension as e; assert e.module is not None, e.import_error"
      start=$(date +%s)
      python3 -m fa3_jax ${MAIN_ARGS:-}
      echo "python -m fa3_jax: $(( $(date +%s) - start )) s"
    ) 2>&1 | tee "$OUT/readme.txt" || status=1
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
exit $status
