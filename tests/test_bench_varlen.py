"""benchmarks/bench_varlen.py: its FLOP count, document mixes and layouts (in-process), and a `--quick` run on CPU
(a subprocess, as a user would run it)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import benchmark_scripts
import fa3_jax
from fa3_jax import benchmark

bench_varlen, SCRIPT = benchmark_scripts.load("bench_varlen")


def test_varlen_flops_are_the_sum_of_per_document_flops():
  # Documents of 3 and 5 tokens, 2 heads, head dim 8: 4 * heads * head_dim * (3^2 + 5^2) multiply-adds x 2.
  fwd = 4 * 2 * 8 * (3 * 3 + 5 * 5)
  assert fwd == 2176
  assert benchmark.varlen_attention_flops([3, 5], 2, 8, False, "fwd") == fwd
  assert benchmark.varlen_attention_flops([3, 5], 2, 8, True, "fwd") == fwd / 2  # the visible half, per document
  assert benchmark.varlen_attention_flops([3, 5], 2, 8, False, "bwd") == 2.5 * fwd
  assert benchmark.varlen_attention_flops([3, 5], 2, 8, True, "bwd") == 2.5 * fwd / 2
  # Far less than the same tokens as one sequence: cross-document pairs are no useful work.
  assert benchmark.varlen_attention_flops([3, 5], 2, 8, False, "fwd") < benchmark.attention_flops(1, 8, 2, 8, False,
                                                                                                  "fwd")


def test_the_issue_mixes_have_the_documented_shapes():
  mixes = bench_varlen.mixes()
  a, b = mixes["a"].lengths, mixes["b"].lengths
  assert len(a) == 12 and sum(a) == 16384 and min(a) >= 1
  assert max(a) / min(a) > 10  # lengths vary widely
  assert len(b) == 64 and 32 <= min(b) and max(b) <= 512
  assert bench_varlen.mixes() == mixes  # seeded: the same every run
  for total, documents in ((16384, 12), (5, 5), (7, 1), (100, 99)):
    lengths = bench_varlen.lognormal_lengths(total, documents, 1.5, 3)
    assert len(lengths) == documents and sum(lengths) == total and min(lengths) >= 1


def test_packing_indices():
  p = bench_varlen.Packing((2, 3, 1))
  assert p.cu_seqlens().tolist() == [0, 2, 5, 6] and p.cu_seqlens().dtype == np.int32
  assert p.padded_rows().tolist() == [0, 1, 3, 4, 5, 6]  # batch 3 x max_seqlen 3
  assert p.segment_ids().tolist() == [0, 0, 1, 1, 1, 2]


def _masked_attention(q, k, v, segment_ids, causal):
  """Dense stand-in: (1, total, heads, d) attention within equal segment ids."""
  mask = segment_ids[0][:, None] == segment_ids[0][None, :]
  if causal:
    mask &= jnp.tril(jnp.ones(mask.shape, bool))
  return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None])


@pytest.mark.parametrize("causal", [False, True])
def test_measure_checks_each_layout_against_the_per_document_reference(causal):
  mix = bench_varlen.Mix("t", "test", (5, 17, 9))
  inputs = bench_varlen.Inputs(bench_varlen.Packing(mix.lengths), 2, 16, jnp.bfloat16, 0)
  reference = bench_varlen.reference_output(inputs, causal)

  def run(factory):
    return bench_varlen.measure("t", factory, mix, inputs, 2, 16, causal, reference, calls=1, repeats=1)

  padded = run(bench_varlen.IMPLEMENTATIONS["xla"])
  segments = run(lambda p, h, d, c: bench_varlen.Runner(lambda q, k, v, s: _masked_attention(q, k, v, s, c),
                                                        "segment_ids"))
  # Attending across documents (one packed sequence, no segment ids) is caught.
  packed_wrong = run(lambda p, h, d, c: bench_varlen.Runner(
      lambda q, k, v, cu: jax.nn.dot_product_attention(q[None], k[None], v[None], is_causal=c)[0], "packed"))
  for r in (padded, segments, packed_wrong):
    assert r.error is None and r.skipped is None, r
    assert r.fwd_ms > 0 and r.fwd_tflops == pytest.approx(
        benchmark.varlen_attention_flops(mix.lengths, 2, 16, causal, "fwd") / r.fwd_ms / 1e9)
  assert padded.max_abs_error < bench_varlen.CHECK_TOLERANCE
  assert segments.max_abs_error < bench_varlen.CHECK_TOLERANCE
  assert packed_wrong.max_abs_error > bench_varlen.CHECK_TOLERANCE
  assert "†" in bench_varlen._cell(packed_wrong, "fwd") and "†" not in bench_varlen._cell(padded, "fwd")


def test_unavailable_implementations_are_skipped_not_fatal():
  mix = bench_varlen.Mix("t", "test", (4, 4))
  inputs = bench_varlen.Inputs(bench_varlen.Packing(mix.lengths), 1, 8, jnp.bfloat16, 0)

  def unavailable(*_):
    raise bench_varlen.Unavailable("not here")

  r = bench_varlen.measure("t", unavailable, mix, inputs, 1, 8, False, None)
  assert r.skipped == "not here" and r.fwd_tflops is None
  if jax.default_backend() != "gpu":
    for name in ("flash_attn3_jax", "cudnn"):
      assert bench_varlen.measure(name, bench_varlen.IMPLEMENTATIONS[name], mix, inputs, 1, 8, False, None).skipped


@pytest.mark.parametrize("name", ["fa3_jax_segment_ids", "fa3_jax_segment_ids_bounded"])
def test_segment_id_path_matches_the_per_document_reference(name):
  mix = bench_varlen.Mix("t", "test", (6, 10, 1))
  inputs = bench_varlen.Inputs(bench_varlen.Packing(mix.lengths), 2, 16, jnp.bfloat16, 0)
  assert name in bench_varlen.DEFAULT_IMPLEMENTATIONS
  r = bench_varlen.measure("s", bench_varlen.IMPLEMENTATIONS[name], mix, inputs, 2, 16, True,
                           bench_varlen.reference_output(inputs, True), calls=1, repeats=1)
  assert r.error is None and r.skipped is None and r.max_abs_error < bench_varlen.CHECK_TOLERANCE, r


def test_quick_run_on_cpu_writes_results(tmp_path):
  if not hasattr(fa3_jax, "flash_attn_varlen_func"):
    pytest.skip("fa3_jax.flash_attn_varlen_func does not exist yet: the --quick run would only time the peers")
  pytest.importorskip("matplotlib")
  out = tmp_path / "varlen"
  proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "lengths [" in proc.stdout  # the document lengths used are printed
  assert (out / "varlen.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  table = (out / "results.md").read_text()
  assert "| implementation | non-causal fwd | non-causal bwd | causal fwd | causal bwd |" in table

  data = json.loads((out / "results.json").read_text())
  mixes = data["meta"]["mixes"]
  assert set(mixes) == {"a", "b"} and mixes == {
      name: dict(description=m.description, lengths=list(m.lengths)) for name, m in bench_varlen.mixes(True).items()}
  results = data["results"]
  assert {r["implementation"] for r in results} == set(bench_varlen.DEFAULT_IMPLEMENTATIONS)
  assert len(results) == 2 * 2 * len(bench_varlen.DEFAULT_IMPLEMENTATIONS)  # mixes x causal x implementations
  for r in results:
    if r["implementation"] in ("flash_attn3_jax", "cudnn"):
      assert r["skipped"], r  # GPU-only peers are reported as skipped on CPU
      continue
    assert r["error"] is None and r["skipped"] is None, r
    assert r["max_abs_error"] < bench_varlen.CHECK_TOLERANCE, r
    flops = benchmark.varlen_attention_flops(mixes[r["mix"]]["lengths"], r["heads"], r["head_dim"], r["causal"],
                                             "fwd")
    assert r["fwd_tflops"] * 1e12 * r["fwd_ms"] / 1e3 == pytest.approx(flops)
    assert r["tokens"] == sum(mixes[r["mix"]]["lengths"])
