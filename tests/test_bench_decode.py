"""benchmarks/bench_decode.py: its paged layout (in-process) and a `--quick` run on CPU (a subprocess, as a user
would run it)."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

import benchmark_scripts

bench_decode, SCRIPT = benchmark_scripts.load("bench_decode")


def test_paged_cache_reads_back_through_its_page_table():
  cache = jnp.asarray(np.random.default_rng(0).standard_normal((3, 64, 2, 4)), jnp.float32)
  pages, table = bench_decode.paged(cache, 16)
  assert pages.shape == (12, 16, 2, 4) and table.shape == (3, 4)
  assert sorted(np.asarray(table).ravel().tolist()) == list(range(12))
  np.testing.assert_array_equal(np.asarray(pages)[np.asarray(table)].reshape(cache.shape), np.asarray(cache))


def test_quick_run_on_cpu_writes_results(tmp_path):
  out = tmp_path / "decode"
  proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--calls", "1", "--repeats", "1", "--out", str(out)],
                        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "| batch x cache length | queries | KV bytes | floor (us) | fa3_jax |" in (out / "results.md").read_text()
  rows = json.loads((out / "results.json").read_text())["rows"]
  assert {r["implementation"] for r in rows} == {"fa3_jax", "fa3_jax_unsplit", "fa3_jax_paged256"}
  for r in rows:  # every variant of ours agrees exactly on the reference path
    assert r["us"] > 0 and r["max_diff_vs_fa3_jax"] == 0, r


def test_quick_prefill_run_compares_the_kvcache_call_with_the_dense_forward(tmp_path):
  out = tmp_path / "prefill"
  proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--prefill", "--calls", "1", "--repeats", "1",
                         "--out", str(out)], capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert (out / "results.md").read_text().startswith("Prefill against a cache")
  rows = json.loads((out / "results.json").read_text())["rows"]
  assert {r["implementation"] for r in rows} == {"fa3_jax", "fa3_jax_dense_fwd"}
  for r in rows:  # the same causal attention on the reference path
    assert r["seqlen_q"] == 16 and r["max_diff_vs_fa3_jax"] < 2e-2, r
