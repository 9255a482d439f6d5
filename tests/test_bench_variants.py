"""benchmarks/bench_variants.py: its pair counts and matching windows (in-process), and a `--quick` run on CPU (a
subprocess, as a user would run it)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import benchmark_scripts
from oracle import visible_mask

bench, SCRIPT = benchmark_scripts.load("bench_variants")


@pytest.mark.parametrize("seqlen,chunk,window", [(100, 16, None), (100, 0, None), (100, 0, 7), (64, 64, None)])
def test_visible_pairs_count_the_oracle_mask(seqlen, chunk, window):
  mask = visible_mask(seqlen, seqlen, causal=True, window=(-1 if window is None else window, 0), chunk=chunk)
  assert bench.visible_pairs(seqlen, chunk=chunk, window=window) == mask.sum()


def test_the_matching_window_sees_about_as_many_pairs_as_the_chunks():
  for seqlen, chunk in ((4096, 1024), (16384, 8192), (1000, 33)):
    window = bench.matching_window(seqlen, chunk)
    chunked = bench.visible_pairs(seqlen, chunk=chunk)
    assert bench.visible_pairs(seqlen, window=window - 1) < chunked <= bench.visible_pairs(seqlen, window=window)
    assert bench.visible_pairs(seqlen, window=window) - chunked <= seqlen  # one more key per row at most


def test_quick_run_on_cpu_writes_results(tmp_path):
  out = tmp_path / "variants"
  proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  rows = json.loads((out / "results.json").read_text())["results"]
  assert [r["variant"] for r in rows] == ["no sinks", "sinks", "no sinks", "sinks", "window 9", "chunk 16"]
  assert all(r["error"] is None and r["fwd_ms"] > 0 for r in rows), rows
  assert "| comparison | variant |" in (out / "results.md").read_text()
  assert np.isfinite([r["fwd_tflops"] for r in rows]).all()
